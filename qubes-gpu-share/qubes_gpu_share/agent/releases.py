"""Telling dom0 that this qube let go of a lease, until dom0 hears it.

By the time the agent tells dom0, its side is let go already and the
application cannot ask again; a release that did not get through (dom0's
broker is restarting) would leave the lease active at dom0 until its TTL,
holding the provider's budget. So such a release is retried in the
background, with backoff, until dom0 answers.
"""

from __future__ import annotations

import asyncio
import logging

from .broker_link import BrokerLink, BrokerRefused

log = logging.getLogger(__name__)

#: Seconds before the first retry of a release dom0 did not receive, and
#: the longest wait between retries.
RELEASE_RETRY = 0.2
RELEASE_RETRY_MAX = 10.0


class Releases:
    """This agent's releases to dom0, those that did not get through
    retried in the background."""

    def __init__(self, link: BrokerLink):
        self._link = link
        #: releases that did not reach dom0, retried in the background
        self._retrying: dict[str, asyncio.Task] = {}

    def __contains__(self, lease: str) -> bool:
        """Whether a release of ``lease`` is being retried."""
        return lease in self._retrying

    async def tell(self, lease: str) -> None:
        """Tell dom0; a refusal with dom0's word is raised, a call that did
        not get through is retried in the background."""
        try:
            await self._link.release(lease)
        except BrokerRefused as exc:
            if exc.code != "qrexec":
                raise
            log.warning("lease %s: release did not reach dom0 (%s): "
                        "retrying", lease, exc)
            if lease not in self._retrying:
                self._retrying[lease] = asyncio.get_running_loop(
                    ).create_task(self._retry(lease))

    async def _retry(self, lease: str) -> None:
        delay = RELEASE_RETRY
        try:
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RELEASE_RETRY_MAX)
                try:
                    await self._link.release(lease)
                    return
                except BrokerRefused as exc:
                    if exc.code != "qrexec":
                        log.warning("lease %s: release: %s", lease, exc)
                        return
        finally:
            self._retrying.pop(lease, None)

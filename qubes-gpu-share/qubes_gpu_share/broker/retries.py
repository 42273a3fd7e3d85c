"""When the broker tries again to end a lease a side did not let go of.

A side that is busy, times out, errs or cannot be asked (paused, unknown
to qubesd) leaves its lease ``releasing``/``revoking`` with the budget held
(docs/broker.md). Ending it is retried per lease with exponential backoff
(``base`` doubling up to ``maximum``), and why it waits is kept for the
admin (``qvm-gpu-share list`` shows it). One timer per lease, at most:
a qube with many stuck leases costs one timer each, never a thread, and the
calls the retries make are bounded per qube by :class:`.agents.Agents`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Retries:
    """Backoff timers and the reason each waiting lease waits."""

    def __init__(self, retry: Callable[[str], None], *, base: float = 1.0,
                 maximum: float = 60.0):
        self._retry = retry
        self.base = base
        self.maximum = maximum
        self._attempts: dict[str, int] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._why: dict[str, str] = {}

    def later(self, lease_id: str, why: str) -> float:
        """Try ``lease_id`` again after the next backoff step; returns the
        delay. A timer already set for it is replaced."""
        attempts = self._attempts.get(lease_id, 0) + 1
        self._attempts[lease_id] = attempts
        self._why[lease_id] = why
        delay = min(self.base * 2 ** (attempts - 1), self.maximum)
        self._cancel(lease_id)
        self._timers[lease_id] = asyncio.get_running_loop().call_later(
            delay, self._fire, lease_id)
        return delay

    def waiting(self, lease_id: str) -> str | None:
        """Why ``lease_id`` has not ended yet, None if it is not waiting."""
        return self._why.get(lease_id)

    def done(self, lease_id: str) -> None:
        """The lease ended: forget it."""
        self._cancel(lease_id)
        self._attempts.pop(lease_id, None)
        self._why.pop(lease_id, None)

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def __len__(self) -> int:
        return len(self._timers)

    def _fire(self, lease_id: str) -> None:
        self._timers.pop(lease_id, None)
        self._retry(lease_id)

    def _cancel(self, lease_id: str) -> None:
        timer = self._timers.pop(lease_id, None)
        if timer is not None:
            timer.cancel()

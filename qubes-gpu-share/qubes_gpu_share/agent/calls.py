"""This agent's lease calls to dom0 while they are under way.

A lease dom0 lists as active that this agent does not know may be the
answer of one of its own calls still on its way here; lease entries carry
no creation time, so the agent numbers its calls instead and the
reconciler (reconcile.py) asks which calls started before a list came back
and are still open.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator


class LeaseCalls:
    """This agent's qubes.GpuLease calls under way, numbered in the order
    they started, each with the provider it asks. A call counts until its
    answer is received (mapped and known) or it failed."""

    def __init__(self) -> None:
        self._started = 0
        self._open: dict[int, str] = {}
        self._changed = asyncio.Event()

    @contextlib.contextmanager
    def track(self, provider: str) -> Iterator[None]:
        serial = self._started
        self._started += 1
        self._open[serial] = provider
        try:
            yield
        finally:
            del self._open[serial]
            self._changed.set()
            self._changed = asyncio.Event()

    def mark(self) -> int:
        """Calls numbered below the mark started before now."""
        return self._started

    def pending(self, mark: int) -> set[str]:
        """The providers asked by calls started before ``mark`` and still
        under way."""
        return {provider for serial, provider in self._open.items()
                if serial < mark}

    async def settled(self, mark: int) -> None:
        """Until every call started before ``mark`` has ended."""
        while self.pending(mark):
            await self._changed.wait()

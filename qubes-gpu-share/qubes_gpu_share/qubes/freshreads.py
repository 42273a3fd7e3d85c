"""Fresh reads shared between callers that wait for the same qube.

qubesd answers one call at a time, so when 16 decisions about the same
provider each read its domain, the 16th waits for 15 reads it does not
need. A read that *started after* a caller asked is as fresh for it as a
read of its own: so callers share reads, under that one rule. Per key at
most one read runs; a caller that arrives while it runs does not join it
(it began too early to know what changed since; one created but not begun
yet is joined) but waits for the next one, which starts when the running
one ends and serves every caller that arrived meanwhile. Under load a key
costs one read per read's duration, however many callers wait; alone, a
caller pays one read, as before.

A caller cancelled while it waits leaves the shared read running for the
others; a read's error goes to every caller that shared it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class FreshReads(Generic[K, V]):
    """``await reads.get(key)``: ``read(key)``'s result, from a read that
    started after the call."""

    def __init__(self, read: Callable[[K], Awaitable[V]]) -> None:
        self._read = read
        #: the read under way per key, and the one its late callers wait for
        self._running: dict[K, asyncio.Future] = {}
        self._next: dict[K, asyncio.Future] = {}
        #: keys whose running read has begun (asked its source)
        self._begun: set[K] = set()
        #: reads made, and callers served (calls per caller = reads/callers)
        self.reads = 0
        self.callers = 0

    async def get(self, key: K) -> V:
        self.callers += 1
        if key not in self._running:
            future = self._start(key)
        elif key not in self._begun:
            future = self._running[key]
        else:
            future = self._next.get(key)
            if future is None:
                future = self._next[key] = \
                    asyncio.get_running_loop().create_future()
        return await asyncio.shield(future)

    def _start(self, key: K,
               future: asyncio.Future | None = None) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        if future is None:
            future = loop.create_future()
        self._running[key] = future
        self.reads += 1
        task = loop.create_task(self._begin(key))
        task.add_done_callback(lambda t: self._finished(key, future, t))
        return future

    async def _begin(self, key: K) -> V:
        self._begun.add(key)
        return await self._read(key)

    def _finished(self, key: K, future: asyncio.Future,
                  task: asyncio.Task) -> None:
        self._begun.discard(key)
        del self._running[key]
        waiting = self._next.pop(key, None)
        if task.cancelled():  # only the loop's end cancels a read
            future.cancel()
            if waiting is not None:  # no read nobody would wait for
                waiting.cancel()
            return
        if task.exception() is not None:
            future.set_exception(task.exception())
            # retrieved here too: every caller may have gone
            future.add_done_callback(_retrieve)
        else:
            future.set_result(task.result())
        if waiting is not None:
            self._start(key, waiting)

    def __len__(self) -> int:
        """Keys with a read under way."""
        return len(self._running)


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()

"""Group commit: the registry's writes, shared between requests, off the
event loop.

Every state change the broker makes durable is an fsync (WAL,
``synchronous=FULL``: docs/registry.md). Two things keep that cost from
becoming the broker's:

* One writer thread does every write. The event loop hands it batches
  and goes on serving; an fsync never stalls the other qubes' calls. Reads
  stay on the loop, on the registry's own read connection: WAL lets them
  run while a commit is under way.
* Requests share commits. While one commit is under way, the changes of
  every request that arrives join the next batch; each request gets its
  results only after the commit that holds its changes returned. If the
  combined batch is refused, each request's changes are applied again on
  their own, so one request's illegal change never fails another.

Some changes need not be durable before the broker answers
(:meth:`GroupCommit.later`, docs/registry.md says which and why): they wait
for the next commit, or at most :data:`LINGER` seconds, and ride on its
fsync. Until then :meth:`GroupCommit.pending` gives the lease as it will be.

``settled``, when given to :meth:`GroupCommit.apply`, runs on the loop once
the request's changes were committed or refused: a caller that counts
something in memory until the registry does (pages admitted, not yet
committed) stops counting it then. Between the commit and that callback a
reader on the loop may count it twice, never not at all: admission errs on
the side of refusing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

from .lease import Lease
from .registry import Change, Registry, Transition

T = TypeVar("T")
log = logging.getLogger(__name__)

#: How long a change that need not be durable yet waits for a commit.
LINGER = 0.02


class GroupCommit:
    """The registry's one writer (a thread), fed with batches."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._writer = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="registry-writer")
        self._queue: list[tuple[Sequence[Change], asyncio.Future | None,
                                Callable[[], None] | None]] = []
        self._busy = False
        self._linger: asyncio.Task | None = None
        #: leases whose latest change waits for a commit (later())
        self._pending: dict[str, Lease] = {}
        #: commits made (the benchmarks count fsyncs with it)
        self.commits = 0

    async def apply(self, changes: Sequence[Change], *,
                    settled: Callable[[], None] | None = None) -> list[Lease]:
        """Apply ``changes`` (all or nothing) in the next commit; their
        results once it is durable."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append((changes, future, settled))
        self._kick()
        return await future

    def later(self, change: Transition, result: Lease) -> None:
        """Make ``change`` durable with the next commit, without waiting;
        ``result`` is the lease as it will be (:meth:`pending`)."""
        self._pending[result.id] = result
        self._queue.append(([change], None, None))
        if self._linger is None:  # a task, so that "wait for all tasks"
            self._linger = asyncio.get_running_loop().create_task(
                self._linger_then_kick())

    def pending(self, lease_id: str) -> Lease | None:
        """The lease after a change not committed yet, if it has one."""
        return self._pending.get(lease_id)

    async def run(self, func: Callable[[], T]) -> T:
        """``func()`` on the writer thread (another write: pruning)."""
        return await asyncio.get_running_loop().run_in_executor(
            self._writer, func)

    async def flush(self) -> None:
        """Until every change handed in so far is committed."""
        await self.apply([])

    async def aclose(self) -> None:
        """Commit what waits, then stop the writer (the daemon ends)."""
        await self.flush()
        self._writer.shutdown(wait=True)

    # -- the writer ---------------------------------------------------------

    async def _linger_then_kick(self) -> None:
        await asyncio.sleep(LINGER)
        self._linger = None
        self._kick()

    def _kick(self) -> None:
        if self._busy or not self._queue:
            return
        if all(future is None for _, future, _ in self._queue) and \
                self._linger is not None:
            return  # only changes that may wait: they wait for company
        if self._linger is not None:
            if self._linger is not asyncio.current_task():
                self._linger.cancel()
            self._linger = None
        self._busy = True
        task = asyncio.get_running_loop().create_task(self._commit())
        task.add_done_callback(lambda _task: self._after())

    def _after(self) -> None:
        self._busy = False
        self._kick()

    async def _commit(self) -> None:
        # the batch is taken when the task runs: every request of the
        # loop's turn that started it is in it
        batch, self._queue = self._queue, []
        changes = [change for item, _, _ in batch for change in item]
        try:
            results = await self.run(lambda: self._apply(changes))
        except Exception:  # pylint: disable=broad-except
            for item in batch:
                await self._alone(*item)
            return
        for item, future, settled in batch:
            mine, results = results[:len(item)], results[len(item):]
            self._done(item, future, settled, mine, None)

    async def _alone(self, changes, future, settled) -> None:
        try:
            results = await self.run(lambda: self._apply(changes))
        except Exception as exc:  # pylint: disable=broad-except
            self._done(changes, future, settled, None, exc)
        else:
            self._done(changes, future, settled, results, None)

    def _apply(self, changes: Sequence[Change]) -> list[Lease]:
        results = self._registry.apply(changes) if changes else []
        self.commits += 1 if changes else 0
        return results

    def _done(self, changes, future, settled, results, error) -> None:
        for change in changes:
            pending = self._pending.get(getattr(change, "lease_id", None))
            if pending is not None and (error is not None
                                        or pending.state is change.state):
                del self._pending[change.lease_id]
        if settled is not None:
            settled()
        if future is None:  # a change that did not wait (later())
            if error is not None:
                log.error("a change made later was refused: %r", error)
            return
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(results)

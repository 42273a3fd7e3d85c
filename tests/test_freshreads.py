"""Shared fresh reads (qubes/freshreads.py): callers share a read only if
it started after they asked; errors and cancellations stay contained."""

from __future__ import annotations

import asyncio
import gc

import pytest

from qubes_gpu_share.qubes.freshreads import FreshReads


class Source:
    """A read that takes one event-loop wait, numbering its reads."""

    def __init__(self, fail_at: int = 0):
        self.started = 0
        self.fail_at = fail_at
        self.gate = asyncio.Event()

    async def read(self, key: str) -> tuple[str, int]:
        self.started += 1
        number = self.started
        await self.gate.wait()
        if number == self.fail_at:
            raise OSError(f"read {number} failed")
        return key, number


def ask(reads: FreshReads, times: int = 1, key: str = "gpu") -> list:
    """``times`` callers asking for ``key`` now (as tasks)."""
    return [asyncio.ensure_future(reads.get(key)) for _ in range(times)]


async def turns(count: int) -> None:
    """Let the event loop run ``count`` turns."""
    for _ in range(count):
        await asyncio.sleep(0)


def test_a_caller_alone_pays_one_read_each_time():
    async def main():
        source = Source()
        source.gate.set()
        reads = FreshReads(source.read)
        got = [await reads.get("gpu") for _ in range(3)]
        return got, reads.reads, reads.callers

    assert asyncio.run(main()) == ([("gpu", 1), ("gpu", 2), ("gpu", 3)],
                                   3, 3)


def test_late_callers_share_the_next_read_never_the_running_one():
    async def main():
        source = Source()
        reads = FreshReads(source.read)
        first, early = ask(reads, 2)
        await turns(2)  # read 1 created in the first, begun in the second
        assert source.started == 1
        late = ask(reads, 15)
        [other] = ask(reads, key="app")
        await turns(1)
        source.gate.set()
        return (await first, await early, await asyncio.gather(*late),
                await other, reads.reads, reads.callers, len(reads))

    first, early, late, other, made, callers, running = asyncio.run(main())
    # a caller that asked before the read began shares it
    assert first == early == ("gpu", 1)
    # read 2 started after all 15 asked; read 3 is the other key's
    assert set(late) == {("gpu", 3)} or set(late) == {("gpu", 2)}
    assert other[0] == "app" and other[1] != late[0][1]
    assert made == 3 and callers == 18 and running == 0


def test_an_error_reaches_every_caller_that_shared_the_read():
    async def main():
        source = Source(fail_at=2)
        reads = FreshReads(source.read)
        [first] = ask(reads)
        await turns(2)
        late = ask(reads, 3)
        source.gate.set()
        results = await asyncio.gather(first, *late, return_exceptions=True)
        after = await reads.get("gpu")  # the key is not stuck
        return results, after

    results, after = asyncio.run(main())
    assert results[0] == ("gpu", 1)
    assert all(isinstance(r, OSError) and "read 2" in str(r)
               for r in results[1:])
    assert after == ("gpu", 3)


def test_a_cancelled_caller_leaves_the_shared_read_to_the_others():
    async def main():
        source = Source()
        reads = FreshReads(source.read)
        quitter, stayer = ask(reads, 2)
        await turns(1)  # both asked before the read began: shared
        quitter.cancel()
        source.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await quitter
        return await stayer, reads.reads

    assert asyncio.run(main()) == (("gpu", 1), 1)


def test_a_failed_read_nobody_waits_for_warns_of_nothing(caplog):
    async def main():
        source = Source(fail_at=1)
        reads = FreshReads(source.read)
        [gone] = ask(reads)
        await turns(1)
        gone.cancel()
        source.gate.set()
        await turns(5)
        assert len(reads) == 0

    asyncio.run(main())
    gc.collect()
    assert "never retrieved" not in caplog.text


def test_the_loop_ending_starts_no_new_read():
    """A read cancelled (the loop ends) cancels its late callers too,
    instead of starting a read nobody will wait for."""
    async def main():
        source = Source()
        reads = FreshReads(source.read)
        [first] = ask(reads)
        await turns(2)
        [late] = ask(reads)
        await turns(1)
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task() and \
                    task not in (first, late):
                task.cancel()  # the read itself
        done, _ = await asyncio.wait((first, late), timeout=1)
        results = [task.exception() if not task.cancelled()
                   else asyncio.CancelledError() for task in done]
        return results + [None] * (2 - len(done)), source.started, \
            len(reads)

    results, started, running = asyncio.run(main())
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert started == 1 and running == 0

"""The broker crashes (SIGKILL) at random points while qubes work.

Three consumer qubes lease from and release to two providers; one
provider also offers its own buffers to the consumers and ends those
offers. A killer thread SIGKILLs the broker at random operation counts
(plus a random few milliseconds, so that kills land inside calls, commits
and agent conversations) and restarts it at once. Afterwards:

- no lease lost: every lease id a qube was told about is in the registry,
  and every lease whose end a qube asked for reaches a final state;
- no lease duplicated: no id was handed out twice;
- no lease orphaned: once every application let go, nothing is live;
- every provider's budget (registry, admin socket) equals the sum of its
  live leases and the pages the grant simulator holds granted, both while
  leases are held and at the end (zero);
- zero simulator hazards.

The short run (100 operations, 5 kills) is part of `make test`; the full
one (1,000 operations, 20 kills) runs under ``-m slow`` too (figures in
docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import threading
import time

import pytest

from hostile_sim import (SMALL, SMALL_PAGES, app, assert_budgets_consistent,
                         consumer, final, memfd, provider, settle, system)
from qubes_gpu_share import client
from qubes_gpu_share.lease import State

PROVIDERS = ["gpu-a", "gpu-b"]
OFFERER = "gpu-b"
CONSUMERS = ["work", "media", "mail"]
QUBES = [provider("gpu-a", 2), provider("gpu-b", 3),
         *(consumer(name, 10 + i) for i, name in enumerate(CONSUMERS))]
#: A failed call waits this long before the next.
BACKOFF = 0.02
#: TTL of every lease of the run: longer than the run, so that no lease
#: ends by expiry; a lease whose answer was lost with the broker must be
#: found and released by its consumer's agent (agent/reconcile.py).
TTL = 600


@dataclasses.dataclass
class Ledger:
    """What the qubes were told, shared by the worker threads."""

    operations: int
    done: int = 0
    failed: int = 0
    told: list[str] = dataclasses.field(default_factory=list)
    ended: set[str] = dataclasses.field(default_factory=set)
    errors: dict[str, int] = dataclasses.field(default_factory=dict)
    orphans: int = 0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    broker_up: threading.Event = dataclasses.field(
        default_factory=threading.Event)

    def next_op(self) -> bool:
        """Claim one operation (once the broker is up: a qube's calls while
        it restarts would only burn operations); False once all are
        claimed."""
        self.broker_up.wait(30)
        with self.lock:
            if self.done >= self.operations:
                return False
            self.done += 1
            return True

    def attempt(self, call, *args, **kwargs):
        """One operation: its result, or False (counted) if it failed."""
        try:
            return call(*args, **kwargs)
        except client.ClientError as exc:
            with self.lock:
                self.failed += 1
                self.errors[exc.code] = self.errors.get(exc.code, 0) + 1
            time.sleep(BACKOFF)
            return False

    def tell(self, lease_id: str) -> None:
        with self.lock:
            self.told.append(lease_id)

    def end(self, lease_id: str) -> None:
        with self.lock:
            self.ended.add(lease_id)


def release_until_done(ledger: Ledger, qube_app: client.Client,
                       lease_id: str) -> None:
    """Release, retrying through broker restarts (each try an operation)."""
    while ledger.next_op():
        if ledger.attempt(qube_app.release, lease_id) is not False:
            ledger.end(lease_id)
            return


def consumer_worker(ledger: Ledger, sim, qube: str, seed: int) -> None:
    rng = random.Random(seed)
    with app(sim, qube) as qube_app:
        while ledger.next_op():
            buffer = ledger.attempt(qube_app.lease, rng.choice(PROVIDERS),
                                    **SMALL, ttl=TTL)
            if buffer is False:
                continue
            ledger.tell(buffer.lease)
            buffer.close(release=False)        # unmap, then release
            release_until_done(ledger, qube_app, buffer.lease)


def offer_worker(ledger: Ledger, sim, seed: int) -> None:
    rng = random.Random(seed)
    with app(sim, OFFERER) as offerer:
        while ledger.next_op():
            fd = memfd()
            try:
                lease_id = ledger.attempt(offerer.offer,
                                          rng.choice(CONSUMERS), fd, **SMALL,
                                          ttl=TTL)
            finally:
                os.close(fd)
            if lease_id is not False:
                ledger.tell(lease_id)
                release_until_done(ledger, offerer, lease_id)


def killer(ledger: Ledger, sim, kills: int, seed: int,
           killed: list[int]) -> None:
    """SIGKILL the broker at *kills* random operation counts, a random
    0-30 ms later, and restart it at once."""
    rng = random.Random(seed)
    marks = sorted(rng.sample(range(1, ledger.operations), kills))
    for mark in marks:
        while ledger.done < mark:
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.03))
        ledger.broker_up.clear()
        sim.kill("broker")
        killed.append(ledger.done)
        sim.start_broker()
        ledger.broker_up.set()


def crash_run(tmp_path, operations: int, kills: int, seed: int) -> dict:
    started = time.monotonic()
    with system(tmp_path, QUBES) as sim:
        ledger = Ledger(operations)
        ledger.broker_up.set()
        killed: list[int] = []
        threads = [threading.Thread(target=consumer_worker,
                                    args=(ledger, sim, qube, seed + i))
                   for i, qube in enumerate(CONSUMERS)]
        threads.append(threading.Thread(target=offer_worker,
                                        args=(ledger, sim, seed + 10)))
        for thread in threads:
            thread.start()
        # in the main thread: the simulated processes die with the thread
        # that started them (PR_SET_PDEATHSIG is per thread)
        killer(ledger, sim, kills, seed + 20, killed)
        for thread in threads:
            thread.join(timeout=600)
        try:
            assert len(killed) == kills
            check_after_crashes(sim, ledger)
        except AssertionError:
            print(sim.log_tails(60))
            raise
    figures = dict(operations=ledger.done, failed=ledger.failed,
                   errors=ledger.errors, untold_leases=ledger.orphans,
                   kills=len(killed), leases=len(ledger.told),
                   seconds=round(time.monotonic() - started, 1))
    print("crash run:", figures)
    return figures


def check_after_crashes(sim, ledger: Ledger) -> None:
    # releases that did not reach the broker are retried by the agents
    with contextlib.suppress(TimeoutError):
        sim.wait_until(lambda: all(final(lease) for lease in sim.leases()),
                       30, "", interval=0.1)
    settle(sim)
    leases = {lease.id: lease for lease in sim.leases()}
    assert len(set(ledger.told)) == len(ledger.told), "an id handed out twice"
    lost = [lease_id for lease_id in ledger.told if lease_id not in leases]
    assert lost == [], "leases the qubes were told about are missing"
    not_ended = [leases[i] for i in ledger.ended if not final(leases[i])]
    assert not_ended == [], "released leases did not end"
    # a lease whose answer died with the broker: no application knows its
    # id; the consumer's agent reconciles with dom0 and releases it
    recovered = [lease for lease in leases.values()
                 if lease.id not in ledger.told]
    ledger.orphans = len(recovered)
    sim.wait_until(lambda: all(final(lease) for lease in sim.leases()),
                   15, "leases whose answer was lost were not released",
                   interval=0.2)
    assert State.EXPIRED not in {lease.state for lease in sim.leases()}
    assert_budgets_consistent(sim, PROVIDERS, {p: 0 for p in PROVIDERS})
    # the system still works, and a held lease is counted by every witness
    with app(sim, "work") as work:
        held = [work.lease(p, **SMALL) for p in PROVIDERS]
        assert_budgets_consistent(sim, PROVIDERS,
                                  {p: SMALL_PAGES for p in PROVIDERS})
        states = {lease.id: lease.state for lease in sim.leases()}
        assert {states[buffer.lease] for buffer in held} == {State.ACTIVE}


@pytest.mark.slow
def test_broker_killed_100_times_5_loses_nothing(tmp_path):
    crash_run(tmp_path, operations=100, kills=5, seed=7)


@pytest.mark.slow
def test_broker_killed_1000_operations_20_kills_loses_nothing(tmp_path):
    crash_run(tmp_path, operations=1000, kills=20, seed=1000)

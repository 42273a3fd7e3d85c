#!/usr/bin/env python3
"""Broker throughput (issue 7, item 1): lease grant+release cycles per
second through the decision core and the durable registry, at 10, 1,000 and
10,000 live leases over 200 qubes, beside the floor measured in the same
run on the same disk: fsync'd SQLite commits per second with the registry's
own pragmas (WAL, synchronous=FULL). Goal: at least 0.4 cycles per floor
commit at every size.

Why this shape: a pull cycle in the broker is decide() over the usage the
registry reports, then the durable points of docs/registry.md: (1) create +
exporting, (2) active, (3) releasing, (4) released. The provider and the
consumer are answered instantly here (no qrexec, no grants): this measures
what the broker core adds per cycle, and the floor says what the disk
allows. Each run measures the floor and the cycles back to back, so the
ratio compares like with like on this shared, noisy machine.

Variants:
- serial: one client, one cycle at a time, four commits per cycle;
- serial-deferred: one client, `active` and `released` made durable with
  the next commit instead of their own (docs/registry.md says why that is
  safe), two commits per cycle;
- concurrent: CLIENTS asyncio clients through registry.GroupCommit.

Run: .venv/bin/python bench/bench_broker.py [--quick] [--record]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Sequence

from common import BENCH_DIR, Stats, header, record, table, verdict

from qubes_gpu_share import names
from qubes_gpu_share.decide import Grant, Kind, Mode, Request, Usage, decide
from qubes_gpu_share.formats import PAGE_SIZE, ReceiveMode, blob_layout
from qubes_gpu_share.lease import Initiator, State, new_lease
from qubes_gpu_share.qubes.info import QubeInfo
from qubes_gpu_share.registry import (Create, GroupCommit, Registry,
                                      Transition)

GOAL = 0.4            # cycles per floor commit
QUBES = 200           # consumers + providers
PROVIDERS = 4
PAGES = 64            # a 256 KiB buffer per lease
SIZES = (10, 1_000, 10_000)
CLIENTS = 16

_ROOMY = {"gpu-share-quota-leases": "1024", "gpu-share-quota-pages": "262144"}
CONSUMERS = [QubeInfo(f"work-{i:03}", "AppVM", True, 10 + i, "pvh",
                      {"service.gpu-share": "1", **_ROOMY})
             for i in range(QUBES - PROVIDERS)]
PROVIDER_INFO = [QubeInfo(f"sys-gpu-{i}", "AppVM", True, 1 + i, "hvm",
                          {"service.gpu-share-provider": "1",
                           "gpu-share-budget-pages": "1000000"})
                 for i in range(PROVIDERS)]
REFS = tuple(range(8, 8 + PAGES))


# -- the floor ---------------------------------------------------------------

def floor_commits(path: str, commits: int) -> float:
    """Commits per second of a one-row update, same pragmas as the registry."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, "
                     "v INTEGER)")
        conn.execute("INSERT OR IGNORE INTO t VALUES (1, 0)")
        start = time.perf_counter()
        for i in range(commits):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("UPDATE t SET v = ? WHERE k = 1", (i,))
            conn.execute("COMMIT")
        return commits / (time.perf_counter() - start)
    finally:
        conn.close()


# -- the broker's shape ------------------------------------------------------

def _request(consumer: QubeInfo, provider: QubeInfo) -> Request:
    return Request(caller=consumer.name, kind=Kind.LEASE,
                   consumer=consumer.name, provider=provider.name,
                   pages=PAGES, mode=Mode.CPU)


def admit(reg: Registry, consumer: QubeInfo, provider: QubeInfo) -> Create:
    """decide() over the registry's usage; the Create the broker records."""
    count, pages = reg.consumer_usage(consumer.name)
    usage = Usage(count, pages, reg.provider_pages(provider.name))
    grant = decide(_request(consumer, provider), consumer, provider, usage, {})
    if not isinstance(grant, Grant):
        raise RuntimeError(f"benchmark request refused: {grant}")
    lease = new_lease(lease_id=names.new_lease_id(), consumer=consumer.name,
                      provider=provider.name,
                      consumer_domid=grant.consumer_xid,
                      provider_domid=grant.provider_xid,
                      mode=ReceiveMode.CPU, initiator=Initiator.LEASE,
                      meta=blob_layout(PAGES * PAGE_SIZE), ttl=grant.ttl,
                      now=time.time())
    return Create(lease)


def _pair(i: int) -> tuple[QubeInfo, QubeInfo]:
    return CONSUMERS[i % len(CONSUMERS)], PROVIDER_INFO[i % PROVIDERS]


def fill(reg: Registry, live: int) -> None:
    """``live`` active leases spread over every consumer and provider."""
    changes = []
    for i in range(live):
        create = admit(reg, *_pair(i))
        lid = create.lease.id
        changes += [create, Transition(lid, State.EXPORTING, "fill"),
                    Transition(lid, State.ACTIVE, "fill", REFS)]
        if len(changes) >= 3000:
            reg.apply(changes)
            changes = []
    if changes:
        reg.apply(changes)


def serial_cycles(reg: Registry, cycles: int, offset: int) -> float:
    """Cycles per second, one client, four commits per cycle."""
    start = time.perf_counter()
    for i in range(cycles):
        create = admit(reg, *_pair(offset + i))
        lid = create.lease.id
        reg.apply([create, Transition(lid, State.EXPORTING, "asked")])
        reg.apply([Transition(lid, State.ACTIVE, "granted", REFS)])
        reg.apply([Transition(lid, State.RELEASING, "consumer let go")])
        reg.apply([Transition(lid, State.RELEASED, "provider released")])
    return cycles / (time.perf_counter() - start)


def deferred_cycles(reg: Registry, cycles: int, offset: int) -> float:
    """Cycles per second, one client; `active` and `released` ride along
    with the next commit (two commits per cycle)."""
    pending: list[Transition] = []
    start = time.perf_counter()
    for i in range(cycles):
        create = admit(reg, *_pair(offset + i))
        lid = create.lease.id
        reg.apply(pending + [create, Transition(lid, State.EXPORTING, "asked")])
        reg.apply([Transition(lid, State.ACTIVE, "granted", REFS),
                   Transition(lid, State.RELEASING, "consumer let go")])
        pending = [Transition(lid, State.RELEASED, "provider released")]
    reg.apply(pending)
    return cycles / (time.perf_counter() - start)


async def _client(reg: Registry, group: GroupCommit, cycles: int,
                  index: int) -> None:
    for i in range(cycles):
        create = admit(reg, *_pair(index + i * CLIENTS))
        lid = create.lease.id
        await group.apply([create, Transition(lid, State.EXPORTING, "asked")])
        await group.apply([Transition(lid, State.ACTIVE, "granted", REFS)])
        await group.apply([Transition(lid, State.RELEASING, "let go")])
        await group.apply([Transition(lid, State.RELEASED, "released")])


def concurrent_cycles(reg: Registry, cycles: int,
                      offset: int) -> tuple[float, float]:
    """(cycles per second, cycles per commit) with CLIENTS clients."""
    group = GroupCommit(reg)
    per_client = max(1, cycles // CLIENTS)

    async def run() -> None:
        await asyncio.gather(*(_client(reg, group, per_client, offset + c)
                               for c in range(CLIENTS)))

    start = time.perf_counter()
    asyncio.run(run())
    elapsed = time.perf_counter() - start
    done = per_client * CLIENTS
    return done / elapsed, done / group.commits


VARIANTS: dict[str, Callable[[Registry, int, int], float]] = {
    "serial": serial_cycles,
    "serial-deferred": deferred_cycles,
    "concurrent": lambda reg, n, off: concurrent_cycles(reg, n, off)[0],
}


def measure(size: int, runs: int, cycles: int, floor_n: int,
            workdir: str) -> dict[str, object]:
    floor_path = os.path.join(workdir, f"floor-{size}.db")
    reg_path = os.path.join(workdir, f"leases-{size}.db")
    floors: list[float] = []
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}
    ratios: dict[str, list[float]] = {v: [] for v in VARIANTS}
    per_commit: list[float] = []
    with Registry(reg_path) as reg:
        fill(reg, size)
        for run in range(runs):
            floor = floor_commits(floor_path, floor_n)
            floors.append(floor)
            for name, func in VARIANTS.items():
                if name == "concurrent":
                    rate, cpc = concurrent_cycles(reg, cycles, run * cycles)
                    per_commit.append(cpc)
                else:
                    rate = func(reg, cycles, run * cycles)
                rates[name].append(rate)
                ratios[name].append(rate / floor)
        held = sum(reg.consumer_usage(c.name)[0] for c in CONSUMERS)
        if held != size:
            raise RuntimeError(f"{held} live leases after the runs, "
                               f"expected {size}")
    return {"live": size, "floor": Stats.of(floors).as_dict(),
            "rates": {k: Stats.of(v).as_dict() for k, v in rates.items()},
            "ratios": {k: Stats.of(v).as_dict() for k, v in ratios.items()},
            "concurrent_cycles_per_commit": Stats.of(per_commit).as_dict()}


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--cycles", type=int, default=96,
                        help="cycles per sample and variant")
    parser.add_argument("--floor-commits", type=int, default=400)
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--dir", default=str(BENCH_DIR / "out"),
                        help="where the databases live (the disk measured)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run (smoke test)")
    parser.add_argument("--record", action="store_true",
                        help="write the results into bench/results.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.cycles, args.floor_commits = 2, CLIENTS, 20
        args.sizes = [10]
    os.makedirs(args.dir, exist_ok=True)
    header("broker throughput: grant+release cycles through decide() and "
           "the registry",
           f"{QUBES} qubes ({PROVIDERS} providers), {PAGES} pages/lease, "
           f"{args.runs} runs x {args.cycles} cycles per variant, floor "
           f"{args.floor_commits} commits per run, {CLIENTS} concurrent "
           f"clients; shared 2-core machine: noisy")
    workdir = tempfile.mkdtemp(prefix="broker-", dir=args.dir)
    try:
        results = [measure(size, args.runs, args.cycles, args.floor_commits,
                           workdir) for size in args.sizes]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = []
    for res in results:
        floor = Stats(**res["floor"])
        for name in VARIANTS:
            rate = Stats(**res["rates"][name])
            ratio = Stats(**res["ratios"][name])
            rows.append([f"{res['live']:,}", name, floor.fmt(0), rate.fmt(0),
                         ratio.fmt(2), f">= {GOAL}",
                         verdict(ratio.median >= GOAL)])
    print("cells: median [IQR] (min..max) over runs")
    table(["live leases", "variant", "floor commits/s", "cycles/s",
           "cycles per floor commit", "goal", ""], rows)
    for res in results:
        cpc = Stats(**res["concurrent_cycles_per_commit"])
        print(f"# concurrent at {res['live']:,} live: {cpc.median:.2f} "
              f"cycles per registry commit (4 durable points per cycle)")
    data = {"goal": GOAL, "clients": CLIENTS, "pages": PAGES,
            "results": results}
    if args.record:
        record("broker", data)
    return data


if __name__ == "__main__":
    main()

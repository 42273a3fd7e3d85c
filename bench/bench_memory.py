#!/usr/bin/env python3
"""Broker memory (issue 7, item 5): resident memory per live lease at
10,000 live leases, against the same process's empty baseline. Goal: under
2 KiB per lease.

Why a fresh child process per sample: RSS is a property of a whole process
and only grows, so each sample starts from nothing: import, open an empty
registry, run every query once (baseline RSS), then hold LIVE leases and
query every qube's usage again (loaded RSS). (loaded - baseline) / LIVE is
the cost of a lease. Two holders are measured:

- registry: what the registry itself keeps, leases written straight into
  it (SQLite's page cache is bounded by its cache_size, so this should not
  grow with the lease count): the floor of any broker;
- broker: the broker core (bench_broker's Broker with instant agents), every
  lease taken through Broker.lease as a qube would, so whatever the broker
  keeps per live lease (locks, timers, caches) is counted.

Run: .venv/bin/python bench/bench_memory.py [--quick] [--record]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from common import BENCH_DIR, Stats, header, record, table, verdict

GOAL_BYTES = 2048
LIVE = 10_000
HOLDERS = ("registry", "broker")
#: leases the broker is asked for at once while filling (group commit)
FILL_CLIENTS = 50


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(holder: str, live: int, path: str) -> dict[str, int]:
    """Runs in the child: baseline, fill, loaded (bytes)."""
    import asyncio  # noqa: PLC0415 (the child's own import cost)

    import bench_broker as bb  # noqa: PLC0415

    broker = bb.make_broker(path)
    reg = broker.registry
    loop = asyncio.new_event_loop()

    def touch() -> None:
        for consumer in bb.CONSUMERS:
            reg.consumer_usage(consumer)
        for provider in bb.PROVIDER_NAMES:
            reg.provider_pages(provider)
        reg.in_flight()
        reg.past_deadline(0.0)

    async def take(first: int) -> None:
        for i in range(first, live, FILL_CLIENTS):
            await broker.lease(*bb._pair(i), bb.REQUEST)

    async def take_all() -> None:
        await asyncio.gather(*(take(c) for c in range(FILL_CLIENTS)))

    try:
        # one cycle first, so that the baseline has every code path loaded
        bb.cycles_per_second(loop, broker, 1, 0, 1)
        touch()
        gc.collect()
        baseline = rss_bytes()
        if holder == "broker":
            loop.run_until_complete(take_all())
        else:
            bb.fill(reg, live)
        touch()
        held = sum(reg.consumer_usage(c)[0] for c in bb.CONSUMERS)
        assert held == live, held
        gc.collect()
        loaded = rss_bytes()
    finally:
        loop.close()
        reg.close()
    return {"baseline": baseline, "loaded": loaded, "held": held}


def sample(holder: str, live: int, workdir: str) -> dict[str, int]:
    path = tempfile.mktemp(suffix=".db", dir=workdir)
    out = subprocess.run(
        [sys.executable, __file__, "--child", holder, str(live), path],
        check=True, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(BENCH_DIR)}).stdout
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.unlink(path + suffix)
    return json.loads(out)


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--live", type=int, default=LIVE)
    parser.add_argument("--dir", default=str(BENCH_DIR / "out"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--record", action="store_true")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        holder, live, path = args.child
        print(json.dumps(child(holder, int(live), path)))
        return {}
    if args.quick:
        args.runs, args.live = 1, 50
    os.makedirs(args.dir, exist_ok=True)
    header("broker memory per live lease",
           f"{args.live:,} live leases of 64 pages over 200 qubes, "
           f"{args.runs} child processes per holder; RSS from /proc")
    results = {}
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as workdir:
        for holder in HOLDERS:
            samples = [sample(holder, args.live, workdir)
                       for _ in range(args.runs)]
            base = Stats.of([s["baseline"] / 2**20 for s in samples])
            per = Stats.of([(s["loaded"] - s["baseline"]) / args.live
                            for s in samples])
            results[holder] = {"baseline_mib": base.as_dict(),
                               "per_lease_bytes": per.as_dict()}
            rows.append([holder, f"{args.live:,}", base.fmt(1), per.fmt(0),
                         f"< {GOAL_BYTES}",
                         verdict(per.median < GOAL_BYTES)])
    print("cells: median [IQR] (min..max) over child processes")
    table(["holder", "live leases", "empty baseline RSS MiB",
           "bytes per live lease", "goal", ""], rows)
    data = {"goal_bytes": GOAL_BYTES, "live": args.live, "results": results}
    if args.record:
        record("memory", data)
    return data


if __name__ == "__main__":
    main()

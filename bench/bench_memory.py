#!/usr/bin/env python3
"""Broker memory (issue 7, item 5): resident memory per live lease at
10,000 live leases, against the same process's empty baseline. Goal: under
2 KiB per lease.

Why a fresh child process per sample: RSS is a property of a whole process
and only grows, so each sample starts from nothing: import, open an empty
registry, run every query once (baseline RSS), then hold LIVE leases and
query every qube's usage again (loaded RSS). (loaded - baseline) / LIVE is
the cost of a lease. Two holders are measured:

- registry: what the registry itself keeps (SQLite's page cache is bounded
  by its cache_size, so this should not grow with the lease count);
- registry+objects: the registry and every live lease also held as a
  lease.Lease in a dict (what a broker that caches live leases would pay).

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
HOLDERS = ("registry", "registry+objects")


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(holder: str, live: int, path: str) -> dict[str, int]:
    """Runs in the child: baseline, fill, loaded (bytes)."""
    import bench_broker as bb  # noqa: PLC0415 (the child's own import cost)
    from qubes_gpu_share.lease import LIVE as LIVE_STATES
    from qubes_gpu_share.registry import Registry

    def touch(reg: Registry) -> None:
        for consumer in bb.CONSUMERS:
            reg.consumer_usage(consumer.name)
        for provider in bb.PROVIDER_INFO:
            reg.provider_pages(provider.name)
        reg.in_flight()
        reg.past_deadline(0.0)

    with Registry(path) as reg:
        touch(reg)
        gc.collect()
        baseline = rss_bytes()
        bb.fill(reg, live)
        touch(reg)
        held = {}
        if holder == "registry+objects":
            held = {lease.id: lease for lease in reg.leases()
                    if lease.state in LIVE_STATES}
            assert len(held) == live, len(held)
        gc.collect()
        loaded = rss_bytes()
    return {"baseline": baseline, "loaded": loaded, "held": len(held)}


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

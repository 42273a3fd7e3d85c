#!/usr/bin/env python3
"""Registry disk benchmark (issue 12, item 1): what a qube looping
lease/release makes dom0's disk hold.

100,000 lease/release cycles of 8,192-page leases (a UHD frame each)
through the registry as the broker drives it: each cycle's five states,
the refs stored while active and dropped at the end, ended leases pruned
every 100 ends to the broker's default history (7 days, 10,000 ended
leases; a run this short keeps the 10,000 newest). The database and its
WAL are measured every 5,000 cycles. Reported: bytes on disk after
warm-up, bytes per cycle at steady state (the slope over the second half;
goal 0), and the bound (goal: under 64 MiB), beside the same cycles
without pruning (what the registry did before: growth without end).
Run: .venv/bin/python bench/bench_registry.py [--cycles N] [--record]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from common import header, record, table, verdict

from qubes_gpu_share import limits, names
from qubes_gpu_share.formats import PAGE_SIZE, ReceiveMode, blob_layout
from qubes_gpu_share.lease import Initiator, State, new_lease
from qubes_gpu_share.registry import Create, Registry, Transition

PAGES = 8_192
#: cycles committed together (the broker's group commit shares commits
#: between concurrent requests the same way)
BATCH = 50
SAMPLE_EVERY = 5_000
PRUNE_EVERY = 100
BOUND = 64 << 20


def _bytes(path: str) -> tuple[int, int]:
    sizes = [os.path.getsize(path + s) if os.path.exists(path + s) else 0
             for s in ("", "-wal")]
    return sizes[0], sizes[1]


def _batch(count: int, now: float) -> list:
    changes: list = []
    for _ in range(count):
        lease = new_lease(lease_id=names.new_lease_id(), consumer="work",
                          provider="sys-gpu", consumer_domid=7,
                          provider_domid=3, mode=ReceiveMode.CPU,
                          initiator=Initiator.LEASE,
                          meta=blob_layout(PAGES * PAGE_SIZE), ttl=600,
                          now=now)
        changes += [Create(lease),
                    Transition(lease.id, State.EXPORTING, "export asked"),
                    Transition(lease.id, State.ACTIVE, "granted",
                               tuple(range(8, 8 + PAGES))),
                    Transition(lease.id, State.RELEASING, "released"),
                    Transition(lease.id, State.RELEASED, "released")]
    return changes


def run(path: str, cycles: int, prune: bool) -> list[tuple[int, int, int]]:
    """(cycles done, database bytes, WAL bytes) every SAMPLE_EVERY."""
    history = limits.History()
    clock = [1_700_000_000.0]
    samples = []
    ended = 0
    with Registry(path, clock=lambda: clock[0]) as reg:
        for done in range(BATCH, cycles + 1, BATCH):
            clock[0] += 1.0
            reg.apply(_batch(BATCH, clock[0]))
            ended += BATCH
            if prune and ended >= PRUNE_EVERY:
                ended = 0
                while reg.prune(clock[0], keep_seconds=history.seconds,
                                keep_leases=history.leases) == 1000:
                    pass
            if done % SAMPLE_EVERY == 0:
                samples.append((done, *_bytes(path)))
    return samples


def slope(samples: list[tuple[int, int, int]]) -> float:
    """Bytes per cycle over the second half of the run (least squares)."""
    half = samples[len(samples) // 2:]
    xs = [s[0] for s in half]
    ys = [s[1] + s[2] for s in half]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    num = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
    den = sum((x - mean_x) ** 2 for x in xs) or 1.0
    return num / den


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100_000)
    parser.add_argument("--baseline-cycles", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.cycles, args.baseline_cycles = 2 * SAMPLE_EVERY, SAMPLE_EVERY
    header("registry on disk under endless lease/release cycles",
           f"{PAGES}-page leases, {BATCH} cycles per commit, pruned every "
           f"{PRUNE_EVERY} ends to the newest {limits.History().leases}")
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.monotonic()
        samples = run(os.path.join(tmp, "pruned.db"), args.cycles, True)
        took = time.monotonic() - started
        base = run(os.path.join(tmp, "unpruned.db"), args.baseline_cycles,
                   False)
    rows = [(f"{done:,}", f"{db:,}", f"{wal:,}", f"{db + wal:,}")
            for done, db, wal in samples]
    table(["cycles", "database bytes", "WAL bytes", "total"], rows)
    per_cycle = slope(samples)
    worst = max(db + wal for _, db, wal in samples)
    base_per_cycle = (base[-1][1] + base[-1][2]) / base[-1][0]
    print()
    table(["", "bytes per cycle (steady state)", "largest on disk",
           "goal"],
          [("pruned (the broker now)", f"{per_cycle:,.1f}", f"{worst:,}",
            f"0 per cycle, < {BOUND:,}: "
            f"{verdict(abs(per_cycle) < 16 and worst < BOUND)}"),
           ("not pruned (before)", f"{base_per_cycle:,.1f}",
            f"{base[-1][1] + base[-1][2]:,} after {base[-1][0]:,}", "-")])
    print(f"# {args.cycles:,} cycles in {took:.0f} s")
    results = {"cycles": args.cycles, "pages": PAGES,
               "samples": samples, "bytes_per_cycle": round(per_cycle, 1),
               "largest_bytes": worst, "bound_bytes": BOUND,
               "unpruned_bytes_per_cycle": round(base_per_cycle, 1),
               "seconds": round(took, 1)}
    if args.record:
        record("registry_disk", results)
    return results


if __name__ == "__main__":
    main()

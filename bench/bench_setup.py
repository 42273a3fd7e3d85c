#!/usr/bin/env python3
"""Lease setup (issue 7, item 2): from the application's request to a
usable fd in the consumer, at 1, 8 and 32 MiB, beside the floor for the
same size measured in the same run: memfd create, SCM_RIGHTS pass to
another process, mmap there, and one write to every page. Goal: at most 2x
the floor at 8 MiB and 1.3x at 32 MiB.

Both sides write the pages with one memset over the mapping (fdpass.fill),
so that the ratio is the project's own overhead. Samples alternate between
the floor and the lease, so both see the same load on this shared machine.

The lease side needs the simulated system (simsys) and the client; until
they exist this prints the floor alone and says so.

Run: .venv/bin/python bench/bench_setup.py [--quick] [--record]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from common import Stats, header, record, table, verdict
from fdpass import MiB, Peer, floor_setup

SIZES_MIB = (1, 8, 32)
GOALS = {8: 2.0, 32: 1.3}  # at most this many floors


def lease_side() -> Callable[[int], tuple[float, float]] | None:
    """(setup s, teardown s) of one real lease in the simulated system, or
    None while the simulated system and the client are not there."""
    try:
        import lease_setup  # noqa: PLC0415 (the lease side, once it lands)
    except ImportError:
        return None
    return lease_setup.one_lease


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES_MIB,
                        help="MiB")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.sizes = 2, [1]
    lease = lease_side()
    header("lease setup: request to a usable, written fd in the consumer",
           f"{args.runs} samples per size, floor and lease alternating; "
           f"pages written with one memset; shared 2-core machine: noisy"
           + ("" if lease else "; LEASE SIDE NOT AVAILABLE (no simsys/"
              "client yet): floor only"))
    results = []
    rows = []
    with Peer("consumer") as peer:
        for mib in args.sizes:
            size = mib * MiB
            floor_setup(peer, size)  # warm up
            floors, tears, leases, ratios = [], [], [], []
            for _ in range(args.runs):
                setup, teardown = floor_setup(peer, size)
                floors.append(setup * 1e3)
                tears.append(teardown * 1e3)
                if lease:
                    got = lease(size)[0] * 1e3
                    leases.append(got)
                    ratios.append(got / floors[-1])
            floor = Stats.of(floors)
            res = {"mib": mib, "floor_ms": floor.as_dict(),
                   "floor_teardown_ms": Stats.of(tears).as_dict()}
            goal = GOALS.get(mib)
            goal_text = f"<= {goal}x" if goal else "-"
            if lease:
                res["lease_ms"] = Stats.of(leases).as_dict()
                ratio = Stats.of(ratios)
                res["ratio"] = ratio.as_dict()
                rows.append([mib, floor.fmt(2), Stats.of(leases).fmt(2),
                             ratio.fmt(2), goal_text,
                             verdict(ratio.median <= goal) if goal else ""])
            else:
                rows.append([mib, floor.fmt(2), "not measured", "-",
                             goal_text, "pending"])
            results.append(res)
    print("cells: median [IQR] (min..max) over samples, milliseconds")
    table(["MiB", "floor setup ms", "lease setup ms", "lease / floor",
           "goal", ""], rows)
    data = {"goals": GOALS, "lease_measured": bool(lease),
            "results": results}
    if args.record:
        record("setup", data)
    return data


if __name__ == "__main__":
    main()

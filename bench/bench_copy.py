#!/usr/bin/env python3
"""Lease versus copy (issue 7, item 3): for one 3840x2160 XRGB8888 frame,
lease setup + teardown against copying that frame once, in process (memcpy
into a buffer that already exists) and to another process through a Unix
socket (what a proxy without sharing does for every frame). Frames to break
even = (setup + teardown) / one copy. Goals: at most 4 frames against the
in-process memcpy, under 1 against the cross-process copy, and zero bytes
copied per frame after setup.

Why the floor appears too: the floor (memfd + SCM_RIGHTS + mmap + a write
to every page, fdpass.floor_setup) is the least any sharing can cost; a
lease is the floor plus the broker, the agents and the grants. The floor is
shown with and without the write to every page: the copy baselines write
into buffers that already exist, while a fresh shared buffer pays its page
faults on first write, whoever does it (the producer's first frame or the
setup), so the honest comparison lies between the two. Until the
simulated system and the client exist, only the floor is compared.

Run: .venv/bin/python bench/bench_copy.py [--quick] [--record]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from bench_setup import lease_side
from common import Stats, header, record, repeat, table, verdict
from fdpass import FRAME_BYTES, Peer, copy, cross_process_copy, fill
from fdpass import floor_setup

GOAL_MEMCPY = 4.0   # frames, at most
GOAL_CROSS = 1.0    # frames, under


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--frame-bytes", type=int, default=FRAME_BYTES)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.frame_bytes = 2, 1 << 20
    size = args.frame_bytes
    lease = lease_side()
    header("lease versus copy of one frame",
           f"{size:,} bytes (3840x2160 XRGB8888 unless --frame-bytes), "
           f"{args.runs} samples each; shared 2-core machine: noisy"
           + ("" if lease else "; LEASE SIDE NOT AVAILABLE (no simsys/"
              "client yet): floor only"))
    src, dst = bytearray(size), bytearray(size)
    fill(src, 0x11)
    fill(dst, 0x22)  # both exist and are resident before timing
    ms = {"memcpy": [], "cross": [], "floor": [], "floor-untouched": []}
    lease_ms: list[float] = []
    with Peer("frames") as frames, Peer("consumer") as consumer:
        cross_process_copy(frames, dst)
        floor_setup(consumer, size)
        for _ in range(args.runs):
            ms["memcpy"] += [t * 1e3 for t in
                             repeat(lambda: copy(dst, src), 1, warmup=0)]
            ms["cross"].append(cross_process_copy(frames, dst) * 1e3)
            ms["floor"].append(sum(floor_setup(consumer, size)) * 1e3)
            ms["floor-untouched"].append(
                sum(floor_setup(consumer, size, touch=False)) * 1e3)
            if lease:
                lease_ms.append(sum(lease(size)) * 1e3)
    stats = {k: Stats.of(v) for k, v in ms.items()}
    print("cells: median [IQR] (min..max) over samples, milliseconds")
    table(["operation", "ms per frame or setup+teardown"],
          [["memcpy in process", stats["memcpy"].fmt(2)],
           ["copy to another process (Unix socket)", stats["cross"].fmt(2)],
           ["floor setup+teardown (memfd, SCM_RIGHTS, mmap, write)",
            stats["floor"].fmt(2)],
           ["floor setup+teardown without the page writes",
            stats["floor-untouched"].fmt(2)],
           ["lease setup+teardown",
            Stats.of(lease_ms).fmt(2) if lease else "not measured"]])
    sides = {"floor": stats["floor"],
             "floor-untouched": stats["floor-untouched"]}
    if lease:
        sides["lease"] = Stats.of(lease_ms)
    rows = []
    even = {}
    for name, side in sides.items():
        vs_memcpy = side.median / stats["memcpy"].median
        vs_cross = side.median / stats["cross"].median
        even[name] = {"memcpy": vs_memcpy, "cross": vs_cross}
        rows.append([name, f"{vs_memcpy:.2f}", f"<= {GOAL_MEMCPY:g}",
                     verdict(vs_memcpy <= GOAL_MEMCPY) if name == "lease"
                     else "(baseline)",
                     f"{vs_cross:.2f}", f"< {GOAL_CROSS:g}",
                     verdict(vs_cross < GOAL_CROSS) if name == "lease"
                     else "(baseline)"])
    print("frames to break even (medians): setup+teardown / one copy")
    table(["side", "vs memcpy", "goal", "", "vs cross-process", "goal", ""],
          rows)
    print("# bytes copied per frame after setup: 0 for a lease (the "
          "consumer maps the provider's pages); "
          f"{size:,} for either copy")
    data = {"frame_bytes": size, "lease_measured": bool(lease),
            "ms": {k: s.as_dict() for k, s in stats.items()},
            "break_even": even,
            "goals": {"memcpy": GOAL_MEMCPY, "cross": GOAL_CROSS}}
    if lease:
        data["ms"]["lease"] = Stats.of(lease_ms).as_dict()
    if args.record:
        record("copy", data)
    return data


if __name__ == "__main__":
    main()

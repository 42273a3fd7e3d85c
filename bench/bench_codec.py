#!/usr/bin/env python3
"""Codec benchmark (issue 7, item 4): encode and decode of the largest legal
messages, 65,535 grant refs. Goal: under 1 ms each.

Reports the median and spread (min .. max, and the interquartile range) of
per-call times over repeated runs, each run timing a batch of calls.
Its baseline is the goal itself (there is no cheaper way to move 65,535
refs than the u32 array the wire format already is).
Run: .venv/bin/python bench/bench_codec.py [--runs N] [--batch N] [--record]
"""

from __future__ import annotations

import argparse
import dataclasses

from common import Stats, header, record, repeat, table, verdict

from qubes_gpu_share import protocol as p
from qubes_gpu_share.formats import MAX_LEASE_PAGES, linear_layout

LEASE = "0123456789abcdef0123456789abcdef"


def largest_messages() -> dict[str, p._Message]:
    meta = dataclasses.replace(linear_layout(2048, 2048, "NV12"),
                               pages=MAX_LEASE_PAGES)
    refs = p.GrantRefs.from_ints(range(8, 8 + MAX_LEASE_PAGES))
    return {
        "export-answer": p.ExportAnswer(refs),
        "lease-answer": p.LeaseAnswer(LEASE, "sys-gpu", 7, p.ReceiveMode.CPU,
                                      meta, 1_800_000_000, refs),
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=31)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.batch = 2, 1

    cases = []
    largest = largest_messages()
    for name, message in largest.items():
        data = p.encode(message)
        cases += [
            (f"encode {name}", len(data), lambda m=message: p.encode(m)),
            (f"decode {name}", len(data),
             lambda d=data, t=type(message): p.decode(d, t, p.Error)),
            (f"frame_length {name}", len(data),
             lambda d=data: p.frame_length(d)),
        ]
    ints = list(range(MAX_LEASE_PAGES))
    cases.append(("GrantRefs.from_ints (provider side)", 4 * len(ints),
                  lambda: p.GrantRefs.from_ints(ints)))
    cases.append(("list(refs) (consumer side)", 4 * len(ints),
                  lambda r=largest["lease-answer"].refs: list(r)))

    header(f"codec: largest legal messages, {MAX_LEASE_PAGES} refs",
           f"{args.runs} runs x {args.batch} calls; goal < 1 ms each")
    rows, results = [], {}
    for label, size, func in cases:
        stats = Stats.of([t * 1e6 for t in
                          repeat(func, args.runs, args.batch)])
        results[label] = {"bytes": size, "us": stats.as_dict()}
        rows.append([label, f"{size:,}", stats.fmt(1), "< 1000",
                     verdict(stats.median < 1000)])
    print("cells: median [IQR] (min..max) over runs, microseconds per call")
    table(["operation", "bytes", "us per call", "goal us", ""], rows)
    data = {"goal_us": 1000, "results": results}
    if args.record:
        record("codec", data)
    return data

if __name__ == "__main__":
    main()

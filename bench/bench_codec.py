#!/usr/bin/env python3
"""Codec benchmark (issue 7, item 4): encode and decode of the largest legal
messages, 65,535 grant refs. Goal: under 1 ms each.

Reports the median and spread (min .. max, and the interquartile range) of
per-call times over repeated runs, each run timing a batch of calls.
Run: .venv/bin/python bench/bench_codec.py [--runs N] [--batch N]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import statistics
import time

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


def per_call_us(func, runs: int, batch: int) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(batch):
            func()
        samples.append((time.perf_counter() - start) / batch * 1e6)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=31)
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args()

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

    print(f"# qubes-gpu-share codec, {MAX_LEASE_PAGES} refs; "
          f"{platform.python_implementation()} {platform.python_version()}, "
          f"{platform.machine()}, {datetime.date.today()}; "
          f"{args.runs} runs x {args.batch} calls")
    print(f"{'operation':38} {'bytes':>7} {'median us':>10} "
          f"{'IQR us':>15} {'min..max us':>17} {'<1 ms':>6}")
    for label, size, func in cases:
        func()  # warm up
        samples = sorted(per_call_us(func, args.runs, args.batch))
        q1, median, q3 = statistics.quantiles(samples, n=4)
        print(f"{label:38} {size:>7} {median:>10.1f} "
              f"{q1:>7.1f}..{q3:<7.1f} {samples[0]:>8.1f}..{samples[-1]:<8.1f}"
              f" {'yes' if median < 1000 else 'NO':>6}")


if __name__ == "__main__":
    main()

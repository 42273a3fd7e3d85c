#!/usr/bin/env python3
"""Draw bench/results.png from bench/results.json: one panel per benchmark,
each with its goal as a line, so the picture says met or missed at a glance.
Run after the benchmarks (make bench does).
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common import BENCH_DIR, RESULTS  # noqa: E402


def broker(ax, data) -> None:
    variants = list(data["results"][0]["ratios"])
    sizes = [r["live"] for r in data["results"]]
    width = 0.8 / len(variants)
    for i, name in enumerate(variants):
        med = [r["ratios"][name]["median"] for r in data["results"]]
        err = [[m - r["ratios"][name]["q1"] for m, r in zip(med, data["results"])],
               [r["ratios"][name]["q3"] - m for m, r in zip(med, data["results"])]]
        ax.bar([x + i * width for x in range(len(sizes))], med, width,
               yerr=err, label=name)
    ax.axhline(data["goal"], color="red", ls="--", label=f"goal {data['goal']}")
    ax.set_xticks([x + width for x in range(len(sizes))],
                  [f"{s:,}" for s in sizes])
    ax.set(title="1. broker: cycles per floor commit", xlabel="live leases")
    ax.legend(fontsize=7)


def memory(ax, data) -> None:
    names = list(data["results"])
    med = [data["results"][n]["per_lease_bytes"]["median"] for n in names]
    ax.bar(names, med)
    ax.axhline(data["goal_bytes"], color="red", ls="--", label="goal")
    ax.set(title=f"5. memory per live lease at {data['live']:,} (bytes)")
    ax.legend(fontsize=7)


def setup(ax, data) -> None:
    mib = [r["mib"] for r in data["results"]]
    ax.plot(mib, [r["floor_ms"]["median"] for r in data["results"]], "o-",
            label="floor")
    if data["lease_measured"]:
        ax.plot(mib, [r["lease_ms"]["median"] for r in data["results"]],
                "s-", label="lease")
    ax.set(title="2. lease setup (ms, median)", xlabel="MiB", xscale="log",
           yscale="log")
    ax.legend(fontsize=7)


def copy(ax, data) -> None:
    names = list(data["ms"])
    ax.bar(names, [data["ms"][n]["median"] for n in names])
    ax.set(title="3. one UHD frame: copy vs setup+teardown (ms)")
    ax.tick_params(axis="x", labelsize=6, rotation=20)


def codec(ax, data) -> None:
    names = list(data["results"])
    ax.barh(names, [data["results"][n]["us"]["median"] for n in names])
    ax.axvline(data["goal_us"], color="red", ls="--", label="goal")
    ax.set(title="4. codec, 65,535 refs (us per call)")
    ax.tick_params(axis="y", labelsize=6)
    ax.legend(fontsize=7)


PANELS = {"broker": broker, "setup": setup, "copy": copy, "codec": codec,
          "memory": memory}


def main() -> int:
    try:
        results = json.loads(RESULTS.read_text())
    except FileNotFoundError:
        print(f"no {RESULTS}: run the benchmarks with --record first")
        return 1
    present = [name for name in PANELS if name in results]
    fig, axes = plt.subplots(len(present), 1,
                             figsize=(8, 3.2 * len(present)))
    for ax, name in zip(axes if len(present) > 1 else [axes], present):
        PANELS[name](ax, results[name])
    fig.tight_layout()
    out = BENCH_DIR / "results.png"
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

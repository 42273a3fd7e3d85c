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


def _grouped(ax, sizes, series, goal: float, title: str) -> None:
    """Bars per live-lease count, one per series ({label: [Stats dict per
    size]}), interquartile range as error bars, the goal as a line."""
    width = 0.8 / len(series)
    for i, (label, stats) in enumerate(series.items()):
        med = [s["median"] for s in stats]
        err = [[m - s["q1"] for m, s in zip(med, stats)],
               [s["q3"] - m for m, s in zip(med, stats)]]
        ax.bar([x + i * width for x in range(len(sizes))], med, width,
               yerr=err, label=label)
    ax.axhline(goal, color="red", ls="--", label=f"goal {goal}")
    ax.set_xticks([x + width * (len(series) - 1) / 2
                   for x in range(len(sizes))], [f"{s:,}" for s in sizes])
    ax.set(title=title, xlabel="live leases")
    ax.legend(fontsize=7)


def daemon(ax, data) -> None:
    rows = data["results"]
    sizes = sorted({r["live"] for r in rows})
    delays = sorted({r["qubesd_delay_ms"] for r in rows})
    series = {f"qubesd {d:g} ms": [
        next(r for r in rows if r["live"] == size and
             r["qubesd_delay_ms"] == d)["clients_16"]["per_floor_commit"]
        for size in sizes] for d in delays}
    _grouped(ax, sizes, series, data["goal"],
             "1a. broker daemon as shipped, 16 clients: cycles per floor "
             "commit")


def broker(ax, data) -> None:
    rows = data["results"]
    series = {name: [r["ratios"][name] for r in rows]
              for name in rows[0]["ratios"]}
    _grouped(ax, [r["live"] for r in rows], series, data["goal"],
             "1b. broker core: cycles per floor commit")


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


PANELS = {"daemon": daemon, "broker": broker, "setup": setup, "copy": copy,
          "codec": codec, "memory": memory}


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

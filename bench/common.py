"""What every benchmark shares: repeated timing, statistics, the machine
line, the table and the results file.

Why one module: issue 7 asks that every benchmark reports median and spread
over repeated runs, the sizes, the machine and the date, beside a baseline
measured in the same run. Writing that once keeps the benchmarks honest in
the same way and keeps their output comparable (docs/bench.md).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
#: The committed summary of the latest `make bench` (one key per benchmark).
RESULTS = BENCH_DIR / "results.json"


@dataclasses.dataclass(frozen=True)
class Stats:
    """Median and spread of a list of samples (any unit)."""

    median: float
    q1: float
    q3: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        ordered = sorted(samples)
        if len(ordered) == 1:
            only = ordered[0]
            return cls(only, only, only, only, only, 1)
        q1, median, q3 = statistics.quantiles(ordered, n=4,
                                              method="inclusive")
        return cls(median, q1, q3, ordered[0], ordered[-1], len(ordered))

    def fmt(self, digits: int = 1, scale: float = 1.0) -> str:
        """``median [q1..q3] (min..max)`` in one cell."""
        m, a, b, lo, hi = (v * scale for v in (self.median, self.q1,
                                               self.q3, self.low, self.high))
        return (f"{m:,.{digits}f} [{a:,.{digits}f}..{b:,.{digits}f}] "
                f"({lo:,.{digits}f}..{hi:,.{digits}f})")

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def repeat(func: Callable[[], object], runs: int,
           batch: int = 1, warmup: int = 1) -> list[float]:
    """Seconds per call of ``func``: ``runs`` samples of ``batch`` calls."""
    for _ in range(warmup):
        func()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(batch):
            func()
        samples.append((time.perf_counter() - start) / batch)
    return samples


def machine() -> dict[str, object]:
    """Cores, Python, kernel, date: printed with every table."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {
        "cores": os.cpu_count(),
        "python": f"{platform.python_implementation()} "
                  f"{platform.python_version()}",
        "kernel": platform.release(),
        "machine": platform.machine(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "load1": round(load, 2),
    }


def header(title: str, note: str = "") -> dict[str, object]:
    """Print the title and the machine line; return the machine facts."""
    facts = machine()
    print(f"# {title}")
    print(f"# {facts['cores']} cores, {facts['python']}, kernel "
          f"{facts['kernel']} {facts['machine']}, {facts['date']}, "
          f"load {facts['load1']}")
    if note:
        print(f"# {note}")
    return facts


def table(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """A Markdown table (so it can be pasted into docs/bench.md as is)."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max([len(col)] + [len(r[i]) for r in rows])
              for i, col in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths))
          + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths))
              + " |")
    sys.stdout.flush()


def record(name: str, data: dict[str, object],
           path: Path | None = None) -> None:
    """Merge one benchmark's results into the results file under ``name``.

    Benchmarks write only when asked (``--record``), so a smoke run or a
    quick experiment never overwrites the committed figures.
    """
    path = path or RESULTS
    try:
        everything = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        everything = {}
    everything[name] = {"machine": machine(), **data}
    path.write_text(json.dumps(everything, indent=1, sort_keys=True) + "\n")


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"

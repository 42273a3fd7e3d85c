#!/usr/bin/env python3
"""Run every fuzz target for a bounded time and report inputs and crashes.

Why one runner: issue 7 asks for a run of at least 1,000,000 inputs across
the targets with zero crashes (anything other than the parser's one
rejection exception), recorded with its count and time. Each target runs
in its own process (libFuzzer stops at the first crash, and a crash in one
parser must not hide the others); the counts are libFuzzer's own.

Run: .venv/bin/python fuzz/run_all.py [--seconds S] [--record]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(FUZZ_DIR.parent / "bench"))
from common import header, record, table  # noqa: E402

GOAL_INPUTS = 1_000_000
_DONE = re.compile(rb"Done (\d+) runs in (\d+) second")
_UNITS = re.compile(rb"stat::number_of_executed_units: (\d+)")


def targets() -> list[Path]:
    return sorted(FUZZ_DIR.glob("fuzz_*.py"))


def run(path: Path, seconds: int, runs: int | None) -> dict[str, object]:
    limit = [f"-runs={runs}"] if runs else [f"-max_total_time={seconds}"]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(path), *limit,
                           "-print_final_stats=1"],
                          capture_output=True, cwd=FUZZ_DIR, check=False)
    elapsed = time.perf_counter() - start
    units = _UNITS.findall(proc.stderr)
    inputs = int(units[-1]) if units else 0
    crash = proc.returncode != 0
    detail = ""
    if crash:
        lines = [l for l in proc.stderr.decode(errors="replace").splitlines()
                 if "Error" in l or "written to" in l]
        detail = " / ".join(lines[-2:])
    return {"target": path.stem, "inputs": inputs, "seconds": elapsed,
            "crash": crash, "detail": detail}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=30,
                        help="per target")
    parser.add_argument("--runs", type=int, help="inputs per target instead")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    subprocess.run([sys.executable, str(FUZZ_DIR / "make_seeds.py")],
                   check=True, capture_output=True)
    header("fuzzing: every parser of qube or application input",
           f"{args.runs} inputs per target" if args.runs else
           f"{args.seconds} s per target; atheris (libFuzzer)")
    results = [run(path, args.seconds, args.runs) for path in targets()]
    total = sum(r["inputs"] for r in results)
    seconds = sum(r["seconds"] for r in results)
    crashes = sum(r["crash"] for r in results)
    table(["target", "inputs", "seconds", "inputs/s", "crashes", "detail"],
          [[r["target"], f"{r['inputs']:,}", f"{r['seconds']:.0f}",
            f"{r['inputs'] / r['seconds']:,.0f}", int(r["crash"]),
            r["detail"] or "-"] for r in results])
    print(f"# total {total:,} inputs in {seconds:.0f} s, {crashes} targets "
          f"crashed; goal >= {GOAL_INPUTS:,} inputs with zero crashes: "
          f"{'met' if total >= GOAL_INPUTS and not crashes else 'MISSED'}")
    if args.record:
        record("fuzz", {"total_inputs": total, "seconds": seconds,
                        "crashed_targets": crashes, "targets": results})
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())

"""Every benchmark and fuzz target runs for a tiny count without error, so
they cannot rot. Not a measurement: nothing here is timed or compared.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHES = sorted(p.name for p in (REPO / "bench").glob("bench_*.py"))
sys.path[:0] = [str(REPO / "bench"), str(REPO / "fuzz")]


@pytest.mark.parametrize("script", BENCHES)
def test_benchmark_runs_quick(script, tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / script),
                          "--quick"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "cores" in out and "|" in out  # machine line and a table


def test_every_fuzz_target_takes_its_seeds_and_noise():
    import make_seeds  # noqa: PLC0415
    import random  # noqa: PLC0415

    seeds = make_seeds.seeds()
    targets = sorted(p.stem for p in (REPO / "fuzz").glob("fuzz_*.py"))
    assert {t.removeprefix("fuzz_") for t in targets} <= set(seeds)
    rnd = random.Random(7)
    for name in targets:
        target = importlib.import_module(name).target
        inputs = seeds[name.removeprefix("fuzz_")]
        assert inputs, name
        for data in inputs:
            target(data)
        for data in inputs[:5]:  # a few mutations: still no crash
            for _ in range(20):
                cut = rnd.randrange(len(data) + 1)
                target(data[:cut] + bytes([rnd.randrange(256)])
                       + data[cut + 1:])


def test_fuzz_runner_and_atheris_when_installed(tmp_path):
    pytest.importorskip("atheris")
    proc = subprocess.run([sys.executable, str(REPO / "fuzz" /
                                               "fuzz_names.py"),
                           "-runs=200"], capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]

"""Many qubes lease and release at once, through the real processes.

Each consumer qube runs its own agent process; one application per qube
does lease/release cycles against two providers, all qubes concurrently
(one thread each). Afterwards: zero errors, no lease left live, no grant
left in the simulator, every agent's and the hypervisor's open fds back to
their count at the start, every budget back to its start, no hazard.

`make test` runs 10 qubes x 20 cycles; the full 50 qubes x 200 cycles is
the second case (both marked slow; figures in docs/reliability.md).
"""

from __future__ import annotations

import concurrent.futures
import time

import pytest

from hostile_sim import (SMALL, app, assert_budgets_consistent, consumer,
                         fd_count, provider, settle, system, wait_fds)
from qubes_gpu_share.simsys import HYPERVISOR

PROVIDERS = ["gpu-a", "gpu-b"]


def cycles(sim, qube: str, count: int) -> list[str]:
    """*count* lease/release cycles; the errors, one line each."""
    errors = []
    with app(sim, qube) as qube_app:
        for index in range(count):
            try:
                buffer = qube_app.lease(PROVIDERS[index % 2], **SMALL)
                buffer.close()
            except Exception as exc:  # pylint: disable=broad-except
                errors.append(f"{qube} cycle {index}: {exc!r}")
    return errors


def watched_pids(sim) -> dict[str, int]:
    return {name: process.pid for name, process in sim.processes.items()
            if name.startswith("agent-") or name == HYPERVISOR}


@pytest.mark.slow
@pytest.mark.parametrize("qubes, count", [(10, 20), (50, 200)],
                         ids=["10x20", "50x200"])
def test_concurrent_qubes_leave_nothing_behind(tmp_path, qubes,
                                               count):
    names = [f"app{i}" for i in range(qubes)]
    everyone = [provider("gpu-a", 2), provider("gpu-b", 3),
                *(consumer(name, 10 + i) for i, name in enumerate(names))]
    with system(tmp_path, everyone, start_timeout=60) as sim:
        sim.observer()  # the test's own connection to the hypervisor
        pids = watched_pids(sim)
        fds_at_start = {name: fd_count(pid) for name, pid in pids.items()}
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(qubes) as pool:
            results = list(pool.map(lambda q: cycles(sim, q, count), names))
        seconds = time.monotonic() - started
        settle(sim)
        errors = [error for result in results for error in result]
        assert errors == []
        assert sim.live_leases() == []
        assert len(sim.leases()) == qubes * count
        assert_budgets_consistent(sim, PROVIDERS, {p: 0 for p in PROVIDERS})
        assert {sim.grant_stats(q).mapped_pages for q in names} == {0}
        assert wait_fds(pids, fds_at_start) == fds_at_start
    print(f"load: {qubes} qubes x {count} cycles = {qubes * count} cycles "
          f"in {seconds:.1f} s ({qubes * count / seconds:.0f} cycles/s)")

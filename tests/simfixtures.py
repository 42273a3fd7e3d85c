"""Fixtures shared by test modules that run one simulated system for the
whole module (simsys.SimSystem: real processes and sockets)."""

from __future__ import annotations

import pytest

from qubes_gpu_share.simsys import SimSystem


def module_system(name: str, qubes, policy):
    """A module-scoped ``system`` fixture running *qubes* under *policy*."""
    @pytest.fixture(scope="module")
    def system(tmp_path_factory):
        root = tmp_path_factory.mktemp(name) / "root"
        with SimSystem(root, qubes, policy) as sim:
            yield sim
    return system


def clean_after_each(message: str):
    """An autouse fixture: after each test no lease is live and the grant
    simulator saw no hazard; on failure the processes' logs are printed."""
    @pytest.fixture(autouse=True)
    def clean(system):
        yield
        try:
            system.wait_until(lambda: not system.live_leases(), 10, message)
            assert system.hazards() == []
        except (AssertionError, TimeoutError):
            print(system.log_tails())
            raise
    return clean

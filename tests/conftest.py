"""Test-wide set-up: where Qubes' own libraries come from.

Qubes' qubesadmin and qrexec Python packages are not on PyPI and may not be
committed anywhere, in this repository or beside it. Tests that need them
use the ``qubesadmin`` / ``qrexec`` fixtures below (and are marked
``qubes``): they run where the system has the packages (dom0), or where the
developer points QUBES_GPU_SHARE_QUBES_PATH at a folder holding copies of
them, and skip elsewhere (CI) with the reason. What CI still checks without
them is recorded as data (tests/data/policy-verdicts.json).
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
from hypothesis import settings

# Property tests judge behaviour, not speed: a deadline only makes them
# flaky on a loaded 2-core CI machine (speed is measured in bench/).
settings.register_profile("project", deadline=None)
settings.load_profile("project")

QUBES_PATH_VARIABLE = "QUBES_GPU_SHARE_QUBES_PATH"
#: how a developer gets the packages (docs/qrexec.md has the commands)
HOW_TO_GET = (
    f"copy the `qubesadmin` package of QubesOS/qubes-core-admin-client and "
    f"the `qrexec` package of QubesOS/qubes-core-qrexec into a folder "
    f"outside the repository and export {QUBES_PATH_VARIABLE}=FOLDER "
    f"(never commit them)")

# The Makefile exports the variable (the system's folder, or the one the
# developer exported); a bare `pytest` reads it from the environment.
_QUBES_PATH = os.environ.get(QUBES_PATH_VARIABLE, "")
if _QUBES_PATH and _QUBES_PATH not in sys.path:
    sys.path.append(_QUBES_PATH)


def _import_or_skip(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        where = (f"not in {QUBES_PATH_VARIABLE}={_QUBES_PATH}" if _QUBES_PATH
                 else f"no system copy and {QUBES_PATH_VARIABLE} is not set")
        pytest.skip(f"Qubes' {name} package is not available ({where}: "
                    f"{exc}); to run this test, {HOW_TO_GET}")


@pytest.fixture
def qubesadmin():
    """Qubes' own qubesadmin package (system, or QUBES_GPU_SHARE_QUBES_PATH)."""
    return _import_or_skip("qubesadmin")


@pytest.fixture
def qrexec():
    """Qubes' own qrexec package (system, or QUBES_GPU_SHARE_QUBES_PATH)."""
    return _import_or_skip("qrexec")


@pytest.fixture(autouse=True)
def _fresh_audit_limit(monkeypatch):
    """Each test starts with the broker's audit rate limit untouched (it is
    per process, and earlier tests' refusals would count)."""
    from qubes_gpu_share.broker import audit
    monkeypatch.setattr(audit, "LIMIT", audit.PerQubeLimit())

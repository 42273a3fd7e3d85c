"""Test-wide set-up: where Qubes' own libraries come from.

The Makefile exports QUBES_GPU_SHARE_QUBES_PATH: the folder holding the
system's qubesadmin/qrexec (dom0) or, elsewhere, the reference copies in
../shared/vendor. Tests that need them use the ``qubesadmin`` / ``qrexec``
fixtures below, which skip with the reason when neither exists.
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

_VENDOR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "vendor")
# Set by the Makefile; a bare `pytest` falls back to ../shared/vendor.
_QUBES_PATH = os.environ.get("QUBES_GPU_SHARE_QUBES_PATH",
                             os.path.abspath(_VENDOR)
                             if os.path.isdir(_VENDOR) else "")
if _QUBES_PATH and _QUBES_PATH not in sys.path:
    sys.path.append(_QUBES_PATH)


def _import_or_skip(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pytest.skip(f"Qubes' {name} package is not available (no system copy "
                    f"and no ../shared/vendor): {exc}")


@pytest.fixture
def qubesadmin():
    """Qubes' own qubesadmin package (system or ../shared/vendor)."""
    return _import_or_skip("qubesadmin")


@pytest.fixture
def qrexec():
    """Qubes' own qrexec package (system or ../shared/vendor)."""
    return _import_or_skip("qrexec")

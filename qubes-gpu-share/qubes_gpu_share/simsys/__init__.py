"""The simulated Qubes system of ``make demo`` and the end-to-end tests.

:mod:`.layout` writes the ROOT directory every simulated process reads,
:mod:`.processes` runs and watches one process, :mod:`.system` starts the
grant hypervisor, the broker and one agent per qube and observes them.
"""

from .layout import Layout, SimQube, build
from .processes import SimProcess, SimProcessError
from .system import BROKER, HYPERVISOR, OBSERVER_DOMID, SimSystem

__all__ = ["BROKER", "HYPERVISOR", "OBSERVER_DOMID", "Layout", "SimProcess",
           "SimProcessError", "SimQube", "SimSystem", "build"]

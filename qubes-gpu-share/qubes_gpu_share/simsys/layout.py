"""The simulated system's directory: what each simulated machine part sees.

A simulated Qubes system lives under one directory ROOT (the shared plan of
issue 5 fixes it, so that the broker, the agents and the tests agree)::

    ROOT/hv.sock                  the grant simulator ("hypervisor")
    ROOT/qubes.json               the qubes (qubes/memory.py's file format)
    ROOT/policy/                  qrexec policy for the simulated router
    ROOT/logs/NAME.log            stdout+stderr of each process
    ROOT/dom0/run/                the broker's sockets (broker.sock, ...)
    ROOT/dom0/leases.db           the broker's registry
    ROOT/QUBE/rpc/                the qube's /etc/qubes-rpc: socket-service
                                  symlinks to its agent.sock (dom0's to
                                  broker.sock)
    ROOT/QUBE/run/                agent.sock, app.sock
    ROOT/QUBE/qubes-service/      /run/qubes-service: gpu-share,
                                  gpu-share-provider

This module only writes files (no process is started here); every process
of the simulation builds the same qrexec router from ROOT alone
(:meth:`..qrexec.router.Router.from_root`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from collections.abc import Iterable, Mapping, Sequence

from ..grant.expected import VirtMode
from ..grant.open import KNOWN_WORDS
from ..limits import SERVICE_CONSUMER, SERVICE_PROVIDER
from ..names import DOM0, DOMID_FIRST_RESERVED, parse_qube_name
from ..qrexec.router import Router
from ..qubeinfo import VIRT_MODES

#: Services the broker serves in dom0 (the repo's qubes-rpc/dom0/).
DOM0_SERVICES = ("qubes.GpuLease", "qubes.GpuOffer", "qubes.GpuRelease",
                 "qubes.GpuLeases")
#: Services an agent serves in a qube (the repo's qubes-rpc/vm/).
QUBE_SERVICES = ("qubes.GpuExport", "qubes.GpuDeliver", "qubes.GpuRevoke")
#: Kernel traits the grant simulator knows (grant/open.py parse_traits).
#: grant/open.py's trait words besides the virt modes: a kernel (stock,
#: dmabuf, fixed: the project's series), single patches, swiotlb
KERNEL_TRAITS = tuple(word for word in KNOWN_WORDS
                      if word not in {mode.value for mode in VirtMode})

_MAX_MODEL = 1 << 20


@dataclasses.dataclass(frozen=True)
class SimQube:
    """One simulated qube, as a test or the demo describes it.

    ``services`` are qvm-service names (``gpu-share``, ``gpu-share-provider``);
    ``kernel`` lists grant-simulator traits besides the virt mode
    (``fixed``: the project's whole kernel series, kernel/; ``fix``: only
    the dma-buf receive fix; ``nodmabuf``/``stock``: no DMABUF ioctls;
    ``swiotlb``: a PV kernel with swiotlb-xen, which dom0 always has;
    grant/open.py lists them all).
    ``agent`` False: the qube exists for Qubes but runs no agent.
    """

    name: str
    xid: int
    virt_mode: str = "pvh"
    services: tuple[str, ...] = ()
    features: Mapping[str, str] = dataclasses.field(default_factory=dict)
    tags: tuple[str, ...] = ()
    kernel: tuple[str, ...] = ()
    running: bool = True
    agent: bool = True

    def __post_init__(self) -> None:
        parse_qube_name(self.name)
        if self.virt_mode not in VIRT_MODES:
            raise ValueError(f"qube {self.name}: virt_mode {self.virt_mode!r}")
        if not 0 <= self.xid < DOMID_FIRST_RESERVED:
            raise ValueError(f"qube {self.name}: domain id {self.xid}")
        unknown = set(self.kernel) - set(KERNEL_TRAITS)
        if unknown:
            raise ValueError(f"qube {self.name}: unknown kernel traits "
                             f"{sorted(unknown)}")

    @property
    def consumer(self) -> bool:
        return SERVICE_CONSUMER in self.services

    @property
    def provider(self) -> bool:
        return SERVICE_PROVIDER in self.services

    def grant_traits(self) -> str:
        """TRAITS of ``--grant sim:SOCKET:DOMID:TRAITS``."""
        traits = (self.virt_mode, *self.kernel)
        if self.xid == 0 and self.virt_mode == "pv" and "swiotlb" not in traits:
            traits += ("swiotlb",)      # the initial domain always has it
        return ",".join(traits)

    def model_entry(self, running: bool | None = None) -> dict:
        """This qube in qubes/memory.py's file format."""
        running = self.running if running is None else running
        entry = {"name": self.name, "running": running,
                 "xid": self.xid if running else -1,
                 "services": list(self.services),
                 "features": dict(self.features), "tags": list(self.tags)}
        if self.name != DOM0:
            entry["virt_mode"] = self.virt_mode
        return entry


class Layout:
    """Paths under ROOT (see the module docstring)."""

    def __init__(self, root: os.PathLike | str):
        self.root = pathlib.Path(root)

    hv_socket = property(lambda self: self.root / "hv.sock")
    qubes_file = property(lambda self: self.root / "qubes.json")
    policy_dir = property(lambda self: self.root / "policy")
    log_dir = property(lambda self: self.root / "logs")
    registry = property(lambda self: self.root / DOM0 / "leases.db")

    def qube_dir(self, qube: str) -> pathlib.Path:
        return self.root / parse_qube_name(qube)

    def rpc_dir(self, qube: str) -> pathlib.Path:
        return self.qube_dir(qube) / "rpc"

    def run_dir(self, qube: str) -> pathlib.Path:
        return self.qube_dir(qube) / "run"

    def services_dir(self, qube: str) -> pathlib.Path:
        return self.qube_dir(qube) / "qubes-service"

    def agent_socket(self, qube: str) -> pathlib.Path:
        return self.run_dir(qube) / "agent.sock"

    def app_socket(self, qube: str) -> pathlib.Path:
        return self.run_dir(qube) / "app.sock"

    def broker_socket(self, name: str = "broker.sock") -> pathlib.Path:
        """One of the broker's sockets: broker.sock, admin.sock,
        dom0-agent.sock."""
        return self.run_dir(DOM0) / name

    def log(self, process: str) -> pathlib.Path:
        return self.log_dir / f"{process}.log"

    def read_model(self) -> dict:
        with open(self.qubes_file, "rb") as file:
            data = file.read(_MAX_MODEL + 1)
        if len(data) > _MAX_MODEL:
            raise ValueError(f"{self.qubes_file}: too large")
        return json.loads(data)

    def write_model(self, model: Mapping) -> None:
        """Replace qubes.json atomically (a watcher never sees half)."""
        tmp = self.qubes_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(model, indent=1) + "\n")
        os.replace(tmp, self.qubes_file)

    def router(self, *, assume_yes_for_ask: bool = False) -> Router:
        """The simulated qrexec router of this system, as every process of
        it builds it (:meth:`.Router.from_root`)."""
        return Router.from_root(self.root,
                                assume_yes_for_ask=assume_yes_for_ask)


def build(root: os.PathLike | str, qubes: Sequence[SimQube],
          policy_files: Iterable[os.PathLike | str]) -> Layout:
    """Write ROOT for *qubes* (dom0 is implicit; list it to give it
    features) with the policy files copied into ROOT/policy."""
    layout = Layout(root)
    names = [q.name for q in qubes]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate qube names in {names}")
    xids = [q.xid for q in qubes if q.running]
    if len(set(xids)) != len(xids):
        raise ValueError(f"duplicate domain ids in {xids}")
    layout.policy_dir.mkdir(parents=True, exist_ok=True)
    layout.log_dir.mkdir(exist_ok=True)
    for path in policy_files:
        shutil.copy(path, layout.policy_dir)
    dom0 = [q.services for q in qubes if q.name == DOM0]
    _make_qube_dirs(layout, DOM0, DOM0_SERVICES, "broker.sock",
                    dom0[0] if dom0 else ())
    for qube in qubes:
        if qube.name != DOM0:
            _make_qube_dirs(layout, qube.name, QUBE_SERVICES, "agent.sock",
                            qube.services)
    layout.write_model({"qubes": [q.model_entry() for q in qubes]})
    return layout


def _make_qube_dirs(layout: Layout, qube: str, services: Sequence[str],
                    socket: str, qvm_services: Iterable[str]) -> None:
    for directory in (layout.rpc_dir(qube), layout.run_dir(qube),
                      layout.services_dir(qube)):
        directory.mkdir(parents=True, exist_ok=True)
    for service in services:
        # relative, like /etc/qubes-rpc -> /run/qubes-gpu-share, so that
        # ROOT can move
        (layout.rpc_dir(qube) / service).symlink_to(f"../run/{socket}")
    for name in qvm_services:
        (layout.services_dir(qube) / name).write_text("")

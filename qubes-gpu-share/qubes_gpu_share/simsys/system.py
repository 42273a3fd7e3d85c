"""A whole simulated Qubes system: hypervisor, broker, one agent per qube.

Used by ``make demo`` and the end-to-end tests::

    with SimSystem(tmp, [SimQube("sys-gpu", 2, "hvm", ("gpu-share-provider",)),
                         SimQube("work", 3, services=("gpu-share",))],
                   policy_files=[...]) as system:
        ...                                   # talk to system.app_socket("work")
        assert system.hazards() == []

Each part is a separate process started with the command line a packager
would use (``python -m qubes_gpu_share.broker`` / ``.agent``), pointed at
ROOT (see :mod:`.layout`). Nothing here imports the broker or the agent: the
simulation meets them only through their command lines and sockets.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterable, Sequence

from ..formats import PAGE_SIZE
from ..grant.open import parse_traits
from ..grant.sim import SimGrantDevice, SimStats
from ..lease import Lease
from ..names import DOM0, MAX_DOMID
from ..registry import Registry
from .layout import SimQube, build
from .pattern import first_difference
from .processes import (SimProcess, SimProcessError, child_env,
                        python_module)

log = logging.getLogger(__name__)

HYPERVISOR = "hypervisor"
BROKER = "broker"
#: The domain id the test harness uses to ask the hypervisor questions; no
#: simulated qube may have it.
OBSERVER_DOMID = MAX_DOMID


class SimSystem:
    """Build ROOT and run the processes of the simulated system.

    *qubes* describe the qubes (dom0 is implicit unless listed, e.g. to give
    it features or run its agent). *table_entries* shrinks every simulated
    grant table (0: Xen's default). *broker_args* / *agent_args* are extra
    command-line options for those daemons.
    """

    def __init__(self, root: os.PathLike | str, qubes: Sequence[SimQube],
                 policy_files: Iterable[os.PathLike | str], *,
                 table_entries: int = 0, broker_args: Sequence[str] = (),
                 agent_args: Sequence[str] = (), start_timeout: float = 15.0):
        if any(q.xid == OBSERVER_DOMID for q in qubes):
            raise ValueError(f"domain id {OBSERVER_DOMID} is the observer's")
        self.qubes = {q.name: q for q in qubes}
        self.layout = build(root, qubes, policy_files)
        self.processes: dict[str, SimProcess] = {}
        self._table_entries = table_entries
        self._broker_args = list(broker_args)
        #: a command the broker runs under (``prlimit --nofile=N --``)
        self.broker_wrapper: list[str] = []
        self._agent_args = list(agent_args)
        self._timeout = start_timeout
        self._observer: SimGrantDevice | None = None

    # -- life ------------------------------------------------------------

    def __enter__(self) -> SimSystem:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Hypervisor, broker, then an agent in every running qube."""
        self.start_hypervisor()
        self.start_broker()
        for qube in self.qubes.values():
            if qube.agent and qube.running:
                self.start_agent(qube.name)

    def stop(self) -> None:
        """Stop everything, agents first and the hypervisor last."""
        if self._observer is not None:
            self._observer.close()
            self._observer = None
        order = [n for n in self.processes if n not in (BROKER, HYPERVISOR)]
        for name in [*order, BROKER, HYPERVISOR]:
            process = self.processes.get(name)
            if process is not None:
                process.stop()

    def start_hypervisor(self) -> SimProcess:
        args = [str(self.layout.hv_socket)]
        if self._table_entries:
            args += ["--table-entries", str(self._table_entries)]
        return self._start(HYPERVISOR,
                           python_module("qubes_gpu_share.grant.sim",
                                         "serve", *args),
                           self.layout.hv_socket)

    def start_broker(self) -> SimProcess:
        """Start (or restart, after :meth:`kill`) the dom0 broker."""
        layout = self.layout
        argv = python_module(
            "qubes_gpu_share.broker",
            "--registry", str(layout.registry),
            "--run-dir", str(layout.run_dir(DOM0)),
            "--qubes", f"memory:{layout.qubes_file}",
            "--sim-router", str(layout.root),
            "--dom0-agent-socket",
            str(layout.run_dir(DOM0) / "service.sock"),
            *self._broker_args)
        return self._start(BROKER, [*self.broker_wrapper, *argv],
                           layout.broker_socket())

    def start_agent(self, qube: str) -> SimProcess:
        """Start (or restart) the agent of *qube* as that domain."""
        info = self.qubes[qube]
        layout = self.layout
        grant = f"sim:{layout.hv_socket}:{info.xid}:{info.grant_traits()}"
        argv = python_module(
            "qubes_gpu_share.agent", "--name", qube,
            "--run-dir", str(layout.run_dir(qube)),
            "--services-dir", str(layout.services_dir(qube)),
            "--grant", grant, "--allocator", "memfd",
            "--qrexec", f"sim:{layout.root}", *self._agent_args)
        if qube == DOM0:
            argv += ["--dom0", "--broker-socket",
                     str(layout.run_dir(DOM0) / "dom0-agent.sock")]
        # app.sock comes up after the service socket (agent.sock, or
        # service.sock for dom0's agent)
        return self._start(f"agent-{qube}", argv, layout.app_socket(qube))

    def _start(self, name: str, argv: list[str], socket) -> SimProcess:
        old = self.processes.get(name)
        if old is not None and old.running():
            raise SimProcessError(f"{name} is already running")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket)  # a crashed process leaves its socket behind
        process = SimProcess(name, argv, self.layout.log(name), child_env())
        self.processes[name] = process
        process.wait_socket(socket, self._timeout)
        return process

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Crash one process (``broker``, ``agent-QUBE``, ``hypervisor``)."""
        self.processes[name].kill(sig)

    def agent(self, qube: str) -> SimProcess:
        return self.processes[f"agent-{qube}"]

    # -- qube life -------------------------------------------------------

    def set_running(self, qube: str, running: bool) -> None:
        """Start or shut down *qube* in qubes.json (the broker's memory
        backend follows the file and emits the events Qubes would)."""
        model = self.layout.read_model()
        info = self.qubes[qube]
        model["qubes"] = [info.model_entry(running) if q["name"] == qube
                          else q for q in model["qubes"]]
        self.layout.write_model(model)

    def shutdown_qube(self, qube: str, timeout: float = 10.0) -> None:
        """Shut *qube* down as Xen and Qubes would, then wait (bounded) until
        the broker, hearing domain-shutdown, ended the qube's leases.

        A dying domain's own mappings go with it, but the pages it granted
        stay until its peers unmapped them (Xen keeps the domain until
        then). The simulator ends grants when their agent exits, so the
        agent of a qube that grants pages to a live lease exits only after
        the broker revoked them (its consumers let go first); any other
        agent is killed before the event, as its domain dies."""
        process = self.processes.get(f"agent-{qube}")
        granting = any(lease.provider == qube
                       for lease in self.live_leases(qube))
        if process is not None and not granting:
            process.kill()  # dies with its domain, telling nobody
        self.set_running(qube, False)
        self.wait_until(lambda: not self.live_leases(qube), timeout,
                        f"the broker did not end {qube}'s leases")
        if process is not None:
            process.stop()

    def start_qube(self, qube: str) -> None:
        self.set_running(qube, True)
        if self.qubes[qube].agent:
            self.start_agent(qube)

    # -- observation -----------------------------------------------------

    def app_socket(self, qube: str) -> str:
        """The application socket of *qube*'s agent (a "qube shell")."""
        return str(self.layout.app_socket(qube))

    def observer(self) -> SimGrantDevice:
        """A device of the observer domain, for questions to the
        hypervisor (hazards, stats of any domain)."""
        if self._observer is None:
            self._observer = SimGrantDevice(str(self.layout.hv_socket),
                                            OBSERVER_DOMID)
        return self._observer

    def hazards(self) -> list[str]:
        """Every release-order hazard the hypervisor saw (want: none)."""
        return self.observer().hazards()

    def check_dmabuf(self, qube: str, fd: int, pages: int,
                     expected: bytes) -> int | None:
        """Compare the pages behind a dma-buf fd that *qube* received with
        *expected* (:func:`.pattern.first_difference`).

        A received dma-buf has no mmap (it is for a GPU driver) and cannot
        be granted on (Xen refuses), so this asks the simulator for the
        pages behind it, read-only: what a driver import would read.
        """
        info = self.qubes[qube]
        device = SimGrantDevice(str(self.layout.hv_socket), info.xid,
                                parse_traits(info.grant_traits()))
        try:
            with device.received_pages(fd) as pixels:
                if len(pixels) != pages * PAGE_SIZE:
                    raise ValueError(f"the dma-buf has "
                                     f"{len(pixels) // PAGE_SIZE} pages, "
                                     f"not {pages}")
                return first_difference(pixels, expected)
        finally:
            device.close()

    def grant_stats(self, qube: str) -> SimStats:
        return self.observer().stats(self.qubes[qube].xid)

    def leases(self, *, live_only: bool = False) -> list[Lease]:
        """The broker's registry, read from the test's side (after the
        broker committed what it already told the qubes)."""
        self.flush_broker()
        with Registry(str(self.layout.registry)) as registry:
            return registry.leases(live_only=live_only)

    def live_leases(self, qube: str | None = None) -> list[Lease]:
        return [lease for lease in self.leases(live_only=True)
                if qube is None or qube in (lease.consumer, lease.provider)]

    def provider_pages(self, provider: str) -> int:
        """Pages charged to *provider*'s budget right now."""
        self.flush_broker()
        with Registry(str(self.layout.registry)) as registry:
            return registry.provider_pages(provider)

    def flush_broker(self) -> None:
        """Have a running broker commit the changes that ride on its next
        commit (an answer may leave before its ``active`` is on disk,
        docs/registry.md): any admin request does so first. A broker that
        is not running (or not answering) has nothing more to write."""
        process = self.processes.get("broker")
        if process is None or not process.running():
            return
        with contextlib.suppress(OSError), \
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.layout.broker_socket("admin.sock")))
            sock.sendall(b'{"op": "stats"}\n')
            while sock.recv(65536):
                pass

    def logs(self) -> dict[str, str]:
        """Every process's log so far, by process name."""
        return {name: process.log_text()
                for name, process in self.processes.items()}

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(process.log_tail(lines)
                         for process in self.processes.values())

    @staticmethod
    def wait_until(condition, timeout: float, what: str | Callable[[], str],
                   interval: float = 0.02) -> None:
        """Poll *condition* until true; raise TimeoutError(*what*) if not
        (*what* may be a function: then it says what was left, at the
        time out)."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                said = what() if callable(what) else what
                raise TimeoutError(f"{said} within {timeout:g} s")
            time.sleep(interval)

"""``qubes-gpu-share-agent``: the per-qube agent daemon (both roles).

In a qube it serves dom0's calls on ``/run/qubes-gpu-share/agent.sock``
(the /etc/qubes-rpc symlinks point there) and applications on
``app.sock`` beside it. As dom0's own agent (``--dom0``, opt-in) it runs as
its own user, apart from the broker: the broker calls it on
``/run/qubes-gpu-share-dom0/service.sock``, it calls the broker on
``/run/qubes-gpu-share/dom0-agent.sock``, and applications reach it on the
socket systemd creates for it (socket activation: dom0's users are in
group ``qubes``, which this agent is not in, so it could not give them the
file itself). Logs one line per event to stderr (the journal under
systemd). :func:`run_agent` starts it from parsed options, for tests and
the simulated system.
"""

from __future__ import annotations

import argparse
import asyncio
import grp
import logging
import os
import pathlib
import pwd
import signal
import socket
import subprocess
import sys
from collections.abc import MutableMapping, Sequence

from ..alloc import (Allocator, DmaHeapAllocator, MemfdAllocator,
                     UdmabufAllocator)
from ..grant import this_domain
from ..grant.open import open_grant_device
from ..qrexec.call import ClientVmCaller
from .appserver import AppServer, PeerPolicy
from .broker_link import BrokerLink, LocalSocketCaller, sim_caller
from .daemon import Agent
from .roles import Roles
from .services import make_server

log = logging.getLogger("qubes_gpu_share.agent")

RUN_DIR = "/run/qubes-gpu-share"
#: dom0's agent's own run directory (its unit's RuntimeDirectory, group
#: qubes-gpu-share-dom0, of which the broker is a member)
DOM0_RUN_DIR = "/run/qubes-gpu-share-dom0"
#: the broker's socket for dom0's agent, in the broker's run directory
DOM0_BROKER_SOCKET = "/run/qubes-gpu-share/dom0-agent.sock"
SERVICES_DIR = "/run/qubes-service"
#: the first fd systemd passes to a socket-activated service (sd_listen_fds)
LISTEN_FDS_START = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qubes-gpu-share-agent",
        description="Grant and receive GPU buffers for this qube, as the "
                    "dom0 broker of qubes-gpu-share directs.")
    add = parser.add_argument
    add("--name", help="this qube's name (default: qubesdb-read /name)")
    add("--run-dir", default=None,
        help=f"where the sockets go (default {RUN_DIR}; with --dom0 "
             f"{DOM0_RUN_DIR})")
    add("--services-dir", default=SERVICES_DIR,
        help="Qubes services enabled at boot: gpu-share (consumer), "
             "gpu-share-provider (provider)")
    add("--grant", default=None,
        help="grant device: 'real' or sim:SOCKET:DOMID[:TRAITS] (default: "
             "$QUBES_GPU_SHARE_GRANT or real)")
    add("--allocator", default="auto",
        choices=("auto", "udmabuf", "dma-heap", "memfd", "gntalloc"),
        help="where a provider's buffers come from (default auto: udmabuf, "
             "else the system dma-heap, else gntalloc pages)")
    add("--qrexec", default="client-vm",
        help="how to call dom0: client-vm or sim:ROOT")
    add("--dom0", action="store_true",
        help="run as dom0's agent: serve the broker on RUN_DIR/service.sock "
             "and call it on its local socket")
    add("--broker-socket", default=DOM0_BROKER_SOCKET,
        help="with --dom0: the broker's socket (default %(default)s)")
    add("--app-user", action="append", default=[],
        help="a user allowed on app.sock (repeatable)")
    add("--app-group", default=None,
        help="group owning app.sock; its members are allowed")
    add("--revoke-wait", type=float, default=5.0, metavar="SECONDS",
        help="how long a revoke waits for applications to let go before "
             "it answers busy")
    add("--verbose", "-v", action="store_true")
    return parser


def choose_allocator(name: str, simulated: bool,
                     sys_root: str = this_domain.SYS_ROOT,
                     proc_root: str = this_domain.PROC_ROOT
                     ) -> Allocator | None:
    """The buffer source; None means gntalloc pages (no dma-buf source).

    Where this kernel would grant a dma-buf's wrong frames (a PV domU,
    expected.dmabuf_grant_refusal) every dma-buf source is passed over,
    whatever was asked for: gntalloc pages still work there."""
    if simulated:
        return MemfdAllocator()
    refusal = this_domain.grant_refusal(
        sys_root, proc_root, frames_check=_kernel_grants_own_frames)
    if refusal is not None:
        if name != "gntalloc":
            log.warning("allocator %s not used, granting gntalloc pages: %s",
                        name, refusal.reason)
        return None
    if name == "memfd":
        return MemfdAllocator()
    candidates: list[Allocator] = {
        "udmabuf": [UdmabufAllocator()],
        "dma-heap": [DmaHeapAllocator("/dev/dma_heap/system")],
        "gntalloc": [],
        "auto": [UdmabufAllocator(),
                 DmaHeapAllocator("/dev/dma_heap/system")]}[name]
    for allocator in candidates:
        availability = allocator.availability()
        if availability.ok:
            return allocator
        log.info("allocator %s unavailable: %s", allocator.name,
                 availability.reason)
    return None


def _kernel_grants_own_frames() -> bool | None:
    """The real kernel's answer (grant/gntdev.py), None where the native
    helper is not built: the kernel cannot be asked."""
    try:
        from ..grant.gntdev import kernel_grants_own_frames_once
    except ImportError:
        return None
    return kernel_grants_own_frames_once()


def qube_name(given: str | None) -> str:
    if given:
        return given
    return subprocess.run(["qubesdb-read", "/name"], capture_output=True,
                          check=True, text=True).stdout.strip()


def broker_caller(options: argparse.Namespace, name: str):
    if options.dom0:
        return LocalSocketCaller(options.broker_socket)
    if options.qrexec.startswith("sim:"):
        return sim_caller(options.qrexec[len("sim:"):], name)
    if options.qrexec != "client-vm":
        raise ValueError(f"--qrexec {options.qrexec!r}: expected client-vm "
                         f"or sim:ROOT")
    return ClientVmCaller()


def peer_policy(options: argparse.Namespace) -> tuple[PeerPolicy, int | None]:
    uids = frozenset(pwd.getpwnam(user).pw_uid for user in options.app_user)
    gid = grp.getgrnam(options.app_group).gr_gid if options.app_group \
        else None
    return PeerPolicy(uids, frozenset() if gid is None else {gid}), gid


def service_socket(options: argparse.Namespace) -> tuple[pathlib.Path, int]:
    """The socket dom0 calls this agent on, and its mode. In a qube
    agent.sock, 0600: qrexec-agent (root) is the only caller. dom0's
    agent's service.sock, 0660 with the agent's own group
    (qubes-gpu-share-dom0), which the broker is a member of."""
    if options.dom0:
        return pathlib.Path(options.run_dir or DOM0_RUN_DIR, "service.sock"), \
            0o660
    return pathlib.Path(options.run_dir or RUN_DIR, "agent.sock"), 0o600


def activated_socket(environ: MutableMapping[str, str] = os.environ,
                     pid: int | None = None,
                     first_fd: int = LISTEN_FDS_START
                     ) -> socket.socket | None:
    """The application socket systemd passed (socket activation, as
    sd_listen_fds(3): LISTEN_PID names this process), else None. The
    variables are removed either way, so that the programs the agent runs
    do not take them for theirs. It must be one listening SEQPACKET Unix
    socket (qubes-gpu-share-dom0-agent.socket)."""
    listen_pid = environ.pop("LISTEN_PID", None)
    count = environ.pop("LISTEN_FDS", None)
    environ.pop("LISTEN_FDNAMES", None)
    if listen_pid is None or listen_pid != str(pid or os.getpid()):
        return None
    if count != "1":
        raise ValueError(f"systemd passed {count} sockets, expected one "
                         "(app.sock)")
    sock = socket.socket(fileno=first_fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET \
            or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ValueError("the socket systemd passed is not a listening "
                         "SEQPACKET Unix socket (ListenSequentialPacket=)")
    sock.set_inheritable(False)
    return sock


def check_can_own(gid: int | None, name: str | None) -> None:
    """Giving app.sock to group ``name`` takes membership (or root): say
    so before trying, rather than with chown's EPERM."""
    if gid is None or os.geteuid() == 0 or gid == os.getegid() \
            or gid in os.getgroups():
        return
    raise ValueError(f"cannot give app.sock to group {name}, which this agent "
                     "is not in: dom0's agent gets it from systemd "
                     "(qubes-gpu-share-dom0-agent.socket)")


async def run_agent(options: argparse.Namespace,
                    started: asyncio.Event | None = None,
                    stop: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set (or SIGTERM/SIGINT in the main program)."""
    name = qube_name(options.name)
    grant_spec = options.grant if options.grant is not None else \
        os.environ.get("QUBES_GPU_SHARE_GRANT", "")
    device = open_grant_device(grant_spec)
    allocator = choose_allocator(options.allocator,
                                 grant_spec.startswith("sim:"))
    if options.dom0:
        # dom0 has no /run/qubes-service: its roles are its features
        # (qvm-service dom0 gpu-share...), which the broker checks on every
        # request it routes to this agent (decide.py).
        roles = Roles.decided_by_broker()
    elif options.services_dir != SERVICES_DIR:
        roles = Roles(options.services_dir)
    else:
        roles = Roles.with_qubesdb(options.services_dir)
    agent = Agent(name, device, allocator,
                  BrokerLink(broker_caller(options, name)), roles)
    agent.consumer.revoke_wait = options.revoke_wait
    service_path, service_mode = service_socket(options)
    run_dir = service_path.parent
    run_dir.mkdir(parents=True, exist_ok=True)
    policy, gid = peer_policy(options)
    listening = activated_socket()
    if listening is None:
        check_can_own(gid, options.app_group)
        app_path = run_dir / "app.sock"
    else:
        app_path = pathlib.Path(listening.getsockname())
    services = make_server(agent, service_path, service_mode)
    apps = AppServer(agent, app_path, policy, gid, listening)
    stop = stop or asyncio.Event()
    try:
        await services.start()
        await apps.start()
        # leases from before a restart are dead (the old agent's mappings
        # died with it): hand them back now rather than at their TTL
        agent.reconciler.request()
        log.info("agent of %s ready (allocator %s) on %s and %s", name,
                 allocator.name if allocator else "gntalloc", service_path,
                 app_path)
        if started is not None:
            started.set()
        await stop.wait()
    finally:
        await apps.close()
        await services.close()
        agent.close()
        device.close()


def main(argv: Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if options.verbose else logging.INFO,
        format="%(name)s: %(levelname)s: %(message)s", stream=sys.stderr)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await run_agent(options, stop=stop)

    try:
        asyncio.run(run())
    except (OSError, ValueError, KeyError,
            subprocess.CalledProcessError) as exc:
        log.error("cannot run: %s", exc)
        return 1
    return 0


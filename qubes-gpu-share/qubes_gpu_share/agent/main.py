"""``qubes-gpu-share-agent``: the per-qube agent daemon (both roles).

Serves dom0's calls on ``RUN_DIR/agent.sock`` (the /etc/qubes-rpc symlinks
point there; ``dom0-agent-service.sock`` with ``--dom0``) and applications on
``RUN_DIR/app.sock``. Logs one line per event to stderr (the journal under
systemd). :func:`run_agent` starts it from parsed options, for tests and the
simulated system.
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
import subprocess
import sys
from collections.abc import Sequence

from ..alloc import (Allocator, DmaHeapAllocator, MemfdAllocator,
                     UdmabufAllocator)
from ..grant import this_domain
from ..grant.open import open_grant_device
from ..qrexec.call import ClientVmCaller
from .appserver import AppServer, PeerPolicy
from .broker_link import BrokerLink, LocalSocketCaller, sim_caller
from .daemon import Agent, Roles
from .services import make_server

log = logging.getLogger("qubes_gpu_share.agent")

RUN_DIR = "/run/qubes-gpu-share"
SERVICES_DIR = "/run/qubes-service"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qubes-gpu-share-agent",
        description="Grant and receive GPU buffers for this qube, as the "
                    "dom0 broker of qubes-gpu-share directs.")
    add = parser.add_argument
    add("--name", help="this qube's name (default: qubesdb-read /name)")
    add("--run-dir", default=RUN_DIR, help="where the sockets go")
    add("--services-dir", default=SERVICES_DIR,
        help="Qubes services enabled at boot: gpu-share (consumer), "
             "gpu-share-provider (provider)")
    add("--grant", default=None,
        help="grant device: 'real' or sim:SOCKET:DOMID[:TRAITS] (default: "
             "$QUBES_GPU_SHARE_GRANT or real)")
    add("--allocator", default="auto",
        choices=("auto", "udmabuf", "dma-heap", "memfd", "gntalloc"))
    add("--qrexec", default="client-vm",
        help="how to call dom0: client-vm or sim:ROOT")
    add("--dom0", action="store_true",
        help="run as dom0's agent: call the broker on its local socket")
    add("--broker-socket", default=None,
        help="with --dom0: the broker's socket (default RUN_DIR/"
             "dom0-agent.sock)")
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
    refusal = this_domain.grant_refusal(sys_root, proc_root)
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


def qube_name(given: str | None) -> str:
    if given:
        return given
    return subprocess.run(["qubesdb-read", "/name"], capture_output=True,
                          check=True, text=True).stdout.strip()


def broker_caller(options: argparse.Namespace, name: str):
    if options.dom0:
        return LocalSocketCaller(options.broker_socket or os.path.join(
            options.run_dir, "dom0-agent.sock"))
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
    run_dir = pathlib.Path(options.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    service_sock = "dom0-agent-service.sock" if options.dom0 else \
        "agent.sock"
    policy, gid = peer_policy(options)
    services = make_server(agent, run_dir / service_sock)
    apps = AppServer(agent, run_dir / "app.sock", policy, gid)
    stop = stop or asyncio.Event()
    try:
        await services.start()
        await apps.start()
        # leases from before a restart are dead (the old agent's mappings
        # died with it): hand them back now rather than at their TTL
        agent.reconciler.request()
        log.info("agent of %s ready (allocator %s) on %s", name,
                 allocator.name if allocator else "gntalloc", run_dir)
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


"""``qubes-gpu-share-broker``: the dom0 daemon, its options and set-up.

Serves three sockets in ``--run-dir``: broker.sock (the qrexec socket
services, /etc/qubes-rpc/qubes.Gpu* point here), dom0-agent.sock (dom0's
own agent, group ``--dom0-agent-group``: the caller is always dom0, refused
unless dom0 is opted in) and admin.sock (``qvm-gpu-share``). At start it
serves the admin socket, connects to qubesd's events, reconciles the
registry against fresh facts, and only then opens the qubes' sockets; it
follows qube events and lease deadlines until SIGTERM. If the event
follower or the expiry timer stops, it exits with status 1 (systemd
restarts it). Logs go to stderr, which is the journal under systemd.

For the simulated system (``make demo``, end-to-end tests): ``--qubes
memory:ROOT/qubes.json --sim-router ROOT`` calls the qubes' agents through
the simulated qrexec router (each qube's service sockets in ROOT/QUBE/rpc)
and follows qube starts and shutdowns written to qubes.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import grp
import logging
import os
import pathlib
import resource
import signal
import sys
from collections.abc import Sequence

from .. import limits
from ..names import DOM0
from ..qrexec import service
from ..qrexec.service import SocketServiceServer
from ..qubes.facts import QubesFacts
from ..registry import DEFAULT_PATH, Registry
from . import audit
from .admin import AdminApi, AdminServer
from .agents import DOM0_AGENT_SOCKET, IN_ALL, Agents
from .core import Broker
from .follow import Follower, Stopped
from .lag import LagMonitor
from .services import BrokerServices

log = logging.getLogger("qubes_gpu_share.broker")
DEFAULT_RUN_DIR = "/run/qubes-gpu-share"
#: the group of dom0 users allowed to use Qubes' admin sockets
QUBES_GROUP = "qubes"
#: the dom0 agent's own group (not qubes: it may not reach qubesd)
DOM0_AGENT_GROUP = "qubes-gpu-share-dom0"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qubes-gpu-share-broker",
        description="The dom0 broker of qubes-gpu-share: decides, records "
                    "and revokes buffer leases between qubes.")
    parser.add_argument("--registry", default=DEFAULT_PATH, metavar="PATH",
                        help="lease database (default: %(default)s)")
    parser.add_argument("--run-dir", default=DEFAULT_RUN_DIR, metavar="DIR",
                        help="where broker.sock, dom0-agent.sock and "
                             "admin.sock are created (default: %(default)s)")
    parser.add_argument("--qubes", default="admin",
                        metavar="admin|memory:FILE|qubesd:SOCKET",
                        help="facts about qubes: qubesadmin, the "
                             "in-memory model in FILE (simulation), or "
                             "qubesadmin talking to a qubesd at SOCKET (the "
                             "simulation's stand-in; benchmarks)")
    parser.add_argument("--sim-router", metavar="ROOT",
                        help="call qubes' services through the simulated "
                             "qrexec router of the simulated system ROOT")
    parser.add_argument("--dom0-agent-socket", default=DOM0_AGENT_SOCKET,
                        metavar="PATH", help="dom0's agent service socket "
                                             "(default: %(default)s)")
    parser.add_argument("--dom0-agent-group", default=DOM0_AGENT_GROUP,
                        metavar="GROUP",
                        help="group of dom0-agent.sock, the dom0 agent's "
                             "(default: %(default)s; %(prog)s falls back "
                             "to group qubes when it does not exist)")
    history = limits.History()
    parser.add_argument("--history-days", type=_positive, metavar="DAYS",
                        default=history.seconds / 86_400,
                        help="keep ended leases and their history this "
                             "long (default: %(default)g; the journal "
                             "keeps the audit trail)")
    parser.add_argument("--retry-max", type=_positive, metavar="SECONDS",
                        default=60.0,
                        help="longest wait between two tries to end a lease "
                             "a side has not let go of (backoff from 1 s; "
                             "default: %(default)g)")
    parser.add_argument("--history-leases", type=int, metavar="N",
                        default=history.leases,
                        help="keep at most the N newest ended leases "
                             "(default: %(default)s)")
    parser.add_argument("--lag-monitor", action="store_true",
                        help="measure the event loop's lag (a 1 ms timer); "
                             "qvm-gpu-share stats shows it")
    parser.add_argument("--debug", action="store_true",
                        help="log debug messages")
    return parser


def make_facts(options: argparse.Namespace) -> QubesFacts:
    """The Qubes-facts backend named by --qubes (and --sim-router)."""
    if options.qubes == "admin":
        from ..qubes.admin import AdminQubes  # qubesadmin only in dom0
        return AdminQubes()
    if options.qubes.startswith("qubesd:"):
        from ..qubes.admin import AdminQubes
        handler = None if options.sim_router is None else \
            sim_router_handler(options.sim_router)
        return AdminQubes.over_socket(options.qubes[len("qubesd:"):],
                                      service_handler=handler)
    from ..qubes.memory import MemoryQubes
    path = memory_file(options)
    if options.sim_router is None:
        return MemoryQubes.from_file(path)
    return MemoryQubes.from_file(path, service_handler=sim_router_handler(
        options.sim_router))


def memory_file(options: argparse.Namespace) -> str | None:
    """FILE of ``--qubes memory:FILE``; None for qubesadmin."""
    if options.qubes == "admin" or options.qubes.startswith("qubesd:"):
        return None
    if not options.qubes.startswith("memory:"):
        raise ValueError(f"--qubes must be admin, memory:FILE or "
                         f"qubesd:SOCKET, not {options.qubes!r}")
    return options.qubes[len("memory:"):]


def sim_router_handler(root: str):
    """dom0's calls through the simulated router of ``root``."""
    from ..qrexec.router import Router
    caller = Router.from_root(root).caller(DOM0)

    async def handler(qube: str, service: str, payload: bytes):
        return await caller.call_service(qube, service, payload, 1 << 20)
    return handler


def call_caps(nofile: int | None = None) -> tuple[int, int]:
    """(calls served at once in all, per calling qube) within this
    process's fd limit: each call holds one fd; connections not identified
    yet (a few BACKLOGs at most: qrexec/service.py), the calls out to
    qubes (qrexec-client: up to 4 fds each), the database and the sockets
    need theirs. The unit's LimitNOFILE=4096 gives the full caps."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    reserve = IN_ALL * 4 + 4 * service.BACKLOG + 64
    total = max(8, min(service.MAX_CALLS, nofile - reserve))
    return total, min(service.MAX_CALLS_PER_SOURCE, total)


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _gid(*names: str) -> int | None:
    """The first of the groups that exists, None if none does."""
    for name in names:
        try:
            return grp.getgrnam(name).gr_gid
        except KeyError:
            continue
    return None


@dataclasses.dataclass
class Daemon:
    """The broker, its follower and its servers, built from the options.

    ``admin`` serves from the start; ``services`` (the qubes' sockets) only
    once the follower trusts what it knows about qubes."""

    broker: Broker
    follower: Follower
    admin: AdminServer
    services: list
    #: the in-memory model's file, followed for qube start and shutdown
    model_file: str | None = None
    lag: LagMonitor | None = None

    async def close(self) -> None:
        for server in [*self.services, self.admin]:
            await server.close()
        await self.broker.aclose()
        self.broker.registry.close()


def build(options: argparse.Namespace) -> Daemon:
    """Everything, not started (tests and the simulation use this)."""
    facts = make_facts(options)
    broker = Broker(Registry(options.registry), facts,
                    Agents(facts, dom0_socket=options.dom0_agent_socket),
                    history=limits.History(options.history_days * 86_400,
                                           options.history_leases),
                    retry_max=options.retry_max)
    services = BrokerServices(broker)
    run_dir = pathlib.Path(options.run_dir)
    gid = _gid(QUBES_GROUP)
    lag = LagMonitor() if options.lag_monitor else None
    max_calls, max_per_source = call_caps()
    log.info("serving at most %d calls at once, %d per qube", max_calls,
             max_per_source)
    caps = dict(max_calls=max_calls, max_per_source=max_per_source,
                on_refused=services.refused_call)
    return Daemon(broker, Follower(broker),
                  AdminServer(str(run_dir / "admin.sock"),
                              AdminApi(broker, lag), mode=0o660, group=gid), [
        SocketServiceServer(run_dir / "broker.sock", services.handlers(),
                            mode=0o660, group=gid, **caps),
        SocketServiceServer(run_dir / "dom0-agent.sock",
                            services.dom0_handlers(), mode=0o660,
                            group=_gid(options.dom0_agent_group,
                                       QUBES_GROUP), **caps)],
        memory_file(options), lag)


async def serve(options: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT (0), or until a task the broker cannot do
    without stopped (1)."""
    os.makedirs(options.run_dir, exist_ok=True)
    daemon = build(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await daemon.admin.start()
    runner = asyncio.create_task(run_broker(daemon))
    try:
        ready = asyncio.create_task(daemon.follower.ready.wait())
        await asyncio.wait({ready, runner},
                           return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            for server in daemon.services:
                await server.start()
            log.info("broker ready in %s", options.run_dir)
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({stopping, runner},
                           return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        stopping.cancel()
        if runner.done():
            return _runner_failed(runner)
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError, Stopped):
            await runner
        return 0
    finally:
        await daemon.close()
        log.info("broker stopped")


def _runner_failed(runner: asyncio.Task) -> int:
    error = runner.exception()
    log.error("broker stopping: %s", error if isinstance(error, Stopped)
              else repr(error))
    return 1


async def run_broker(daemon: Daemon) -> None:
    """Events and expiry; with ``memory:FILE``, also the file's qube starts
    and shutdowns (the simulation's stand-in for qubesd's events)."""
    jobs = [daemon.follower.run()]
    if daemon.lag is not None:
        jobs.append(daemon.lag.run())
    if daemon.model_file is not None:
        jobs.append(daemon.broker.facts.follow_file(daemon.model_file))
    await asyncio.gather(*jobs)


def main(argv: Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if options.debug else logging.INFO,
        stream=sys.stderr, format="%(name)s: %(message)s")
    audit.to_journal()
    try:
        return asyncio.run(serve(options))
    except (OSError, ValueError) as exc:
        log.error("cannot run: %s", exc)
        return 1

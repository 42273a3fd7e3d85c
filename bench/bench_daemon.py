#!/usr/bin/env python3
"""The broker daemon as shipped (issue 15, item 4): lease grant+release
cycles per second through the broker *process*, started as its unit starts
it (``python -m qubes_gpu_share.broker``, its follower and expiry timer
running, the registry's writer thread), its facts read through qubesadmin
from a stand-in qubesd that speaks the Admin API's wire format on a Unix
socket and takes a set time per call (simsys/qubesd.py; what a real dom0's
qubesd costs: docs/bench.md), the providers' agents real processes
answering through the simulated qrexec router's sockets and granting in
the simulated grant table, the consumers calling broker.sock with the
descriptor qrexec writes.

Reported per live-lease count (10, 1,000, 10,000) and qubesd delay (0.5,
2, 5 ms), for 1 and 16 concurrent clients: cycles per second, cycles per
floor commit (fsync'd SQLite commits on the same disk, measured in the
same run), qubesd calls per cycle, and the event loop's lag p50/p99 during
the cycles (the daemon's --lag-monitor). Goal: with 16 clients and qubesd
at 2 ms, at least 0.4 cycles per floor commit at every size, and lag p99
under 10 ms at 10,000 live leases.

qubesadmin is not on PyPI: where it cannot be imported (CI), the same
daemon runs with its in-memory facts (--qubes memory:) and the table says
so. Run: .venv/bin/python bench/bench_daemon.py [--quick] [--record]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from bench_broker import floor_commits
from common import BENCH_DIR, Stats, header, record, table, verdict

from qubes_gpu_share import names, protocol, unixserver
from qubes_gpu_share.formats import BlobSpec, PAGE_SIZE, ReceiveMode, \
    blob_layout
from qubes_gpu_share.lease import Initiator, State, new_lease
from qubes_gpu_share.protocol import LeaseAnswer, LeaseRequest, Ok, \
    ReleaseRequest
from qubes_gpu_share.qrexec import reply
from qubes_gpu_share.qrexec.descriptor import ServiceDescriptor
from qubes_gpu_share.qubes.memory import MemoryQubes
from qubes_gpu_share.qubes.qubesd import QubesdFacts
from qubes_gpu_share.registry import Create, Registry, Transition
from qubes_gpu_share.simsys import SimQube, SimSystem
from qubes_gpu_share.simsys.processes import python_module
from qubes_gpu_share.simsys.qubesd import StandInQubesd

GOAL = 0.4
LAG_GOAL_MS = 10.0
PROVIDERS = 4
CONSUMERS = 60
PAGES = 4
SIZES = [10, 1_000, 10_000]
DELAYS_MS = [0.5, 2.0, 5.0]
CLIENTS = [1, 16]
REPO = pathlib.Path(__file__).resolve().parents[1]
REQUEST = protocol.encode(LeaseRequest(BlobSpec(PAGES * PAGE_SIZE),
                                       ReceiveMode.CPU, 86_400))
ALLOW = ("qubes.GpuLease * @anyvm @adminvm allow\n"
         "qubes.GpuRelease * @anyvm @adminvm allow\n"
         "qubes.GpuLeases * @anyvm @adminvm allow\n")


def qubes_path() -> str | None:
    """Where qubesadmin comes from: the system, or the folder the
    developer named (QUBES_GPU_SHARE_QUBES_PATH); None: not here."""
    if importlib.util.find_spec("qubesadmin") is not None:
        return ""
    path = os.environ.get("QUBES_GPU_SHARE_QUBES_PATH", "")
    if path and (pathlib.Path(path) / "qubesadmin").is_dir():
        return path
    return None


def _qubes() -> list[SimQube]:
    providers = [SimQube(f"gpu{i}", 2 + i, "hvm", ("gpu-share-provider",),
                         features={"gpu-share-budget-pages": "1000000",
                                   "gpu-share-pair-pages": "1000000"})
                 for i in range(PROVIDERS)]
    consumers = [SimQube(f"app{i}", 10 + i, "pvh", ("gpu-share",),
                         features={"gpu-share-quota-leases": "1024",
                                   "gpu-share-quota-pages": "262144"},
                         agent=False)
                 for i in range(CONSUMERS)]
    return providers + consumers


def _pair(i: int) -> tuple[str, str]:
    return f"app{i % CONSUMERS}", f"gpu{i % PROVIDERS}"


def fill(sim: SimSystem, live: int, facts) -> None:
    """``live`` active leases bound to the domains the facts name."""
    domains = {name: facts.qube(name) for name in sim.qubes}
    changes: list = []
    with Registry(str(sim.layout.registry)) as reg:
        for i in range(live):
            consumer, provider = (domains[q] for q in _pair(i))
            lease = new_lease(
                lease_id=names.new_lease_id(), consumer=consumer.name,
                provider=provider.name, consumer_domid=consumer.xid,
                provider_domid=provider.xid, mode=ReceiveMode.CPU,
                initiator=Initiator.LEASE, meta=blob_layout(PAGES * 4096),
                ttl=86_400, now=time.time(), consumer_start=consumer.start,
                provider_start=provider.start)
            changes += [Create(lease),
                        Transition(lease.id, State.EXPORTING, "fill"),
                        Transition(lease.id, State.ACTIVE, "fill",
                                   tuple(range(8, 8 + PAGES)))]
            if len(changes) >= 3000:
                reg.apply(changes)
                changes = []
        if changes:
            reg.apply(changes)


def _admin(sim: SimSystem, request: dict) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(60)
        sock.connect(str(sim.layout.broker_socket("admin.sock")))
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


async def _call(path: str, source: str, service: str, body: bytes) -> bytes:
    reader, writer = await unixserver.open_unix_connection(path)
    name, _, arg = service.partition("+")
    writer.write(ServiceDescriptor(name, arg, source, "keyword",
                                   "adminvm").encode() + body)
    writer.write_eof()
    answer = await reader.read()
    writer.close()
    return answer


async def _client(path: str, first: int, step: int, cycles: int) -> None:
    for i in range(cycles):
        consumer, provider = _pair(first + i * step)
        answer = protocol.decode(reply.parse_reply(await _call(
            path, consumer, f"qubes.GpuLease+{provider}", REQUEST)),
            LeaseAnswer)
        released = protocol.decode(reply.parse_reply(await _call(
            path, consumer, "qubes.GpuRelease",
            protocol.encode(ReleaseRequest(answer.lease)))), Ok)
        assert released == Ok()


#: Where a cycle's CPU goes, by process group (seconds of user+system
#: time from /proc): the broker, the providers' agents, the stand-in
#: qubesd, the simulated hypervisor, and this process's clients.
CPU_GROUPS = ("broker", "agents", "qubesd", "hypervisor", "clients")


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_group(sim: SimSystem, standin: int | None) -> dict[str, float]:
    """CPU seconds used so far by each of CPU_GROUPS."""
    used = dict.fromkeys(CPU_GROUPS, 0.0)
    for name, process in sim.processes.items():
        group = "agents" if name.startswith("agent-") else name
        if group in used:
            used[group] += _cpu_seconds(process.pid)
    if standin is not None:
        used["qubesd"] = _cpu_seconds(standin)
    used["clients"] = time.process_time()
    return used


def measure(sim: SimSystem, clients: int, cycles: int,
            standin: int | None = None) -> dict:
    """One run of ``clients`` clients doing ``cycles`` cycles in all."""
    path = str(sim.layout.broker_socket())
    before = _admin(sim, {"op": "stats", "reset": True})
    per_client = max(1, cycles // clients)

    async def run() -> None:
        await asyncio.gather(*(_client(path, c, clients, per_client)
                               for c in range(clients)))
    cpu_before = cpu_by_group(sim, standin)
    started = time.perf_counter()
    asyncio.run(run())
    elapsed = time.perf_counter() - started
    cpu_after = cpu_by_group(sim, standin)
    after = _admin(sim, {"op": "stats"})
    done = per_client * clients
    qubesd = after["qubesd_calls"]
    return {"cycles_per_s": done / elapsed,
            "cpu_ms_per_cycle": {
                group: 1000 * (cpu_after[group] - cpu_before[group]) / done
                for group in CPU_GROUPS},
            "commits_per_cycle": (after["commits"] - before["commits"])
            / done,
            "qubesd_calls_per_cycle": None if qubesd is None else
            (qubesd - before["qubesd_calls"]) / done,
            "lag": after["loop_lag"]}


def _standin(sim: SimSystem, delay_ms: float) -> subprocess.Popen:
    sock = str(sim.layout.root / "qubesd.sock")
    proc = subprocess.Popen(
        python_module("qubes_gpu_share.simsys.qubesd", sock,
                      str(sim.layout.qubes_file), "--delay",
                      str(delay_ms / 1000)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while not os.path.exists(sock):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("the stand-in qubesd did not start")
        time.sleep(0.05)
    return proc


def one_system(workdir: str, size: int, delay_ms: float | None,
               runs: int, cycles: int) -> dict:
    """A fresh system with ``size`` live leases; ``runs`` samples of each
    client count, a floor measured before each."""
    root = tempfile.mkdtemp(prefix=f"daemon-{size}-", dir=workdir)
    policy = pathlib.Path(root) / "30-bench.policy"
    policy.write_text(ALLOW)
    args = ["--lag-monitor", "--retry-max", "5"]
    sim = SimSystem(pathlib.Path(root) / "sys", _qubes(),
                    [policy, REPO / "policy" / "60-gpu-share.policy"],
                    broker_args=args, start_timeout=120)
    standin = None
    model = MemoryQubes.from_file(str(sim.layout.qubes_file))
    if delay_ms is not None:
        sim._broker_args += ["--qubes", "qubesd:" + str(sim.layout.root
                                                        / "qubesd.sock")]
        standin = _standin(sim, delay_ms)
        view = StandInQubesd(model)
        facts = QubesdFacts(view.call, view.listen)
    else:
        facts = model
    fill(sim, size, facts)
    results: dict[int, list] = {c: [] for c in CLIENTS}
    floors = []
    try:
        with sim:
            # warm-up: every qube read once (a cold read is 4 calls and
            # one per gpu-share feature; steady state is what is measured)
            measure(sim, 16, max(CONSUMERS, 16) * 2)
            for _ in range(runs):
                floors.append(floor_commits(os.path.join(root, "floor.db"),
                                            200))
                for clients in CLIENTS:
                    results[clients].append(measure(
                        sim, clients, cycles,
                        standin.pid if standin is not None else None))
    finally:
        if standin is not None:
            standin.terminate()
            standin.wait(10)
        shutil.rmtree(root, ignore_errors=True)
    floor = Stats.of(floors)
    out = {"live": size, "qubesd_delay_ms": delay_ms,
           "floor": floor.as_dict()}
    for clients, samples in results.items():
        rates = [s["cycles_per_s"] for s in samples]
        out[f"clients_{clients}"] = {
            "cycles_per_s": Stats.of(rates).as_dict(),
            "per_floor_commit": Stats.of([r / f for r, f in
                                          zip(rates, floors)]).as_dict(),
            "commits_per_cycle": Stats.of(
                [s["commits_per_cycle"] for s in samples]).median,
            "qubesd_calls_per_cycle": samples[-1]["qubesd_calls_per_cycle"],
            "lag_p50_ms": Stats.of([s["lag"]["p50_ms"] for s in samples
                                    if s["lag"]]).median,
            "lag_p99_ms": Stats.of([s["lag"]["p99_ms"] for s in samples
                                    if s["lag"]]).median,
            "cpu_ms_per_cycle": {group: Stats.of(
                [s["cpu_ms_per_cycle"][group] for s in samples]).median
                for group in CPU_GROUPS}}
    return out


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cycles", type=int, default=160)
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--delays", type=float, nargs="+",
                        default=DELAYS_MS, help="qubesd ms per call")
    parser.add_argument("--dir", default=str(BENCH_DIR / "out"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.cycles, args.sizes, args.delays = 1, 16, [10], [2.0]
    path = qubes_path()
    if path:
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [path, os.environ.get("PYTHONPATH")]))
        sys.path.append(path)
    delays: list[float | None] = list(args.delays) if path is not None \
        else [None]
    facts_note = ("facts: qubesadmin -> stand-in qubesd (wire format)"
                  if path is not None else
                  "facts: IN MEMORY (qubesadmin is not importable here: "
                  "set QUBES_GPU_SHARE_QUBES_PATH)")
    header("the broker daemon as shipped: grant+release cycles",
           f"{PROVIDERS} providers (agent processes), {CONSUMERS} consumers,"
           f" {PAGES} pages/lease, {args.runs} runs x {args.cycles} cycles; "
           f"{facts_note}")
    os.makedirs(args.dir, exist_ok=True)
    results = [one_system(args.dir, size, delay, args.runs, args.cycles)
               for size in args.sizes for delay in delays]
    rows = []
    for res in results:
        for clients in CLIENTS:
            cell = res[f"clients_{clients}"]
            ratio = Stats(**cell["per_floor_commit"])
            rows.append([
                f"{res['live']:,}",
                "memory" if res["qubesd_delay_ms"] is None
                else f"{res['qubesd_delay_ms']:g} ms", clients,
                Stats(**cell["cycles_per_s"]).fmt(0), ratio.fmt(2),
                f"{cell['commits_per_cycle']:.2f}",
                "-" if cell["qubesd_calls_per_cycle"] is None
                else f"{cell['qubesd_calls_per_cycle']:.2f}",
                f"{cell['lag_p50_ms']:.2f} / {cell['lag_p99_ms']:.2f}",
                " / ".join(f"{cell['cpu_ms_per_cycle'][group]:.1f}"
                           for group in CPU_GROUPS),
                verdict(ratio.median >= GOAL) if clients > 1 else "-"])
    print("cells: median [IQR] (min..max) over runs; lag in ms")
    table(["live", "qubesd/call", "clients", "cycles/s",
           "per floor commit", "commits/cycle", "qubesd calls/cycle",
           "loop lag p50 / p99", "CPU ms/cycle: " + " / ".join(CPU_GROUPS),
           f"goal >= {GOAL} (16 clients)"], rows)
    data = {"goal": GOAL, "lag_goal_ms": LAG_GOAL_MS,
            "facts": "qubesd" if path is not None else "memory",
            "results": results}
    if args.record:
        record("daemon", data)
    return data


if __name__ == "__main__":
    main()

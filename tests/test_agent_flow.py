"""The agent over real sockets and the grant simulator.

Two agents (a provider qube and a consumer qube) run in this process with
their own simulated grant devices; dom0 is a small stand-in broker here
(the real broker and its end-to-end tests are elsewhere) serving
qubes.GpuLease and qubes.GpuRelease through the simulated qrexec router.
Applications are the blocking client library, run in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import types

import pytest

from qubes_gpu_share import client as client_lib
from qubes_gpu_share.agent.broker_link import sim_caller
from qubes_gpu_share.agent.main import build_parser, run_agent
from qubes_gpu_share.formats import PAGE_SIZE, ImageSpec, layout_for
from qubes_gpu_share.grant.sim import SimGrantDevice
from qubes_gpu_share.grant.sim import hypervisor as run_hypervisor
from qubes_gpu_share.names import new_lease_id
from qubes_gpu_share.protocol import (Error, ExportAnswer, ExportRequest,
                                      LeaseAnswer, LeaseRequest, Ok,
                                      ReleaseRequest, RevokeAnswer,
                                      RevokeRequest, RevokeStatus, Role,
                                      decode, encode, max_size_for)
from qubes_gpu_share.qrexec import call, reply, stream
from qubes_gpu_share.qrexec.service import SocketServiceServer

_domids = itertools.count(200)
SPEC = ImageSpec(64, 32, "XR24")


@pytest.fixture(scope="module")
def hv(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hv") / "hv.sock")
    with run_hypervisor(path):
        yield path


@pytest.fixture
def hazards(hv):
    with SimGrantDevice(hv, next(_domids)) as watcher:
        start = len(watcher.hazards())
        yield lambda: len(watcher.hazards()) - start


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class StandInBroker:
    """Just enough of dom0 to drive the agents: pull leases, releases."""

    def __init__(self, root, domids):
        self.root, self.domids = root, domids
        self.leases: dict[str, tuple[str, str]] = {}
        self.caller = None  # once every qube's rpc directory exists

    async def call_agent(self, qube, service, message, *expected):
        payload = await call.call(self.caller, qube, service, encode(message),
                                  max_size_for(*expected, Error))
        return decode(payload, *expected, Error)

    async def gpu_lease(self, descriptor, reader, writer):
        request = decode(await stream.read_to_eof(reader, 4096), LeaseRequest)
        provider, consumer = descriptor.argument, descriptor.source
        meta, lease = layout_for(request.spec), new_lease_id()
        answer = await self.call_agent(provider, "qubes.GpuExport",
                                       ExportRequest(lease, consumer,
                                                     self.domids[consumer],
                                                     meta), ExportAnswer)
        if isinstance(answer, Error):
            writer.write(reply.ok_reply(encode(answer)))
            return
        self.leases[lease] = (provider, consumer)
        writer.write(reply.ok_reply(encode(LeaseAnswer(
            lease, provider, self.domids[provider], request.mode, meta,
            12345, answer.refs))))

    async def gpu_release(self, descriptor, reader, writer):
        request = decode(await stream.read_to_eof(reader, 4096),
                         ReleaseRequest)
        provider, _consumer = self.leases.pop(request.lease)
        await self.revoke_side(provider, request.lease, Role.PROVIDER)
        writer.write(reply.ok_reply(encode(Ok())))

    async def revoke_side(self, qube, lease, role) -> RevokeAnswer:
        return await self.call_agent(qube, "qubes.GpuRevoke",
                                     RevokeRequest(lease, role), RevokeAnswer)


@contextlib.asynccontextmanager
async def running_system(root, hv):
    """ROOT with dom0 (stand-in broker), a provider 'gpu', a consumer
    'work', an allow-all policy; yields a namespace of handles."""
    (root / "policy").mkdir()
    (root / "policy" / "50-test.policy").write_text(
        "* * @anyvm @adminvm allow\n")
    domids = {"dom0": 0, "gpu": next(_domids), "work": next(_domids)}
    broker = StandInBroker(root, domids)
    (root / "dom0" / "rpc").mkdir(parents=True)
    server = SocketServiceServer(root / "dom0" / "broker.sock", {
        "qubes.GpuLease": broker.gpu_lease,
        "qubes.GpuRelease": broker.gpu_release})
    await server.start()
    for service in ("qubes.GpuLease", "qubes.GpuRelease"):
        os.symlink(root / "dom0" / "broker.sock",
                   root / "dom0" / "rpc" / service)
    stop, agents = asyncio.Event(), []
    for qube, service in (("gpu", "gpu-share-provider"),
                          ("work", "gpu-share")):
        for sub in ("rpc", "run", "qubes-service"):
            (root / qube / sub).mkdir(parents=True)
        (root / qube / "qubes-service" / service).touch()
        for name in ("qubes.GpuExport", "qubes.GpuDeliver",
                     "qubes.GpuRevoke"):
            os.symlink(root / qube / "run" / "agent.sock",
                       root / qube / "rpc" / name)
        options = build_parser().parse_args([
            "--name", qube, "--run-dir", str(root / qube / "run"),
            "--services-dir", str(root / qube / "qubes-service"),
            "--grant", f"sim:{hv}:{domids[qube]}", "--qrexec", f"sim:{root}",
            "--revoke-wait", "0.3"])
        broker.caller = sim_caller(root, "dom0")
        started = asyncio.Event()
        agents.append(asyncio.create_task(run_agent(options, started, stop)))
        await asyncio.wait_for(started.wait(), 10)
    try:
        yield types.SimpleNamespace(
            root=root, broker=broker, domids=domids,
            app_sock=str(root / "work" / "run" / "app.sock"),
            provider_sock=str(root / "gpu" / "run" / "app.sock"))
    finally:
        stop.set()
        await asyncio.gather(*agents)
        await server.close()


def in_system(test):
    """Run an async test body inside a fresh simulated system."""
    def run(tmp_path, hv, hazards):
        async def main():
            async with running_system(tmp_path, hv) as system:
                await test(system)
        before = _fds()
        asyncio.run(main())
        assert hazards() == 0
        assert _fds() == before
    run.__name__ = test.__name__
    return run


def _app(path):
    return client_lib.Client(path)


@in_system
async def test_pull_lease_consumer_reads_provider_bytes(system):
    provider_app = _app(system.provider_sock)
    consumer_app = _app(system.app_sock)
    buf = await asyncio.to_thread(consumer_app.lease, "gpu", width=64,
                                  height=32, fourcc="XR24")
    assert buf.mode.value == "cpu" and buf.meta == layout_for(SPEC)
    drawn = await asyncio.to_thread(provider_app.exported, 5)
    assert drawn.lease == buf.lease
    with drawn.mmap() as pixels:
        pixels[:8] = b"pattern!"
    with buf.mmap(writable=False) as seen:
        assert seen[:8] == b"pattern!"
    drawn.close()
    await asyncio.to_thread(buf.close)
    assert system.broker.leases == {}
    provider_app.close()
    consumer_app.close()


@in_system
async def test_consumer_is_busy_while_the_app_holds_the_buffer(system):
    app = _app(system.app_sock)
    buf = await asyncio.to_thread(app.lease, "gpu", nbytes=PAGE_SIZE)
    answer = await system.broker.revoke_side("work", buf.lease, Role.CONSUMER)
    assert answer.status is RevokeStatus.BUSY
    assert "application" in answer.reason
    # the app lets go (it learns of the revoke on its next exchange)
    await asyncio.to_thread(buf.close)
    assert buf.lease in app.revoked
    answer = await system.broker.revoke_side("work", buf.lease, Role.CONSUMER)
    assert answer.status is RevokeStatus.RELEASED
    app.close()


@in_system
async def test_revoke_waits_for_the_app_then_confirms(system):
    app = _app(system.app_sock)
    buf = await asyncio.to_thread(app.lease, "gpu", nbytes=PAGE_SIZE)
    revoke = asyncio.create_task(
        system.broker.revoke_side("work", buf.lease, Role.CONSUMER))
    await asyncio.sleep(0.05)
    assert not revoke.done()
    app.close()  # the application dies: its leases go with it
    os.close(buf.fd)
    assert (await revoke).status is RevokeStatus.RELEASED
    await asyncio.sleep(0.1)
    assert system.broker.leases == {}

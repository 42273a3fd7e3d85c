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
import gc
import itertools
import json
import os
import types

import pytest

from qubes_gpu_share import client as client_lib
from qubes_gpu_share.agent.broker_link import sim_caller
from qubes_gpu_share.agent.main import build_parser, run_agent
from qubes_gpu_share.formats import PAGE_SIZE, BlobSpec, ImageSpec, layout_for
from qubes_gpu_share.grant.sim import SimGrantDevice
from qubes_gpu_share.grant.sim import hypervisor as run_hypervisor
from qubes_gpu_share.names import new_lease_id
from qubes_gpu_share.protocol import (Error, ExportAnswer, ExportRequest,
                                      GrantRefs,
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
async def running_system(root, hv, traits=None):
    """ROOT with dom0 (stand-in broker), a provider 'gpu', a consumer
    'work', an allow-all policy; ``traits`` gives a qube's simulated
    kernel (grant/open.py words); yields a namespace of handles."""
    traits = traits or {}
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
            "--grant", f"sim:{hv}:{domids[qube]}"
            + (f":{traits[qube]}" if qube in traits else ""),
            "--qrexec", f"sim:{root}",
            "--revoke-wait", "0.3"])
        broker.caller = sim_caller(root, "dom0")
        started = asyncio.Event()
        agents.append(asyncio.create_task(run_agent(options, started, stop)))
        await asyncio.wait_for(started.wait(), 10)
    try:
        yield types.SimpleNamespace(
            root=root, broker=broker, domids=domids, hv=hv,
            app_sock=str(root / "work" / "run" / "app.sock"),
            provider_sock=str(root / "gpu" / "run" / "app.sock"))
    finally:
        stop.set()
        await asyncio.gather(*agents)
        await server.close()


def in_system_with(traits=None, expect_hazards=0):
    """Run an async test body inside a fresh simulated system whose qubes
    have these simulated kernels; the grant simulator must log
    ``expect_hazards`` deferred ends (grants ended while mapped)."""
    def wrap(test):
        def run(tmp_path, hv, hazards):
            async def main():
                async with running_system(tmp_path, hv, traits) as system:
                    system.traits = traits or {}
                    await test(system)
            gc.collect()  # earlier tests' garbage must not close fds mid-way
            before = _fds()
            asyncio.run(main())
            assert hazards() == expect_hazards
            assert _fds() == before
        run.__name__ = test.__name__
        return run
    return wrap


in_system = in_system_with()


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


async def _deliver_from_provider(system, nbytes=PAGE_SIZE):
    """What the broker does for an offer, driven by hand: export from the
    provider's agent, then GpuDeliver to the consumer's."""
    meta, lease = layout_for(BlobSpec(nbytes)), new_lease_id()
    exported = await system.broker.call_agent(
        "gpu", "qubes.GpuExport",
        ExportRequest(lease, "work", system.domids["work"], meta),
        ExportAnswer)
    system.broker.leases[lease] = ("gpu", "work")
    answer = LeaseAnswer(lease, "gpu", system.domids["gpu"], "cpu", meta,
                         99, exported.refs)
    return answer, await system.broker.call_agent(
        "work", "qubes.GpuDeliver", answer, Ok)


@in_system
async def test_delivered_lease_reaches_an_app_with_the_providers_bytes(
        system):
    provider_app, consumer_app = (_app(system.provider_sock),
                                  _app(system.app_sock))
    answer, delivered = await _deliver_from_provider(system)
    assert delivered == Ok()
    drawn = await asyncio.to_thread(provider_app.exported, 5)
    with drawn.mmap() as pixels:
        pixels[100:105] = b"hello"
    got = await asyncio.to_thread(consumer_app.incoming, 5)
    assert got.lease == answer.lease and got.info.peer == "gpu"
    with got.mmap(writable=False) as seen:
        assert seen[100:105] == b"hello"
    drawn.close()
    await asyncio.to_thread(got.close)
    assert system.broker.leases == {}
    provider_app.close()
    consumer_app.close()


@in_system
async def test_export_refs_map_in_another_domain(system):
    meta, lease = layout_for(BlobSpec(3 * PAGE_SIZE)), new_lease_id()
    stranger = next(_domids)
    exported = await system.broker.call_agent(
        "gpu", "qubes.GpuExport", ExportRequest(lease, "work", stranger,
                                                meta), ExportAnswer)
    assert len(exported.refs) == 3
    app = _app(system.provider_sock)
    drawn = await asyncio.to_thread(app.exported, 5)
    with drawn.mmap() as pixels:
        pixels[-4:] = b"last"
    with SimGrantDevice(system.hv, stranger) as other:
        with other.map_grant(system.domids["gpu"], exported.refs) as mapping:
            with mapping.mmap(writable=False) as seen:
                assert seen[-4:] == b"last"
    drawn.close()
    answer = await system.broker.revoke_side("gpu", lease, Role.PROVIDER)
    assert answer.status is RevokeStatus.RELEASED
    app.close()


@in_system
async def test_only_dom0_may_call_the_agent(system):
    meta, lease = layout_for(BlobSpec(PAGE_SIZE)), new_lease_id()
    for service, message in (
            ("qubes.GpuExport", ExportRequest(lease, "work", 5, meta)),
            ("qubes.GpuDeliver", LeaseAnswer(lease, "gpu", 5, "cpu", meta, 1,
                                             GrantRefs.from_ints([8]))),
            ("qubes.GpuRevoke", RevokeRequest(lease, Role.PROVIDER))):
        with pytest.raises(reply.ServiceRefused, match="only dom0"):
            await _call_as(system, "work", "gpu", service, message)
    assert system.broker.leases == {}


async def _call_as(system, source, target, service, message):
    """Connect to the target's service socket and write the descriptor
    qrexec would write for a call from ``source`` (policy aside)."""
    path = system.root / target / "rpc" / service
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(f"{service}+ {source}\0".encode() + encode(message))
    writer.write_eof()
    output = await reader.read()
    writer.close()
    return reply.parse_reply(output)


@in_system
async def test_malformed_agent_requests_get_one_line_errors(system):
    payload = await _call_as(system, "dom0", "gpu", "qubes.GpuExport",
                             Ok())
    error = decode(payload, Error)
    assert error.code == "malformed" and "\n" not in error.message


@in_system
async def test_malformed_app_messages_get_one_line_errors(system):
    import socket
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(system.app_sock)
    for bad in (b"{", b'{"op":"lease"}', b'{"op":"list","op":"list"}',
                b'{"op":"nope"}', b"x" * 5000, b'{"op":"release","lease":1}',
                b'{"op":"lease","provider":"gpu","fourcc":"XR24",'
                b'"width":true,"height":1,"mode":"cpu"}'):
        await asyncio.to_thread(sock.send, bad)
        answer = json.loads(await asyncio.to_thread(sock.recv, 65536))
        assert answer["reply"] == "error", bad
        assert answer["code"] == "malformed" and "\n" not in answer["message"]
    sock.close()


@in_system
async def test_app_crash_releases_its_leases(system):
    app = _app(system.app_sock)
    first = await asyncio.to_thread(app.lease, "gpu", nbytes=PAGE_SIZE)
    second = await asyncio.to_thread(app.lease, "gpu", width=16, height=16,
                                     fourcc="XR24")
    assert len(system.broker.leases) == 2
    os.close(first.fd)
    os.close(second.fd)
    app.close()  # as a dying process's sockets close
    for _ in range(50):
        if not system.broker.leases:
            break
        await asyncio.sleep(0.02)
    assert system.broker.leases == {}


@in_system
async def test_revoke_of_a_lease_the_agent_does_not_hold_is_released(system):
    """After an agent restart (or a revoke repeated after a lost answer)
    the agent holds nothing under the lease id: released, for both roles,
    so that the broker does not retry forever."""
    lease = new_lease_id()
    for qube, role in (("gpu", Role.PROVIDER), ("work", Role.CONSUMER)):
        for _ in range(2):
            answer = await system.broker.revoke_side(qube, lease, role)
            assert answer.status is RevokeStatus.RELEASED


# -- a consumer's word is not a release (issue 14) ----------------------------

async def _export_to_work(system, pages=3):
    meta, lease = layout_for(BlobSpec(pages * PAGE_SIZE)), new_lease_id()
    exported = await system.broker.call_agent(
        "gpu", "qubes.GpuExport",
        ExportRequest(lease, "work", system.domids["work"], meta),
        ExportAnswer)
    return lease, exported.refs


def _as_work(system):
    """A grant device in work's domain, outside its agent: what a lying
    consumer (or an application with its own device) maps."""
    from qubes_gpu_share.grant.open import parse_traits
    kind = parse_traits(system.traits.get("work", "pvh"))
    return SimGrantDevice(system.hv, system.domids["work"], kind)


@in_system_with({"gpu": "pvh,fixed"})
async def test_a_consumer_that_keeps_its_mapping_holds_the_pages(system):
    """The provider's kernel says what the consumer still maps
    (IMP_TRY_RELEASE): the provider answers busy with the count, keeps the
    pages granted, and releases once they are unmapped."""
    lease, refs = await _export_to_work(system)
    with _as_work(system) as liar:
        mapping = liar.map_grant(system.domids["gpu"], refs[:2])
        for _ in range(2):       # asked again: still held
            answer = await system.broker.revoke_side("gpu", lease,
                                                     Role.PROVIDER)
            assert answer.status is RevokeStatus.BUSY
            assert answer.reason == "2 pages still mapped by work"
            assert answer.held_pages == 2
        with pytest.raises(Exception):   # the unmapped page was ended
            liar.map_grant(system.domids["gpu"], refs[2:])
        mapping.close()
        answer = await system.broker.revoke_side("gpu", lease, Role.PROVIDER)
        assert answer.status is RevokeStatus.RELEASED
        assert answer.held_pages == 0
        assert liar.stats(system.domids["gpu"]).table_used == 0


@in_system_with({"gpu": "pvh,fixed"})
async def test_a_dead_consumer_gives_the_pages_back(system):
    lease, refs = await _export_to_work(system)
    with SimGrantDevice(system.hv, next(_domids)) as dom0:
        with _as_work(system) as liar:
            mapping = liar.map_grant(system.domids["gpu"], refs)
            answer = await system.broker.revoke_side("gpu", lease,
                                                     Role.PROVIDER)
            assert answer.status is RevokeStatus.BUSY
            dom0.destroy_domain(system.domids["work"])   # xl destroy
        mapping.close()        # the dead domain's device is gone already
        answer = await system.broker.revoke_side("gpu", lease, Role.PROVIDER)
        assert answer.status is RevokeStatus.RELEASED


@in_system_with(expect_hazards=1)
async def test_without_the_kernel_report_the_word_is_taken(system):
    """A provider kernel without IMP_TRY_RELEASE cannot tell: released, and
    the grant's end is deferred by the kernel, unseen (the simulator logs
    it)."""
    lease, refs = await _export_to_work(system)
    with _as_work(system) as liar:
        mapping = liar.map_grant(system.domids["gpu"], refs)
        answer = await system.broker.revoke_side("gpu", lease, Role.PROVIDER)
        assert answer.status is RevokeStatus.RELEASED
        assert answer.held_pages is None      # cannot tell
        stats = liar.stats(system.domids["gpu"])
        assert (stats.deferred_grants, stats.deferred_pages) == (1, 3)
        mapping.close()
        assert liar.stats(system.domids["gpu"]).deferred_pages == 0


# -- dmabuf mode for the application (issue 16) ------------------------------

@in_system_with({"gpu": "pvh,fixed", "work": "pvh,fixed"})
async def test_dmabuf_lease_maps_like_a_cpu_lease(system):
    provider_app, consumer_app = (_app(system.provider_sock),
                                  _app(system.app_sock))
    buf = await asyncio.to_thread(consumer_app.lease, "gpu", nbytes=PAGE_SIZE,
                                  mode="dmabuf")
    assert buf.mode.value == "dmabuf" and buf.is_dmabuf
    drawn = await asyncio.to_thread(provider_app.exported, 5)
    with drawn.mmap() as pixels:
        pixels[:8] = b"pattern!"
    assert "mmap() it" in buf.describe_mapping()
    seen = buf.mmap()                       # the one call, as in cpu mode
    with buf.cpu_access():
        assert seen[:8] == b"pattern!"
        seen[8:12] = b"back"
    again = buf.mmap(writable=False)        # a dma-buf maps any number
    assert again[8:12] == b"back"
    drawn.close()
    await asyncio.to_thread(buf.close)      # unmaps both, then releases
    assert seen.closed and again.closed
    assert system.broker.leases == {}
    provider_app.close()
    consumer_app.close()


@in_system_with({"work": "pvh,fix"})
async def test_dmabuf_lease_without_the_mmap_patch_says_why(system):
    app = _app(system.app_sock)
    buf = await asyncio.to_thread(app.lease, "gpu", nbytes=PAGE_SIZE,
                                  mode="dmabuf")
    with pytest.raises(client_lib.ClientError) as refused:
        buf.mmap()
    assert refused.value.code == "mode"
    assert "GPU driver" in str(refused.value)
    assert "GPU driver" in buf.describe_mapping()
    await asyncio.to_thread(buf.close)
    app.close()

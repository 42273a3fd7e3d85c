"""The simulated system's own plumbing: ROOT layout, router, hypervisor.

The end-to-end tests trust these pieces; here each is checked alone,
without the broker or the agents.
"""

import asyncio
import json
import os
import pathlib
import struct
import zlib

import pytest

from qubes_gpu_share.formats import linear_layout

from qubes_gpu_share.qrexec import reply, stream
from qubes_gpu_share.qrexec.service import SocketServiceServer
from qubes_gpu_share.qubes.memory import MemoryQubes
from qubes_gpu_share.simsys import (HYPERVISOR, SimProcessError, SimQube,
                                    SimSystem, build)
from qubes_gpu_share.simsys.layout import DOM0_SERVICES, QUBE_SERVICES
from qubes_gpu_share.simsys.pattern import (first_difference, pattern_bytes,
                                             xr24_png)

REPO = pathlib.Path(__file__).resolve().parents[1]
POLICY = [REPO / "policy" / "60-gpu-share.policy",
          REPO / "demo" / "policy" / "30-user-gpu-share.policy"]
QUBES = [SimQube("sys-gpu", 2, "hvm", ("gpu-share-provider",)),
         SimQube("work", 3, "pvh", ("gpu-share",), tags=("gpu-share",),
                 kernel=("fix",)),
         SimQube("untrusted", 4, "pv", ("gpu-share",)),
         SimQube("halted", 5, running=False)]


def test_layout_has_what_qrexec_and_the_agents_read(tmp_path):
    layout = build(tmp_path, QUBES, POLICY)
    assert sorted(p.name for p in layout.policy_dir.iterdir()) == \
        ["30-user-gpu-share.policy", "60-gpu-share.policy"]
    for service in DOM0_SERVICES:
        assert os.readlink(layout.rpc_dir("dom0") / service) == \
            "../run/broker.sock"
    for service in QUBE_SERVICES:
        assert (layout.rpc_dir("work") / service).resolve() == \
            layout.agent_socket("work").resolve()
    assert sorted(os.listdir(layout.services_dir("sys-gpu"))) == \
        ["gpu-share-provider"]
    model = MemoryQubes.from_file(str(layout.qubes_file))
    assert model.qube("work").xid == 3
    assert model.qube("untrusted").virt_mode == "pv"
    assert not model.qube("halted").running
    assert model.qube("halted").xid == -1
    assert "gpu-share" in model.qube("work").services


@pytest.mark.parametrize("qube", [
    dict(name="bad name", xid=2), dict(name="x", xid=2, virt_mode="xen"),
    dict(name="x", xid=0x7FF0), dict(name="x", xid=2, kernel=("magic",))])
def test_bad_qube_descriptions_are_refused(qube):
    with pytest.raises(ValueError):
        SimQube(**qube)


def test_grant_traits_say_what_the_kernel_is():
    from qubes_gpu_share.grant.open import parse_traits
    assert SimQube("dom0", 0, "pv").grant_traits() == "pv,swiotlb"
    assert parse_traits(SimQube("dom0", 0, "pv").grant_traits()).xen_swiotlb
    assert not parse_traits(QUBES[2].grant_traits()).xen_swiotlb  # PV domU
    assert SimQube("w", 3, kernel=("fix",)).grant_traits() == "pvh,fix"


def test_duplicate_domain_ids_are_refused(tmp_path):
    with pytest.raises(ValueError, match="domain ids"):
        build(tmp_path, [SimQube("a", 2), SimQube("b", 2)], POLICY)


def test_router_of_the_layout_applies_the_policy(tmp_path):
    layout = build(tmp_path, QUBES, POLICY)

    async def echo(descriptor, reader, writer):
        body = await stream.read_to_eof(reader, 1024)
        writer.write(reply.ok_reply(descriptor.encode() + body))

    async def main():
        router = layout.router()
        async with SocketServiceServer(layout.broker_socket(),
                                       {s: echo for s in DOM0_SERVICES}):
            allowed = await router.caller("work").call_service(
                "@adminvm", "qubes.GpuLease+sys-gpu", b"hi", 1024)
            denied = await router.caller("untrusted").call_service(
                "@adminvm", "qubes.GpuLease+sys-gpu", b"hi", 1024)
        return allowed, denied

    allowed, denied = asyncio.run(main())
    assert allowed == (0, reply.ok_reply(
        b"qubes.GpuLease+sys-gpu work keyword adminvm\0hi"))
    assert denied == (126, b"")


def test_set_running_rewrites_the_model(tmp_path):
    system = SimSystem(tmp_path, QUBES, POLICY)
    system.set_running("work", False)
    system.set_running("halted", True)
    entries = {q["name"]: q for q in
               json.loads(system.layout.qubes_file.read_text())["qubes"]}
    assert (entries["work"]["running"], entries["work"]["xid"]) == (False, -1)
    assert (entries["halted"]["running"], entries["halted"]["xid"]) == (True, 5)


def test_hypervisor_process_answers_the_observer(tmp_path):
    system = SimSystem(tmp_path, QUBES, POLICY, table_entries=1024)
    try:
        system.start_hypervisor()
        assert system.hazards() == []
        stats = system.observer().stats()
        assert (stats.table_used, stats.table_size, stats.hazards) == \
            (0, 1024 - 8, 0)  # the first 8 entries are reserved
    finally:
        system.stop()
    assert not system.processes[HYPERVISOR].running()


def test_a_process_that_dies_early_is_reported_with_its_log(tmp_path):
    system = SimSystem(tmp_path, QUBES, POLICY)
    with pytest.raises(SimProcessError, match="exited with 2"):
        system._start("bad", ["sh", "-c", "echo broken >&2; exit 2"],
                      tmp_path / "never.sock")
    assert "broken" in system.processes["bad"].log_text()


def test_pattern_fills_the_buffer_and_a_changed_byte_is_found():
    meta = linear_layout(1920, 1080, "XR24")
    expected = pattern_bytes(meta, seed=3)
    assert len(expected) == meta.pages * 4096
    assert expected[:4] == bytes((16, 235, 16, 255))  # bar 3: green, BGRX
    assert pattern_bytes(meta, seed=4) != expected
    seen = bytearray(expected)
    assert first_difference(seen, expected) is None
    seen[1_000_003] ^= 0x40
    assert first_difference(seen, expected) == 1_000_003
    assert first_difference(seen[:-1], expected) == 1_000_003


def test_png_decodes_to_the_pixels_drawn():
    meta = linear_layout(33, 7, "XR24")  # stride padding: 33 * 4 < 256
    data = pattern_bytes(meta, seed=1)
    png = xr24_png(meta, data)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = {}, 8
    while at < len(png):
        (length,), kind = struct.unpack(">I", png[at:at + 4]), png[at + 4:at + 8]
        body = png[at + 8:at + 8 + length]
        assert struct.unpack(">I", png[at + 8 + length:at + 12 + length])[0] \
            == zlib.crc32(kind + body)
        chunks[kind] = body
        at += 12 + length
    assert struct.unpack(">II", chunks[b"IHDR"][:8]) == (33, 7)
    raw = zlib.decompress(chunks[b"IDAT"])
    row = raw[:1 + 33 * 3]
    blue, green, red = data[0], data[1], data[2]
    assert row[:4] == bytes((0, red, green, blue))
    assert len(raw) == 7 * (1 + 33 * 3)


def test_check_dmabuf_reads_the_pages_behind_an_imported_dmabuf(tmp_path):
    """What the demo does in dmabuf mode, here without broker or agents."""
    from qubes_gpu_share.grant.open import parse_traits
    from qubes_gpu_share.grant.sim import SimGrantDevice
    from qubes_gpu_share.alloc.memfd import MemfdAllocator
    meta = linear_layout(64, 64, "XR24")
    expected = pattern_bytes(meta, seed=2)
    system = SimSystem(tmp_path, QUBES, POLICY)
    try:
        system.start_hypervisor()
        hv = str(system.layout.hv_socket)
        provider = SimGrantDevice(hv, 2, parse_traits("hvm"))
        consumer = SimGrantDevice(hv, 3, parse_traits("pvh,fix"))
        with MemfdAllocator().allocate(meta.pages * 4096) as buffer:
            os.pwrite(buffer.fd, expected, 0)
            grant = provider.grant_dmabuf(buffer.fd, meta.pages, 3)
            imported = consumer.import_dmabuf(2, grant.refs)
            assert system.check_dmabuf("work", imported.fd, meta.pages,
                                       expected) is None
            assert system.check_dmabuf("work", imported.fd, meta.pages,
                                       pattern_bytes(meta, 3)) == 0
            imported.release(1000)
            grant.revoke()
        assert system.hazards() == []
        provider.close()
        consumer.close()
    finally:
        system.stop()


def test_follow_model_turns_file_changes_into_qube_events(tmp_path):
    from qubes_gpu_share.qubeinfo import EventKind
    system = SimSystem(tmp_path, QUBES, POLICY)
    model = MemoryQubes.from_file(str(system.layout.qubes_file))

    async def main():
        events = model.events()
        task = asyncio.create_task(
            model.follow_file(system.layout.qubes_file, interval=0.01))
        await asyncio.sleep(0.05)
        system.set_running("work", False)
        system.set_running("halted", True)
        seen = [await asyncio.wait_for(events.__anext__(), 5)
                for _ in range(4)]
        task.cancel()
        assert seen[0].kind is EventKind.CONNECTED
        return [(e.kind, e.qube) for e in seen[1:]]

    assert asyncio.run(main()) == [(EventKind.PRE_SHUTDOWN, "work"),
                                   (EventKind.SHUTDOWN, "work"),
                                   (EventKind.START, "halted")]
    assert not model.qube("work").running
    assert model.qube("halted").xid == 5

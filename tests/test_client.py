"""The client library (qubes_gpu_share.client) against a running simulated
system: a lease maps the provider's very pages, the provider's application
draws into them, offer/incoming, list, release, refusals with their code,
revoke notices, and every lease ending with its connection.
"""

from __future__ import annotations

import json
import os
import pathlib

import pytest
from simfixtures import clean_after_each, module_system

from qubes_gpu_share import client
from qubes_gpu_share.formats import ReceiveMode
from qubes_gpu_share.protocol import Role
from qubes_gpu_share.qrexec.router import Router
from qubes_gpu_share.simsys import SimQube

REPO = pathlib.Path(__file__).resolve().parents[1]
POLICY = [REPO / "policy" / "60-gpu-share.policy",
          REPO / "demo" / "policy" / "30-user-gpu-share.policy"]
QUBES = [
    SimQube("sys-gpu", 2, "hvm", ("gpu-share-provider", "gpu-share")),
    SimQube("work", 3, "pvh", ("gpu-share", "gpu-share-provider")),
    # a kernel with the project's gntdev series: dma-bufs map for the CPU
    SimQube("media", 4, "pvh", ("gpu-share",), kernel=("fixed",)),
]
SMALL = dict(width=64, height=64, fourcc="XR24")   # 4 pages


system = module_system("client", QUBES, POLICY)
clean = clean_after_each("a lease outlived its connection")


def app(system, qube: str) -> client.Client:
    return client.Client(system.app_socket(qube))


def test_lease_maps_the_providers_pages(system):
    with app(system, "work") as work, app(system, "sys-gpu") as gpu:
        buf = work.lease("sys-gpu", **SMALL, ttl=60)
        assert (buf.mode, buf.info.role, buf.info.peer, buf.meta.pages) == \
            (ReceiveMode.CPU, Role.CONSUMER, "sys-gpu", 4)
        with gpu.exported(timeout=10) as drawn:
            assert drawn.lease == buf.lease
            assert drawn.info.role is Role.PROVIDER
            with drawn.mmap() as canvas:
                canvas[:8] = b"pattern!"
        with buf.mmap(writable=False) as pixels:
            assert pixels[:8] == b"pattern!"          # the same pages
        assert [(e.lease, e.role, e.peer) for e in work.list()] == \
            [(buf.lease, Role.CONSUMER, "sys-gpu")]
        buf.close()                                   # unmap, then release
        assert work.list() == []


def test_dmabuf_lease_maps_with_the_same_call(system):
    """dmabuf mode where the kernel's exporter has mmap: the application
    maps it as it maps a cpu-mode lease, brackets access, and closing
    unmaps what it mapped before the lease is released."""
    with app(system, "media") as media, app(system, "sys-gpu") as gpu:
        buf = media.lease("sys-gpu", **SMALL, mode="dmabuf", ttl=60)
        assert (buf.mode, buf.is_dmabuf) == (ReceiveMode.DMABUF, True)
        with gpu.exported(timeout=10) as drawn, drawn.mmap() as canvas:
            canvas[:8] = b"pattern!"
        assert buf.describe_mapping().startswith("dmabuf mode")
        pixels = buf.mmap()
        with buf.cpu_access(write=False):
            assert pixels[:8] == b"pattern!"
        buf.close()
        assert pixels.closed


def test_cpu_lease_says_how_to_map_it(system):
    with app(system, "work") as work:
        buf = work.lease("sys-gpu", nbytes=4096)
        assert not buf.is_dmabuf
        assert "once" in buf.describe_mapping()
        with buf.cpu_access():      # nothing to do for a grant mapping
            pass
        buf.close()


def test_offer_reaches_the_consumer_application(system):
    memfd = os.memfd_create("shm", os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(memfd, 8192)
        os.pwrite(memfd, b"from work", 0)
        with app(system, "work") as work, app(system, "sys-gpu") as gpu:
            lease = work.offer("sys-gpu", memfd, nbytes=8192, ttl=60)
            with gpu.incoming(timeout=10) as got, \
                    got.mmap(writable=False) as pixels:
                assert (got.lease, got.info.peer) == (lease, "work")
                assert pixels[:9] == b"from work"
    finally:
        os.close(memfd)


def test_a_lease_nobody_holds_can_be_released_by_any_application(system):
    """An offer the consumer never took is released from the consumer's
    side by id (what `qubes-gpu-share release ID` does); an id that is not
    this qube's is refused by dom0."""
    memfd = os.memfd_create("shm", os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(memfd, 4096)
        with app(system, "work") as work, app(system, "sys-gpu") as gpu:
            lease = work.offer("sys-gpu", memfd, nbytes=4096, ttl=60)
            system.wait_until(lambda: system.live_leases(), 10,
                              "the offer did not become a lease")
            gpu.release(lease)
            system.wait_until(lambda: not system.live_leases(), 10,
                              "the untaken offer was not released")
            with pytest.raises(client.ClientError) as refused:
                gpu.release("0" * 32)
            assert refused.value.code == "unknown-lease"
    finally:
        os.close(memfd)


@pytest.mark.parametrize("qube, provider, kwargs, code", [
    ("sys-gpu", "work", SMALL, "policy-denied"),
    ("work", "sys-gpu", dict(width=99999, height=1, fourcc="XR24"),
     "malformed"),
    ("work", "sys-gpu", dict(nbytes=4096, mode="dmabuf"), "receive-failed"),
])
def test_refusals_carry_a_code_and_one_line(system, qube, provider, kwargs,
                                            code):
    with app(system, qube) as qube_app, \
            pytest.raises(client.ClientError) as refused:
        qube_app.lease(provider, **kwargs)
    assert refused.value.code == code
    assert "\n" not in str(refused.value)


def test_release_is_only_for_the_holder(system):
    with app(system, "work") as holder, app(system, "work") as other:
        buf = holder.lease("sys-gpu", nbytes=4096)
        with pytest.raises(client.ClientError) as refused:
            other.release(buf.lease)
        assert refused.value.code == "not-yours"
        assert len(system.live_leases()) == 1
        buf.close()


def test_closing_the_connection_releases_everything(system):
    work = app(system, "work")
    work.lease("sys-gpu", **SMALL)
    work.lease("sys-gpu", nbytes=4096)
    assert len(system.live_leases("work")) == 2
    work.close()           # what the kernel does when the process dies


def test_revoke_notice_is_collected(system):
    with app(system, "work") as work:
        buf = work.lease("sys-gpu", nbytes=4096, ttl=1)
        system.wait_until(lambda: system.live_leases()[0].state.value
                          == "revoking", 10, "the TTL did not revoke")
        work.list()                    # any request collects the notice
        assert buf.lease in work.revoked
        buf.close(release=False)       # let go; the revoke then completes


def test_no_agent():
    with pytest.raises(client.ClientError) as refused:
        client.Client("/nonexistent/app.sock")
    assert refused.value.code == "no-agent"


def test_router_from_root_reads_tags_from_the_qube_list(tmp_path):
    """The router every simulated process builds (the agent's sim_caller
    included) sees the qubes' tags, for @tag: policy rules."""
    (tmp_path / "qubes.json").write_text(json.dumps({"qubes": [
        {"name": "work", "tags": ["gpu"]}, {"name": "sys-gpu"}]}))
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "30-test.policy").write_text(
        "qubes.GpuLeases * @tag:gpu @adminvm allow\n")
    router = Router.from_root(tmp_path)
    assert set(router.service_dirs) == {"dom0", "work", "sys-gpu"}
    assert router.resolve("work", "qubes.GpuLeases+", "@adminvm") == "dom0"
    assert router.resolve("sys-gpu", "qubes.GpuLeases+", "@adminvm") is None

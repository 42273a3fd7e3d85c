"""The grant-table simulator: the contract suite, and its own rules.

One hypervisor process serves the whole module; every test takes fresh
domain ids, so tests never see each other's grant tables.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import time

import pytest

from grant_contract import *  # noqa: F401,F403 (the contract's tests)
from grant_contract import GrantImpl
from qubes_gpu_share.formats import PAGE_SIZE
from qubes_gpu_share.grant import errors
from qubes_gpu_share.grant import sim_proto
from qubes_gpu_share.grant.expected import (
    DEFAULT_GRANT_ENTRIES, DOM0_KIND, GNTALLOC_DEFAULT_LIMIT,
    GRANT_REFUSED_PV_DMA, NO_DMABUF_IOCTLS, NO_DMABUF_MMAP, RECEIVED_DMABUF,
    RESERVED_GRANT_REFS, DomainKind, Kernel, VirtMode, all_kinds,
    dmabuf_grant_refusal, expected)
from qubes_gpu_share.grant.open import (BadDeviceSpec, DeviceSpec,
                                        open_grant_device, parse_spec)
from qubes_gpu_share.grant.sim import SimGrantDevice, SimulatorLimit
from qubes_gpu_share.grant.sim import hypervisor as run_hypervisor

_domids = itertools.count(1)

#: (provider kind, consumer kind) pairs the contract runs against.
KINDS = {
    "qubes-default": (DomainKind(), DomainKind()),
    "receive-fixed": (DomainKind(), DomainKind(receive_fix=True)),
    # the project's whole kernel series (kernel/) on both sides
    "fix-series": (DomainKind.of(VirtMode.PVH, Kernel.FIXED),
                   DomainKind.of(VirtMode.PVH, Kernel.FIXED)),
    "pv-domu-fixed-provider": (DomainKind.of(VirtMode.PV, Kernel.FIXED),
                               DOM0_KIND),
    "pv-dom0-consumer": (DomainKind(), DOM0_KIND),
    "dom0-provider": (DOM0_KIND, DomainKind(VirtMode.PV)),
    # DMA addresses are not machine addresses there: no IMP_TO_REFS
    "pv-domu-provider": (DomainKind(VirtMode.PV),
                         DomainKind(receive_fix=True)),
    "stock-debian": (DomainKind(dmabuf_ioctls=False),
                     DomainKind(dmabuf_ioctls=False)),
}


@pytest.fixture(scope="module")
def hv(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hv") / "hv.sock")
    with run_hypervisor(path):
        yield path


def _memfd(pages: int) -> int:
    fd = os.memfd_create("sim-dmabuf", os.MFD_CLOEXEC)
    os.ftruncate(fd, pages * PAGE_SIZE)
    return fd


@pytest.fixture(params=sorted(KINDS))
def grant_impl(request, hv):
    provider_kind, consumer_kind = KINDS[request.param]
    pdom, cdom, stranger = next(_domids), next(_domids), next(_domids)
    return GrantImpl(
        open_provider=lambda: SimGrantDevice(hv, pdom, provider_kind),
        open_consumer=lambda: SimGrantDevice(hv, cdom, consumer_kind),
        provider_domid=pdom, consumer_domid=cdom, stranger_domid=stranger,
        provider_kind=provider_kind, consumer_kind=consumer_kind,
        make_dmabuf=_memfd)


@pytest.fixture
def domains(hv):
    """Open devices in fresh domains: ``domains(kind=..., **options)``;
    at the end, the test must have caused no hazard it did not expect."""
    opened: list[SimGrantDevice] = []

    def open_domain(kind: DomainKind = DomainKind(),
                    **options) -> SimGrantDevice:
        opened.append(SimGrantDevice(hv, next(_domids), kind, **options))
        return opened[-1]

    yield open_domain
    for device in opened:
        device.close()


@pytest.fixture
def hazards(hv):
    """How many hazards the test added (the hypervisor is shared)."""
    with SimGrantDevice(hv, next(_domids)) as watcher:
        start = len(watcher.hazards())
        yield lambda: len(watcher.hazards()) - start


def _view_bytes(view, size, at=0):
    with view.mmap(writable=False) as mm:
        return bytes(mm[at:at + size])


# -- the table of expected behaviour ----------------------------------------

@pytest.mark.parametrize("kind", list(all_kinds()), ids=str)
def test_simulator_follows_the_expected_table(domains, kind):
    provider, receiver = domains(), domains(kind)
    table = expected(kind)
    fd = _memfd(1)
    try:
        if table.grant_dmabuf:
            with pytest.raises(table.grant_dmabuf.error):
                receiver.grant_dmabuf(fd, 1, provider.domid)
        else:
            receiver.grant_dmabuf(fd, 1, provider.domid).revoke()
    finally:
        os.close(fd)
    with provider.grant_new_pages(1, receiver.domid) as grant:
        receiver.map_grant(provider.domid, grant.refs).close()
        if table.receive_dmabuf:
            with pytest.raises(table.receive_dmabuf.error) as refused:
                receiver.import_dmabuf(provider.domid, grant.refs)
            assert refused.value.errno == table.receive_dmabuf.error.errno
        else:
            imported = receiver.import_dmabuf(provider.domid, grant.refs)
            assert imported.cpu_mappable() is (table.mmap_dmabuf is None)
            imported.release(1000)


def test_measured_defaults():
    kind = DomainKind()
    assert (kind.virt_mode, kind.dmabuf_ioctls, kind.receive_fix,
            kind.xen_swiotlb) == (VirtMode.PVH, True, False, False)
    assert expected(kind).receive_dmabuf.error is errors.DmabufReceiveRefused
    assert expected(DomainKind(dmabuf_ioctls=False)).grant_dmabuf.error \
        is errors.DmabufNotSupported
    assert DEFAULT_GRANT_ENTRIES == 64 * 512


@pytest.mark.parametrize("kind, refusal", [
    (DomainKind(VirtMode.PV), GRANT_REFUSED_PV_DMA),  # a plain PV domU
    (DOM0_KIND, None),
    (DomainKind(VirtMode.PV, xen_swiotlb=True), None),  # with PCI devices
    (DomainKind(VirtMode.HVM), None),
    # the gntdev frames fix (kernel/0003)
    (DomainKind(VirtMode.PV, grant_frames_fix=True), None),
    (DomainKind.of(VirtMode.PV, Kernel.FIXED), None),
])
def test_pv_grants_dmabufs_only_through_swiotlb_xen(kind, refusal):
    assert expected(kind).grant_dmabuf is refusal
    assert dmabuf_grant_refusal(kind.virt_mode, kind.xen_swiotlb,
                                kind.grant_frames_fix) is refusal


@pytest.mark.parametrize("virt", list(VirtMode))
def test_each_kernel_kind_of_the_lab(virt):
    """The three kernels the lab measures, as the table says them."""
    stock, dmabuf, fixed = (expected(DomainKind.of(virt, k)) for k in Kernel)
    assert stock.grant_dmabuf is stock.receive_dmabuf is NO_DMABUF_IOCTLS
    assert stock.mmap_dmabuf is NO_DMABUF_IOCTLS and not stock.held_pages
    assert dmabuf.receive_dmabuf is not None and not dmabuf.held_pages
    assert (dmabuf.grant_dmabuf is GRANT_REFUSED_PV_DMA) is (
        virt is VirtMode.PV)
    assert fixed.grant_dmabuf is None and fixed.held_pages
    if virt is VirtMode.PV:     # EXP_FROM_REFS is refused in PV, fix or not
        assert fixed.receive_dmabuf is fixed.mmap_dmabuf is not None
    else:
        assert fixed.receive_dmabuf is fixed.mmap_dmabuf is None
    assert DomainKind.of(virt, Kernel.FIXED).kernel is Kernel.FIXED
    assert DomainKind(virt, receive_fix=True).kernel is None
    assert expected(DomainKind(virt, receive_fix=True)).mmap_dmabuf in (
        NO_DMABUF_MMAP, expected(DomainKind(virt)).receive_dmabuf)


def test_missing_ioctls_are_said_before_the_pv_reason():
    kind = DomainKind(VirtMode.PV, dmabuf_ioctls=False)
    assert expected(kind).grant_dmabuf is NO_DMABUF_IOCTLS


def test_grant_refusals_are_one_line_not_grantable():
    for refusal in (GRANT_REFUSED_PV_DMA, RECEIVED_DMABUF):
        assert refusal.error is errors.NotGrantable
        assert "\n" not in refusal.reason
    assert "swiotlb-xen" in GRANT_REFUSED_PV_DMA.reason
    assert "gntalloc" in GRANT_REFUSED_PV_DMA.reason
    assert "EXP_FROM_REFS" in RECEIVED_DMABUF.reason


def test_swiotlb_xen_is_a_pv_trait():
    assert DOM0_KIND.xen_swiotlb and DOM0_KIND.virt_mode is VirtMode.PV
    for mode in (VirtMode.PVH, VirtMode.HVM):
        with pytest.raises(ValueError, match="PV"):
            DomainKind(mode, xen_swiotlb=True)


# -- grant table and maptrack sizes -----------------------------------------

def test_full_grant_table_is_enospc_and_takes_nothing(domains):
    provider = domains(table_entries=RESERVED_GRANT_REFS + 16)
    consumer = domains()
    first = provider.grant_new_pages(10, consumer.domid)
    with pytest.raises(errors.GrantTableFull) as full:
        provider.grant_new_pages(7, consumer.domid)
    assert full.value.errno == 28  # ENOSPC
    assert provider.stats().table_used == 10
    last = provider.grant_new_pages(6, consumer.domid)
    first.revoke()
    again = provider.grant_new_pages(8, consumer.domid)  # reuses the hole
    assert set(again.refs) == set(first.refs[:8])
    last.revoke()
    again.revoke()
    assert provider.stats().table_used == 0


def test_default_table_is_xens_64_frames(domains):
    provider, consumer = domains(), domains()
    assert provider.stats().table_size == 64 * 512 - RESERVED_GRANT_REFS
    provider.gntalloc_limit(64 * 512)   # the admin raised xen-gntalloc's
    with provider.grant_new_pages(64 * 512 - RESERVED_GRANT_REFS,
                                  consumer.domid):
        with pytest.raises(errors.GrantTableFull):
            provider.grant_new_pages(1, consumer.domid)


def test_maptrack_bounds_what_a_domain_maps(domains):
    provider, consumer = domains(), domains(maptrack_entries=4)
    with provider.grant_new_pages(3, consumer.domid) as grant:
        with consumer.map_grant(provider.domid, grant.refs):
            with pytest.raises(errors.GrantTableFull):
                consumer.map_grant(provider.domid, grant.refs)


# -- gntalloc's limit --------------------------------------------------------

def test_gntalloc_refuses_a_full_hd_frame_by_default(domains):
    """xen-gntalloc's limit parameter (1024 pages, measured in the lab)
    refuses a 1920x1080 XR24 frame (2025 pages) until an admin raises it."""
    provider, consumer = domains(), domains()
    assert provider.gntalloc_limit() == GNTALLOC_DEFAULT_LIMIT == 1024
    with pytest.raises(errors.GrantTableFull,
                       match="xen_gntalloc/parameters/limit"):
        provider.grant_new_pages(2025, consumer.domid)
    assert provider.stats().table_used == 0
    with provider.grant_new_pages(1000, consumer.domid):
        with pytest.raises(errors.GrantTableFull):
            provider.grant_new_pages(25, consumer.domid)
        assert provider.stats().gntalloc_pages == 1000
    assert provider.gntalloc_limit(4096) == 4096
    provider.grant_new_pages(2025, consumer.domid).revoke()
    # dma-buf grants are not gntalloc's: its limit does not count them
    fd = _memfd(2025)
    try:
        provider.grant_dmabuf(fd, 2025, consumer.domid).revoke()
    finally:
        os.close(fd)


def test_gntalloc_does_not_count_a_deferred_end(domains, hazards):
    """As drivers/xen/gntalloc.c: a dealloc counts at once against the
    limit, however long the peer keeps the pages mapped."""
    provider, consumer = domains(), domains()
    grant = provider.grant_new_pages(1000, consumer.domid)
    mapping = consumer.map_grant(provider.domid, grant.refs)
    grant.revoke()
    assert provider.stats().gntalloc_pages == 0
    assert provider.stats().deferred_pages == 1000
    again = provider.grant_new_pages(1000, consumer.domid)  # fits the limit
    assert provider.stats().table_used == 2000   # both really granted
    again.revoke()
    mapping.close()
    assert provider.stats().table_used == 0
    assert hazards() == 1


# -- ending grants the peer still maps ---------------------------------------

def test_revoke_while_mapped_defers_the_end_as_the_kernel(domains, hazards):
    """IMP_RELEASE/dealloc while mapped: the grant stays granted (the peer
    may even map it again), its refs allocated and pages held, until the
    peer's last mapping goes; the log keeps a line for the project's
    order, which was not kept."""
    provider, consumer = domains(), domains()
    grant = provider.grant_new_pages(2, consumer.domid)
    with grant.view().mmap() as pages:
        pages[:5] = b"still"
    mapping = consumer.map_grant(provider.domid, grant.refs)
    grant.revoke()
    assert hazards() == 1
    stats = provider.stats()
    assert stats.table_used == 2  # the deferred end holds refs
    assert (stats.deferred_grants, stats.deferred_pages) == (1, 2)
    second = consumer.map_grant(provider.domid, grant.refs)
    with second.view().mmap(writable=False) as seen:
        assert seen[:5] == b"still"  # the page is held, bytes and all
    mapping.close()
    assert provider.stats().deferred_pages == 2
    second.close()
    stats = provider.stats()
    assert (stats.table_used, stats.deferred_grants) == (0, 0)
    with pytest.raises(errors.MapRefused):
        consumer.map_grant(provider.domid, grant.refs)


def _query_pair(domains, kind=DomainKind.of(VirtMode.PVH, Kernel.FIXED)):
    return domains(kind), domains(kind)


def test_try_end_says_what_the_peer_still_maps(domains, hazards):
    provider, consumer = _query_pair(domains)
    fd = _memfd(4)
    grant = provider.grant_dmabuf(fd, 4, consumer.domid)
    os.close(fd)
    mapping = consumer.map_grant(provider.domid, grant.refs[1:3])
    assert grant.try_end() == 2
    assert provider.stats().table_used == 4  # all freed together, later
    with pytest.raises(errors.MapRefused):  # ended: unmapped when asked
        consumer.map_grant(provider.domid, grant.refs[:1])
    # still granted: the peer may map what it held again
    consumer.map_grant(provider.domid, grant.refs[1:3]).close()
    assert grant.try_end() == 2
    mapping.close()
    assert grant.try_end() == 0
    assert provider.stats().table_used == 0
    with pytest.raises(errors.AlreadyReleased):
        grant.try_end()
    grant.close()
    assert hazards() == 0   # the project's order was kept: nothing deferred


def test_try_end_of_an_unmapped_grant_ends_it_at_once(domains):
    provider, consumer = _query_pair(domains)
    fd = _memfd(2)
    grant = provider.grant_dmabuf(fd, 2, consumer.domid)
    os.close(fd)
    assert grant.try_end() == 0
    with pytest.raises(errors.MapRefused):
        consumer.map_grant(provider.domid, grant.refs)


@pytest.mark.parametrize("kind", [DomainKind(),
                                  DomainKind.of(VirtMode.PV, Kernel.DMABUF,
                                                xen_swiotlb=True)])
def test_try_end_without_the_kernel_patch_is_a_revoke(domains, hazards,
                                                      kind):
    provider, consumer = domains(kind), domains()
    fd = _memfd(1)
    grant = provider.grant_dmabuf(fd, 1, consumer.domid)
    os.close(fd)
    mapping = consumer.map_grant(provider.domid, grant.refs)
    assert grant.try_end() is None   # cannot tell: ended the old way
    assert provider.stats().deferred_pages == 1 and hazards() == 1
    with pytest.raises(errors.AlreadyReleased):
        grant.revoke()
    mapping.close()
    assert provider.stats().table_used == 0


def test_no_kernel_reports_on_gntalloc_pages(domains, hazards):
    provider, consumer = _query_pair(domains)
    grant = provider.grant_new_pages(1, consumer.domid)
    mapping = consumer.map_grant(provider.domid, grant.refs)
    assert grant.try_end() is None
    assert provider.stats().deferred_pages == 1
    mapping.close()


def test_a_dead_consumer_releases_what_it_held(domains, hazards):
    """xl destroy: Xen drops the dead domain's mappings, so the provider's
    deferred ends complete and try_end reports 0."""
    provider, consumer = _query_pair(domains)
    fds = [_memfd(3), _memfd(2)]
    held = provider.grant_dmabuf(fds[0], 3, consumer.domid)
    revoked = provider.grant_dmabuf(fds[1], 2, consumer.domid)
    for fd in fds:
        os.close(fd)
    consumer.map_grant(provider.domid, held.refs)
    consumer.map_grant(provider.domid, revoked.refs)
    imported = consumer.import_dmabuf(provider.domid, held.refs)
    assert held.try_end() == 3
    revoked.revoke()
    assert provider.stats().deferred_pages == 2
    provider.destroy_domain(consumer.domid)
    stats = provider.stats()
    assert (stats.deferred_grants, stats.deferred_pages) == (0, 0)
    assert held.try_end() == 0
    assert provider.stats().table_used == 0
    with pytest.raises(errors.NoGrantDevice, match="destroyed"):
        consumer.map_grant(provider.domid, held.refs)
    imported.close()


# -- a received dma-buf for the CPU (kernel/0002) ----------------------------

def test_received_dmabuf_maps_where_the_kernel_can(domains):
    provider, consumer = _query_pair(domains)
    with provider.grant_new_pages(2, consumer.domid) as grant:
        with grant.view().mmap() as pages:
            pages[PAGE_SIZE:PAGE_SIZE + 9] = b"provider!"
        imported = consumer.import_dmabuf(provider.domid, grant.refs)
        assert imported.cpu_mappable()
        first = imported.view().mmap()
        second = imported.view().mmap(writable=False)  # any number of maps
        assert first[PAGE_SIZE:PAGE_SIZE + 9] == b"provider!"
        first[:8] = b"consumer"
        assert second[:8] == b"consumer"
        second.close()
        with grant.view().mmap(writable=False) as pages:
            assert pages[:8] == b"consumer"
        # a mapping holds the dma-buf: release waits for it, as for an fd
        with pytest.raises(errors.ReleaseTimeout):
            imported.release(timeout_ms=100)
        first.close()
        imported.release(timeout_ms=2000)
        with pytest.raises(errors.AlreadyReleased):
            imported.release(timeout_ms=0)
        assert consumer.stats().mapped_pages == 0


def test_received_dmabuf_has_no_mmap_without_the_patch(domains):
    provider = domains()
    consumer = domains(DomainKind(receive_fix=True))
    with provider.grant_new_pages(1, consumer.domid) as grant:
        imported = consumer.import_dmabuf(provider.domid, grant.refs)
        assert not imported.cpu_mappable()
        with pytest.raises(OSError):
            imported.view().mmap()
        imported.release(1000)


def test_mappable_dmabuf_is_still_not_grantable_on(domains):
    provider, consumer = _query_pair(domains)
    fd = _memfd(1)
    try:
        with provider.grant_dmabuf(fd, 1, consumer.domid) as grant:
            imported = consumer.import_dmabuf(provider.domid, grant.refs)
            with pytest.raises(errors.NotGrantable,
                               match="cannot be granted on"):
                consumer.grant_dmabuf(imported.fd, 1, provider.domid)
            imported.release(1000)
            # the provider's own memfd is the same inode: still its own
            provider.grant_dmabuf(fd, 1, consumer.domid).revoke()
    finally:
        os.close(fd)


# -- hazards and lifetimes --------------------------------------------------


def test_revoke_while_imported_is_a_hazard(domains, hazards):
    provider, consumer = domains(), domains(DomainKind(receive_fix=True))
    fd = _memfd(1)
    grant = provider.grant_dmabuf(fd, 1, consumer.domid)
    os.close(fd)
    imported = consumer.import_dmabuf(provider.domid, grant.refs)
    grant.revoke()
    assert hazards() == 1
    imported.release(1000)


def test_orderly_release_has_no_hazard(domains, hazards):
    provider, consumer = domains(), domains(DomainKind(receive_fix=True))
    with provider.grant_new_pages(1, consumer.domid) as grant:
        consumer.map_grant(provider.domid, grant.refs).close()
        consumer.import_dmabuf(provider.domid, grant.refs).release(1000)
    assert hazards() == 0


def test_provider_closing_its_device_ends_its_grants(domains, hazards):
    provider, consumer = domains(), domains()
    grant = provider.grant_new_pages(1, consumer.domid)
    mapping = consumer.map_grant(provider.domid, grant.refs)
    provider.close()
    consumer.stats()  # one round trip: the hypervisor has seen the close
    assert hazards() == 1
    grant.close()  # no error: the grant ended with the device
    mapping.close()


def test_killed_consumer_loses_its_mappings(domains, hazards, hv):
    """Like a process that dies with /dev/xen/gntdev open."""
    provider, consumer = domains(), domains()
    grant = provider.grant_new_pages(1, consumer.domid)
    ready, go = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            dev = SimGrantDevice(hv, consumer.domid)
            dev.map_grant(provider.domid, grant.refs)
            os.write(go, b"x")
            time.sleep(60)  # until killed
        finally:
            os._exit(1)
    os.close(go)
    assert os.read(ready, 1) == b"x"
    os.close(ready)
    assert consumer.stats().mapped_pages == 1
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    for _ in range(200):
        if consumer.stats().mapped_pages == 0:
            break
        time.sleep(0.01)
    assert consumer.stats().mapped_pages == 0
    grant.revoke()
    assert hazards() == 0


def test_received_dmabuf_is_refused_and_pins_nothing(domains):
    """Xen grants only a domain's own RAM: granting an import on is
    refused before any ref is taken, and the import is not held."""
    provider, consumer = domains(), domains(DomainKind(receive_fix=True))
    with provider.grant_new_pages(1, consumer.domid) as grant:
        imported = consumer.import_dmabuf(provider.domid, grant.refs)
        baseline = consumer.stats().hypervisor_fds
        for to_domid in (provider.domid, consumer.domid):
            with pytest.raises(errors.NotGrantable,
                               match="cannot be granted on"):
                consumer.grant_dmabuf(imported.fd, 1, to_domid)
        assert consumer.stats().table_used == 0
        assert consumer.stats().hypervisor_fds == baseline
        imported.release(1000)  # nothing pins it: released on our close


def test_received_pages_shows_what_crossed(domains):
    provider, consumer = domains(), domains(DomainKind(receive_fix=True))
    with provider.grant_new_pages(2, consumer.domid) as grant:
        with grant.view().mmap() as pages:
            pages[PAGE_SIZE:PAGE_SIZE + 8] = b"original"
        imported = consumer.import_dmabuf(provider.domid, grant.refs)
        with consumer.received_pages(imported.fd) as seen:
            assert len(seen) == 2 * PAGE_SIZE
            assert seen[PAGE_SIZE:PAGE_SIZE + 8] == b"original"
            with pytest.raises(TypeError):  # read-only
                seen[0:1] = b"x"
        with pytest.raises(errors.GrantError, match="not a dma-buf"), \
                provider.received_pages(imported.fd):
            pass  # another domain's import
        imported.release(1000)


def test_hypervisor_holds_no_fds_after_everything_ends(domains):
    provider, consumer = domains(), domains(DomainKind(receive_fix=True))
    baseline = provider.stats().hypervisor_fds
    fd = _memfd(2)
    grant = provider.grant_dmabuf(fd, 2, consumer.domid)
    os.close(fd)
    mapping = consumer.map_grant(provider.domid, grant.refs, writable=False)
    imported = consumer.import_dmabuf(provider.domid, grant.refs)
    assert provider.stats().hypervisor_fds > baseline
    mapping.close()
    imported.release(1000)
    grant.revoke()
    assert provider.stats().hypervisor_fds == baseline


# -- what the simulator refuses on its own terms ---------------------------

def test_only_memfds_are_dmabufs(domains):
    provider, consumer = domains(), domains()
    readable, writable = os.pipe()
    try:
        with pytest.raises(errors.NotGrantable):
            provider.grant_dmabuf(readable, 1, consumer.domid)
    finally:
        os.close(readable)
        os.close(writable)


def test_refs_out_of_page_order_are_a_simulator_limit(domains):
    provider, consumer = domains(), domains()
    with provider.grant_new_pages(2, consumer.domid) as grant:
        with pytest.raises(SimulatorLimit):
            consumer.map_grant(provider.domid, grant.refs[::-1])


def test_a_domain_keeps_its_traits(domains, hv):
    device = domains()
    with pytest.raises(sim_proto.ProtocolError):
        SimGrantDevice(hv, device.domid, DomainKind(VirtMode.PV))
    pv = domains(DomainKind(VirtMode.PV))
    with pytest.raises(sim_proto.ProtocolError):
        SimGrantDevice(hv, pv.domid, DOM0_KIND)


def test_a_pv_domain_says_if_it_has_swiotlb_xen(domains):
    plain, dom0 = domains(DomainKind(VirtMode.PV)), domains(DOM0_KIND)
    fd = _memfd(1)
    try:
        with pytest.raises(errors.NotGrantable) as refused:
            plain.grant_dmabuf(fd, 1, dom0.domid)
        assert str(refused.value) == GRANT_REFUSED_PV_DMA.reason
        assert plain.stats().table_used == 0
        dom0.grant_dmabuf(fd, 1, plain.domid).revoke()
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", list(all_kinds()), ids=str)
def test_hello_carries_every_trait(kind):
    payload = sim_proto.encode_hello(5, kind, 100, 200)
    assert sim_proto.decode_hello(payload) == (5, kind, 100, 200)


@pytest.mark.parametrize("virt, bits", [(3, 1), (0, 1 << 6), (1, 0b101),
                                        (2, 0b111)])
def test_hello_refuses_what_no_kind_is(virt, bits):
    payload = sim_proto.HELLO.pack(5, virt, bits, 0, 0)
    with pytest.raises(sim_proto.ProtocolError):
        sim_proto.decode_hello(payload)


def test_no_hypervisor_is_no_grant_device(tmp_path):
    with pytest.raises(errors.NoGrantDevice):
        SimGrantDevice(str(tmp_path / "absent.sock"), 1)


# -- wire format -------------------------------------------------------------

def test_refs_travel_as_runs():
    refs = (8, 9, 10, 11, 40, 41, 7)
    data = sim_proto.encode_refs(refs)
    assert len(data) == 3 * 8
    assert sim_proto.expand_runs(sim_proto.decode_runs(data)) == refs


@pytest.mark.parametrize("data", [b"", b"\x01\x00\x00\x00",
                                  sim_proto.encode_runs([(8, 0)])])
def test_malformed_refs_are_refused(data):
    with pytest.raises(sim_proto.ProtocolError):
        sim_proto.decode_runs(data)


def test_oversized_frames_are_refused():
    reader = sim_proto.FrameReader()
    with pytest.raises(sim_proto.ProtocolError):
        reader.feed(sim_proto.HEADER.pack(sim_proto.MAX_PAYLOAD + 1, 1))
    assert sim_proto.decode_runs(sim_proto.encode_runs([(8, 65535)]))
    with pytest.raises(errors.TooManyPages):
        sim_proto.decode_runs(sim_proto.encode_runs([(8, 65535), (1, 1)]))


# -- choosing the device ---------------------------------------------------

@pytest.mark.parametrize("text, spec", [
    ("", DeviceSpec()),
    ("real", DeviceSpec()),
    ("sim:/run/hv.sock:5", DeviceSpec("/run/hv.sock", 5)),
    ("sim:/a:b.sock:5:pv,nodmabuf",
     DeviceSpec("/a:b.sock", 5, DomainKind(VirtMode.PV, False))),
    ("sim:/x:7:hvm,fix", DeviceSpec("/x", 7, DomainKind(VirtMode.HVM,
                                                         True, True))),
    ("sim:/x:0:pv,swiotlb", DeviceSpec("/x", 0, DOM0_KIND)),
    ("sim:/x:3:pvh,fixed", DeviceSpec("/x", 3, DomainKind.of(
        VirtMode.PVH, Kernel.FIXED))),
    ("sim:/x:3:pv,stock", DeviceSpec("/x", 3, DomainKind.of(
        VirtMode.PV, Kernel.STOCK))),
    ("sim:/x:3:pvh,fix,mmap", DeviceSpec("/x", 3, DomainKind(
        receive_fix=True, dmabuf_mmap=True))),
    ("sim:/x:0:swiotlb,pv", DeviceSpec("/x", 0, DOM0_KIND)),
])
def test_device_spec(text, spec):
    assert parse_spec(text) == spec


@pytest.mark.parametrize("text", ["sim", "sim:/x", "sim::5", "gntdev",
                                  "sim:/x:5:arm", "sim:/x:32752",
                                  "sim:/x:5:swiotlb", "sim:/x:5:hvm,swiotlb"])
def test_bad_device_spec(text):
    with pytest.raises(BadDeviceSpec):
        parse_spec(text)


def test_unknown_trait_lists_the_known_ones():
    with pytest.raises(BadDeviceSpec,
                       match="stock, dmabuf, fixed, nodmabuf, fix, mmap"):
        parse_spec("sim:/x:5:iommu")


def test_open_chooses_the_simulator(hv, monkeypatch):
    monkeypatch.setenv("QUBES_GPU_SHARE_GRANT", f"sim:{hv}:{next(_domids)}")
    with open_grant_device() as device:
        assert isinstance(device, SimGrantDevice)
        assert device.kind == DomainKind()


def test_open_real_without_xen_says_so(monkeypatch):
    if os.path.exists("/dev/xen/gntdev"):
        pytest.skip("this machine has a real grant device")
    monkeypatch.delenv("QUBES_GPU_SHARE_GRANT", raising=False)
    with pytest.raises(errors.NoGrantDevice):
        open_grant_device()


def test_kinds_are_all_distinct():
    kinds = list(all_kinds())
    # 3 virt modes x ioctls x 4 patches, and swiotlb-xen only for PV
    assert len(kinds) == len(set(kinds)) == 4 * 2 ** 5
    assert all(DomainKind.of(mode, kernel) in kinds
               for mode in VirtMode for kernel in Kernel)
    assert dataclasses.replace(DomainKind(), receive_fix=True) in kinds
    assert DOM0_KIND in kinds
    assert {kind.virt_mode for kind in kinds if kind.xen_swiotlb} == {
        VirtMode.PV}

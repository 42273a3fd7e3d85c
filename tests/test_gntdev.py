"""The real grant device without Xen: refusals, messages, fd ownership.

Kernel answers are produced two ways: /dev/null stands in for the device
node (a real kernel answering ENOTTY to every ioctl, which is what a kernel
without CONFIG_XEN_GNTDEV_DMABUF does for the DMABUF ioctls), and a stand-in
for the compiled ``lib`` fails the ioctl with a chosen errno (or fills the
struct like the kernel would) while every struct is still built by cffi from
the real layouts. Tests marked ``xen`` need a real /dev/xen/gntdev.
"""

from __future__ import annotations

import errno
import mmap
import os

import pytest

from qubes_gpu_share import native
from qubes_gpu_share._native import ffi, lib
from qubes_gpu_share.grant import errors, this_domain
from qubes_gpu_share.grant.domid import own_domid
from qubes_gpu_share.grant.expected import (GRANT_REFUSED_PV_DMA,
                                            NO_DMABUF_IOCTLS, RECEIVED_DMABUF,
                                            VirtMode)
from qubes_gpu_share.grant.gntdev import GNTDEV_EXPORTER, GntdevDevice
from test_this_domain import GNTDEV_FDINFO, fake_domain

HAVE_XEN = os.path.exists(native.GNTDEV_PATH)
xen = pytest.mark.xen
needs_xen = pytest.mark.skipif(
    not HAVE_XEN, reason=f"{native.GNTDEV_PATH} is absent: not a Xen domain "
    "(runs in the project's Xen lab or in a Qubes qube)")


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def no_fd_leak():
    before = open_fds()
    yield
    assert open_fds() - before == set()


class FakeLib:
    """``lib`` with its ioctl replaced: ``answer(request, arg)`` returns the
    ioctl's result, or an errno to fail with (as a negative number)."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def __getattr__(self, name):
        return getattr(lib, name)

    def qgs_ioctl(self, fd, request, arg):
        self.calls.append(request)
        result = self.answer(request, arg)
        if result < 0:
            ffi.errno = -result
            return -1
        return result


@pytest.fixture
def fake_devices(monkeypatch, tmp_path):
    """Device nodes that open (/dev/null) in a domain that is not PV (an
    empty /sys), and a ``fail_with`` helper."""
    monkeypatch.setattr(native, "GNTDEV_PATH", os.devnull)
    monkeypatch.setattr(native, "GNTALLOC_PATH", os.devnull)
    monkeypatch.setattr(this_domain, "SYS_ROOT", str(tmp_path / "no-sys"))

    def install(answer) -> FakeLib:
        fake = FakeLib(answer)
        monkeypatch.setattr(native, "lib", fake)
        return fake
    return install


def fail_with(err: int):
    return lambda request, arg: -err


# --- the device is absent here ---------------------------------------------

@pytest.mark.skipif(HAVE_XEN, reason="this machine has a grant device")
def test_opening_the_device_outside_xen_says_why(no_fd_leak):
    with pytest.raises(errors.NoGrantDevice) as caught:
        GntdevDevice()
    message = str(caught.value)
    assert "/dev/xen/gntdev is missing" in message
    assert "not running in a Xen domain" in message
    assert "modprobe xen-gntdev" in message


def test_missing_gntalloc_names_its_module(monkeypatch, no_fd_leak):
    monkeypatch.setattr(native, "GNTDEV_PATH", os.devnull)
    monkeypatch.setattr(native, "GNTALLOC_PATH", "/nonexistent/gntalloc")
    with pytest.raises(errors.NoGrantDevice, match="modprobe xen-gntalloc"):
        GntdevDevice().grant_new_pages(1, 1)


# --- counts are refused before anything is opened or called -----------------

@pytest.mark.parametrize("pages", [0, 65536, 100_000])
def test_bad_page_counts_refused_before_any_call(fake_devices, pages):
    fake = fake_devices(fail_with(errno.EIO))
    device = GntdevDevice()
    before = open_fds()
    for call in (lambda: device.grant_dmabuf(0, pages, 1),
                 lambda: device.grant_new_pages(pages, 1),
                 lambda: device.map_grant(1, [1] * pages),
                 lambda: device.import_dmabuf(1, [1] * pages)):
        with pytest.raises(errors.TooManyPages, match="65535"):
            call()
    assert fake.calls == []
    assert open_fds() == before


def test_largest_count_reaches_the_kernel_with_every_ref(fake_devices):
    seen = []

    def kernel(request, arg):
        op = ffi.cast("struct ioctl_gntdev_dmabuf_imp_to_refs *", arg)
        refs = ffi.cast("uint32_t *", ffi.addressof(op, "refs"))
        seen.append((op.count, op.domid))
        for i in range(op.count):
            refs[i] = 1000 + i
        return 0
    fake_devices(kernel)
    refs = native.imp_to_refs(0, 7, 65535, 3)
    assert seen == [(65535, 3)]
    assert refs[0] == 1000 and refs[-1] == 1000 + 65534
    assert len(refs) == 65535


def test_map_grant_ref_sends_domid_and_ref_per_page(fake_devices):
    seen = []

    def kernel(request, arg):
        op = ffi.cast("struct ioctl_gntdev_map_grant_ref *", arg)
        items = ffi.cast("struct ioctl_gntdev_grant_ref *",
                         ffi.addressof(op, "refs"))
        seen.extend((items[i].domid, items[i].ref) for i in range(op.count))
        op.index = 8192
        return 0
    fake_devices(kernel)
    assert native.map_grant_ref(0, 5, [11, 12, 13]) == 8192
    assert seen == [(5, 11), (5, 12), (5, 13)]


# --- errno -> exception, with the message that says what to do -------------

def test_grant_copy_reads_one_byte_of_each_ref(fake_devices):
    seen = []

    def kernel(request, arg):
        assert request == lib.IOCTL_GNTDEV_GRANT_COPY
        op = ffi.cast("struct ioctl_gntdev_grant_copy *", arg)
        for seg in op.segments[0:op.count]:
            seen.append((seg.source.foreign.domid, seg.source.foreign.ref,
                         seg.source.foreign.offset, seg.len, seg.flags))
            seg.status = -3 if seg.source.foreign.ref == 12 else 0
        return 0
    fake_devices(kernel)
    assert native.grant_copy_status(0, 5, [11, 12]) == (0, -3)
    assert seen == [(5, 11, 0, 1, lib.GNTCOPY_source_gref),
                    (5, 12, 0, 1, lib.GNTCOPY_source_gref)]


@pytest.mark.parametrize("writable", [True, False])
def test_map_grant_refuses_refs_xen_refuses_before_mapping(
        fake_devices, no_fd_leak, writable):
    """MAP_GRANT_REF asks Xen nothing: map_grant validates with GRANT_COPY
    first, and a refusal closes the fd and never reaches MAP_GRANT_REF."""
    def kernel(request, arg):
        op = ffi.cast("struct ioctl_gntdev_grant_copy *", arg)
        op.segments[1].status = -8  # GNTST_permission_denied
        return 0
    fake = fake_devices(kernel)
    with pytest.raises(errors.MapRefused) as refused:
        GntdevDevice().map_grant(4, [21, 22, 23], writable=writable)
    assert "first ref 22" in str(refused.value)
    assert "GNTST_permission_denied" in str(refused.value)
    assert fake.calls == [lib.IOCTL_GNTDEV_GRANT_COPY]


def test_map_grant_validates_then_maps(fake_devices, no_fd_leak):
    fake = fake_devices(lambda request, arg: 0)
    with GntdevDevice().map_grant(4, [21]):
        pass
    assert fake.calls == [lib.IOCTL_GNTDEV_GRANT_COPY,
                          lib.IOCTL_GNTDEV_MAP_GRANT_REF,
                          lib.IOCTL_GNTDEV_UNMAP_GRANT_REF]


@pytest.mark.parametrize("call, err, exc, words", [
    (lambda: native.imp_to_refs(0, 3, 1, 1), errno.EINVAL,
     errors.NotGrantable, "VRAM or PFNMAP"),
    (lambda: native.imp_to_refs(0, 3, 1, 1), errno.ENOSPC,
     errors.GrantTableFull, "grant table full"),
    (lambda: native.imp_to_refs(0, 3, 1, 1), errno.ENOTTY,
     errors.DmabufNotSupported, "CONFIG_XEN_GNTDEV_DMABUF"),
    (lambda: native.imp_release(0, 3), errno.ENOENT,
     errors.AlreadyReleased, "already released"),
    (lambda: native.exp_wait_released(0, 3, 50), errno.ETIMEDOUT,
     errors.ReleaseTimeout, "after 50 ms"),
    (lambda: native.exp_wait_released(0, 3, 50), errno.ENOENT,
     errors.AlreadyReleased, "already released"),
    (lambda: native.exp_from_refs(0, 1, [1]), errno.ENOTTY,
     errors.DmabufNotSupported, "CONFIG_XEN_GNTDEV_DMABUF"),
    (lambda: native.exp_from_refs(0, 1, [1]), errno.EINVAL,
     errors.DmabufReceiveRefused, "'cpu' mode"),
    (lambda: native.gntalloc_alloc(0, 1, 4), errno.ENOSPC,
     errors.GrantTableFull, "xen_gntalloc/parameters/limit"),
])
def test_refusals_become_specific_exceptions(fake_devices, call, err, exc,
                                             words):
    fake_devices(fail_with(err))
    with pytest.raises(exc) as caught:
        call()
    assert type(caught.value) is exc
    assert caught.value.errno == err
    assert words in str(caught.value)
    assert "\n" not in str(caught.value)


def test_enotty_on_a_non_dmabuf_ioctl_is_not_blamed_on_dmabuf(fake_devices):
    fake_devices(fail_with(errno.ENOTTY))
    with pytest.raises(errors.GrantError) as caught:
        native.map_grant_ref(0, 1, [1])
    assert not isinstance(caught.value, errors.DmabufNotSupported)
    assert caught.value.errno == errno.ENOTTY


def test_interrupted_ioctl_is_retried(fake_devices):
    answers = [-errno.EINTR, -errno.EINTR, 0]
    fake = fake_devices(lambda request, arg: answers.pop(0))
    native.imp_release(0, 3)
    assert len(fake.calls) == 3


def test_allocator_ioctls_keep_oserror_with_the_cause(fake_devices):
    fake_devices(fail_with(errno.EINVAL))
    with pytest.raises(OSError, match="F_SEAL_SHRINK") as caught:
        native.udmabuf_create(0, 3, 0, 4096)
    assert caught.value.errno == errno.EINVAL
    fake_devices(fail_with(errno.ENOSYS))
    with pytest.raises(OSError, match="cannot be granted"):
        native.drm_prime_handle_to_fd(0, 1)


@pytest.mark.parametrize("mode, machine, words", [
    (VirtMode.PV, "x86_64", "this qube is PV"),
    (VirtMode.PVH, "x86_64", "this PVH x86 kernel requests the device map"),
    (VirtMode.HVM, "x86_64", "this HVM x86 kernel requests the device map"),
    (VirtMode.PVH, "aarch64", "not granted to this domain"),
    (None, "x86_64", "not granted to this domain"),
])
def test_receive_refusal_names_the_case(mode, machine, words):
    message = native.receive_refusal(mode, machine)
    assert words in message
    assert "'cpu' mode" in message


def test_receive_refusal_reads_the_guest_type(fake_devices, monkeypatch,
                                              tmp_path):
    (tmp_path / "hypervisor").mkdir()
    (tmp_path / "hypervisor" / "guest_type").write_text("PV\n")
    fake_devices(fail_with(errno.EINVAL))
    monkeypatch.setattr(this_domain, "SYS_ROOT", str(tmp_path))
    with pytest.raises(errors.DmabufReceiveRefused, match="this qube is PV"):
        native.exp_from_refs(0, 1, [1])


# --- real kernel answers through /dev/null: no fd leaks on error paths -----

def test_error_paths_leak_no_fd(monkeypatch, no_fd_leak):
    monkeypatch.setattr(native, "GNTDEV_PATH", os.devnull)
    monkeypatch.setattr(native, "GNTALLOC_PATH", os.devnull)
    device = GntdevDevice()
    with open(os.devnull, "rb") as dmabuf:
        with pytest.raises(errors.DmabufNotSupported):
            device.grant_dmabuf(dmabuf.fileno(), 2, 1)
    with pytest.raises(errors.DmabufNotSupported):
        device.import_dmabuf(1, [1, 2])
    with pytest.raises(errors.GrantError):
        device.map_grant(1, [1, 2])
    with pytest.raises(errors.GrantError):
        device.map_grant(1, [1, 2], writable=False)
    with pytest.raises(errors.GrantError):
        device.grant_new_pages(2, 1)


# --- IMP_TO_REFS the kernel would make wrongly: refused before it ------------

IMP_TO_REFS = lib.IOCTL_GNTDEV_DMABUF_IMP_TO_REFS
IMP_RELEASE = lib.IOCTL_GNTDEV_DMABUF_IMP_RELEASE


def grant_devnull(device: GntdevDevice) -> None:
    """Grant /dev/null as a 1-page dma-buf (the kernel stand-in decides)."""
    with open(os.devnull, "rb") as dmabuf:
        device.grant_dmabuf(dmabuf.fileno(), 1, 9).revoke()


def test_pv_domu_without_swiotlb_xen_never_calls_imp_to_refs(
        fake_devices, tmp_path, no_fd_leak):
    """It would grant wrong frames (the lab: Xen refused every ref)."""
    fake = fake_devices(lambda request, arg: 0)
    asked = []
    device = GntdevDevice(*fake_domain(tmp_path, "PV"),
                          frames_check=lambda: asked.append(1) or False)
    for _ in range(2):
        with pytest.raises(errors.NotGrantable) as refused:
            grant_devnull(device)
        assert str(refused.value) == GRANT_REFUSED_PV_DMA.reason
    # the DMABUF ioctls were asked for once, by an IMP_RELEASE of nothing
    assert fake.calls == [IMP_RELEASE]
    assert asked == [1]     # and the kernel's frames, once


@pytest.mark.parametrize("answer", [False, None])
def test_pv_domu_kernel_that_cannot_show_its_frames_is_refused(
        fake_devices, tmp_path, no_fd_leak, answer):
    fake_devices(lambda request, arg: 0)
    device = GntdevDevice(*fake_domain(tmp_path, "PV"),
                          frames_check=lambda: answer)
    with pytest.raises(errors.NotGrantable):
        grant_devnull(device)
    assert device.dmabuf_grant_refusal() is GRANT_REFUSED_PV_DMA


def test_pv_domu_kernel_granting_its_own_frames_grants(
        fake_devices, tmp_path, no_fd_leak):
    """The gntdev frames fix (kernel/0003) is recognised by what the
    kernel does: a page granted to ourselves maps back with its bytes."""
    fake = fake_devices(lambda request, arg: 0)
    device = GntdevDevice(*fake_domain(tmp_path, "PV"),
                          frames_check=lambda: True)
    grant_devnull(device)
    assert fake.calls == [IMP_TO_REFS, IMP_RELEASE]
    assert device.dmabuf_grant_refusal() is None


def test_pv_domu_without_dmabuf_ioctls_says_that_first(fake_devices,
                                                       tmp_path, no_fd_leak):
    fake = fake_devices(fail_with(errno.ENOTTY))
    device = GntdevDevice(*fake_domain(tmp_path, "PV"))
    with pytest.raises(errors.DmabufNotSupported) as refused:
        grant_devnull(device)
    assert str(refused.value) == NO_DMABUF_IOCTLS.reason
    assert fake.calls == [IMP_RELEASE]


def test_ioctl_probe_finding_nothing_to_release_means_present(
        fake_devices, tmp_path, no_fd_leak):
    fake = fake_devices(fail_with(errno.ENOENT))
    device = GntdevDevice(*fake_domain(tmp_path, "PV"))
    with pytest.raises(errors.NotGrantable):
        grant_devnull(device)
    assert fake.calls == [IMP_RELEASE]


@pytest.mark.parametrize("guest_type, capabilities, pci", [
    ("PV", "control_d", ()),                 # dom0
    ("PV", None, ("0000:00:05.0",)),         # PV domU with pcifront
    ("PVH", None, ()),
    ("HVM", None, ()),
])
def test_domains_with_machine_dma_addresses_grant(
        fake_devices, tmp_path, no_fd_leak, guest_type, capabilities, pci):
    fake = fake_devices(lambda request, arg: 0)
    device = GntdevDevice(*fake_domain(tmp_path, guest_type, capabilities,
                                       pci))
    grant_devnull(device)
    assert fake.calls == [IMP_TO_REFS, IMP_RELEASE]


def test_received_dmabuf_is_not_granted_on(fake_devices, tmp_path,
                                           no_fd_leak):
    """gntdev's own export (EXP_FROM_REFS) is grant mappings: Xen would
    refuse every ref of it; recognised by exp_name in fdinfo."""
    fake = fake_devices(lambda request, arg: 0)
    sys_root, proc_root = fake_domain(tmp_path, "PVH")
    device = GntdevDevice(sys_root, proc_root)
    fdinfo = tmp_path / "proc/self/fdinfo"
    with open(os.devnull, "rb") as dmabuf:
        (fdinfo / str(dmabuf.fileno())).write_bytes(GNTDEV_FDINFO)
        with pytest.raises(errors.NotGrantable) as refused:
            device.grant_dmabuf(dmabuf.fileno(), 2, 9)
        assert str(refused.value) == RECEIVED_DMABUF.reason
        assert fake.calls == []
        (fdinfo / str(dmabuf.fileno())).write_bytes(
            GNTDEV_FDINFO.replace(GNTDEV_EXPORTER.encode(), b"udmabuf"))
        device.grant_dmabuf(dmabuf.fileno(), 2, 9).revoke()
    assert fake.calls == [IMP_TO_REFS, IMP_RELEASE]


# --- lifetimes with a kernel stand-in ---------------------------------------

def exporting_kernel(wait_answers: list[int]):
    """EXP_FROM_REFS hands out a real fd; WAIT_RELEASED answers in turn."""
    def kernel(request, arg):
        if request == lib.IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS:
            op = ffi.cast("struct ioctl_gntdev_dmabuf_exp_from_refs *", arg)
            op.fd = os.open(os.devnull, os.O_RDONLY)
            return 0
        if request == lib.IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED:
            return wait_answers.pop(0)
        return 0
    return kernel


def test_release_closes_first_then_waits_and_retries(fake_devices,
                                                     no_fd_leak):
    fake_devices(exporting_kernel([-errno.ETIMEDOUT, 0]))
    imported = GntdevDevice().import_dmabuf(2, [7, 8])
    with pytest.raises(errors.ReleaseTimeout):
        imported.release(10)
    assert imported.fd == -1       # ours is closed before the wait
    imported.release(10)           # the second wait succeeds
    with pytest.raises(errors.AlreadyReleased):
        imported.release(10)


def test_release_after_last_user_already_gone(fake_devices, no_fd_leak):
    fake_devices(exporting_kernel([-errno.ENOENT]))
    with GntdevDevice().import_dmabuf(2, [7]) as imported:
        imported.release(10)


TRY_RELEASE = lib.IOCTL_GNTDEV_DMABUF_IMP_TRY_RELEASE


def try_release_kernel(held: list[int]):
    """IMP_TRY_RELEASE answers the pages still mapped, in turn."""
    def kernel(request, arg):
        if request == TRY_RELEASE:
            op = ffi.cast("struct ioctl_gntdev_dmabuf_imp_try_release *", arg)
            op.mapped = held.pop(0)
        return 0
    return kernel


def test_try_end_keeps_the_import_while_pages_are_held(fake_devices,
                                                       no_fd_leak):
    fake = fake_devices(try_release_kernel([3, 1, 0]))
    with open(os.devnull, "rb") as dmabuf:
        grant = GntdevDevice().grant_dmabuf(dmabuf.fileno(), 3, 9)
    assert grant.try_end() == 3     # our dup of the dma-buf stays open:
    assert grant.try_end() == 1     # the kernel keys the import by it
    assert grant.try_end() == 0
    with pytest.raises(errors.AlreadyReleased):
        grant.try_end()
    assert fake.calls == [IMP_TO_REFS] + [TRY_RELEASE] * 3


def test_try_end_on_a_kernel_without_it_releases_the_old_way(
        fake_devices, no_fd_leak):
    def kernel(request, arg):
        return -errno.ENOTTY if request == TRY_RELEASE else 0
    fake = fake_devices(kernel)
    with open(os.devnull, "rb") as dmabuf:
        grant = GntdevDevice().grant_dmabuf(dmabuf.fileno(), 2, 9)
    assert grant.try_end() is None
    assert fake.calls == [IMP_TO_REFS, TRY_RELEASE, IMP_RELEASE]
    with pytest.raises(errors.AlreadyReleased):
        grant.revoke()


def test_try_end_of_gntalloc_pages_cannot_tell(fake_devices, no_fd_leak):
    fake = fake_devices(lambda request, arg: 0)
    grant = GntdevDevice().grant_new_pages(2, 9)
    assert grant.try_end() is None
    assert fake.calls == [lib.IOCTL_GNTALLOC_ALLOC_GREF,
                          lib.IOCTL_GNTALLOC_DEALLOC_GREF]


def test_imp_try_release_message_names_the_patch(fake_devices, no_fd_leak):
    fake_devices(fail_with(errno.ENOTTY))
    fd = native.open_gntdev()
    try:
        with pytest.raises(errors.DmabufNotSupported, match="0004"):
            native.imp_try_release(fd, 5)
    finally:
        os.close(fd)


def test_grant_owns_a_dup_and_revoke_closes_everything(fake_devices,
                                                       no_fd_leak):
    fake = fake_devices(lambda request, arg: 0)
    with open(os.devnull, "rb") as dmabuf:
        grant = GntdevDevice().grant_dmabuf(dmabuf.fileno(), 3, 9)
        assert grant.pages == 3 and grant.domid == 9
        grant.revoke()
        with pytest.raises(errors.AlreadyReleased):
            grant.revoke()
        grant.close()              # idempotent after revoke
    assert fake.calls == [lib.IOCTL_GNTDEV_DMABUF_IMP_TO_REFS,
                          lib.IOCTL_GNTDEV_DMABUF_IMP_RELEASE]


def test_context_managers_close_mapping_and_gntalloc(fake_devices,
                                                     no_fd_leak):
    fake_devices(lambda request, arg: 0)
    device = GntdevDevice()
    with device.map_grant(4, [1, 2]) as mapping:
        view = mapping.view()
        assert view.length == 2 * 4096 and view.fd >= 0
    with pytest.raises(ValueError):
        mapping.view()
    with device.grant_new_pages(2, 4) as pages:
        assert pages.view().length == 2 * 4096


# --- on a real grant device (Xen lab, Qubes qube) ---------------------------

@xen
@needs_xen
def test_self_grant_round_trip_through_cpu_mapping(no_fd_leak):
    domid = own_domid()
    with GntdevDevice() as device, device.grant_new_pages(2, domid) as grant:
        with grant.view().mmap() as provider:
            provider[:5] = b"hello"
            with device.map_grant(domid, grant.refs) as mapping, \
                    mapping.mmap() as consumer:
                assert consumer[:5] == b"hello"
                consumer[4096:4101] = b"world"
                assert provider[4096:4101] == b"world"


@xen
@needs_xen
def test_read_only_mapping_refuses_a_writable_mmap(no_fd_leak):
    domid = own_domid()
    with GntdevDevice() as device, device.grant_new_pages(1, domid) as grant:
        with device.map_grant(domid, grant.refs, writable=False) as mapping:
            with pytest.raises(OSError):
                mmap.mmap(mapping.view().fd, 4096, mmap.MAP_SHARED,
                          mmap.PROT_READ | mmap.PROT_WRITE)
            with mapping.mmap() as readable:
                assert readable[:1] == b"\0"


@xen
@needs_xen
def test_self_import_is_refused_or_works_as_the_probe_says():
    domid = own_domid()
    with GntdevDevice() as device, device.grant_new_pages(1, domid) as grant:
        try:
            imported = device.import_dmabuf(domid, grant.refs)
        except (errors.DmabufNotSupported, errors.DmabufReceiveRefused) as e:
            assert "cpu" in str(e)
            return
        imported.release(1000)

"""Allocators: the memfd source for real, the device sources' error paths
with the native helper replaced, and the device sources for real where this
machine has the device (skipped with the allocator's own reason otherwise)."""

from __future__ import annotations

import errno
import fcntl
import os
import types

import pytest

from qubes_gpu_share import alloc
from qubes_gpu_share.alloc import base
from qubes_gpu_share.devices import Devices, DrmNode, Memory
from qubes_gpu_share.formats import PAGE_SIZE


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def no_leak():
    """Fails the test if it leaves an fd open."""
    before = open_fds()
    yield
    assert open_fds() - before == set()


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def make_memfd(size: int, sealing: bool = True) -> int:
    fd = os.memfd_create("test", os.MFD_ALLOW_SEALING if sealing else 0)
    os.ftruncate(fd, size)
    return fd


# --- memfd: the simulated seam, tested for real ------------------------------

def test_memfd_rounds_up_to_pages_and_is_shared(no_leak):
    with alloc.MemfdAllocator().allocate(PAGE_SIZE + 1) as buf:
        assert (buf.size, buf.pages, buf.kind) == (2 * PAGE_SIZE, 2, "memfd")
        with buf.mmap() as view:
            view[PAGE_SIZE:PAGE_SIZE + 5] = b"hello"
        assert os.pread(buf.fd, 5, PAGE_SIZE) == b"hello"


def test_memfd_is_sealed_against_shrinking_and_growing(no_leak):
    with alloc.MemfdAllocator().allocate(PAGE_SIZE) as buf:
        seals = fcntl.fcntl(buf.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
        assert not seals & fcntl.F_SEAL_WRITE  # udmabuf refuses it
        with pytest.raises(PermissionError):
            os.ftruncate(buf.fd, 0)


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_bad_sizes_are_refused_without_an_fd(no_leak, size):
    with pytest.raises(alloc.AllocationError):
        alloc.MemfdAllocator().allocate(size)


def test_close_is_idempotent_and_mmap_after_close_fails():
    buf = alloc.MemfdAllocator().allocate(PAGE_SIZE)
    fd = buf.fd
    with buf:
        pass
    assert buf.closed and not is_open(fd)
    buf.close()
    with pytest.raises(ValueError):
        buf.mmap()


# --- adopting an application's fd (the offer flow) ----------------------------

def test_adopt_takes_a_memfd():
    fd = make_memfd(3 * PAGE_SIZE)
    with alloc.adopt(fd) as buf:
        assert (buf.fd, buf.size, buf.kind) == (fd, 3 * PAGE_SIZE,
                                               "adopted-memfd")
    assert not is_open(fd)


@pytest.mark.parametrize("make, message", [
    (lambda: make_memfd(PAGE_SIZE + 1), "multiple of the page size"),
    (lambda: make_memfd(0), "multiple of the page size"),
    (lambda: os.pipe()[0], "neither a memfd nor a dma-buf"),
])
def test_adopt_refuses_and_closes_what_it_cannot_use(make, message):
    before = open_fds()
    fd = make()
    with pytest.raises(alloc.AllocationError, match=message):
        alloc.adopt(fd)
    assert not is_open(fd)
    # the pipe's write end is ours to close
    for leftover in open_fds() - before:
        os.close(int(leftover))


# --- device sources: availability and error paths ----------------------------

def test_missing_devices_are_reported_with_the_path(tmp_path):
    for source in (alloc.UdmabufAllocator(str(tmp_path / "udmabuf")),
                   alloc.DmaHeapAllocator(str(tmp_path / "system"))):
        found = source.availability()
        assert not found.ok
        assert found.reason == f"{source.path} is missing"


def test_real_sources_list_udmabuf_and_system_heap_even_when_missing():
    names = [s.name for s in alloc.real_sources(Devices())]
    assert names == ["udmabuf", "dma-heap:system"]
    card = DrmNode("/dev/dri/card0", "card", "vgem", Memory.SYSTEM)
    render = DrmNode("/dev/dri/renderD128", "render", "vgem", Memory.SYSTEM)
    names = [s.name for s in alloc.real_sources(Devices(drm=(card, render)))]
    assert names[-1] == "drm-dumb:card0" and len(names) == 4


def test_drm_availability_explains_vram_and_render_nodes():
    vram = DrmNode("/dev/null", "card", "bochs-drm", Memory.VRAM)
    reason = alloc.DrmDumbAllocator(vram).availability().reason
    assert "bochs-drm keeps buffers in VRAM" in reason
    render = DrmNode("/dev/null", "render", "vgem", Memory.SYSTEM)
    assert "card node" in alloc.DrmDumbAllocator(render).availability().reason


def test_udmabuf_without_device_closes_its_memfd(tmp_path, no_leak):
    source = alloc.UdmabufAllocator(str(tmp_path / "udmabuf"))
    with pytest.raises(alloc.AllocatorUnavailable, match="missing"):
        source.allocate(PAGE_SIZE)
    fd = make_memfd(PAGE_SIZE)
    with pytest.raises(alloc.AllocatorUnavailable):
        source.adopt_memfd(fd)
    assert not is_open(fd)


def test_udmabuf_adopt_refuses_an_unsealable_memfd(no_leak):
    fd = make_memfd(PAGE_SIZE, sealing=False)
    with pytest.raises(alloc.AllocationError, match="MFD_ALLOW_SEALING"):
        alloc.UdmabufAllocator("/dev/null").adopt_memfd(fd)
    assert not is_open(fd)


class FakeNative(types.SimpleNamespace):
    """Stands in for qubes_gpu_share.native: the ioctls return dups of
    /dev/zero fds as 'dma-bufs', or fail as told; records what was called."""

    def __init__(self, fail: str = ""):
        super().__init__(calls=[], fail=fail)

    def _call(self, name: str, result):
        self.calls.append(name)
        if name == self.fail:
            raise OSError(errno.ENOSYS, f"{name} refused")
        return result() if callable(result) else result

    def udmabuf_create(self, dev, memfd, offset, size):
        return self._call("udmabuf_create", lambda: os.dup(memfd))

    def drm_create_dumb(self, fd, width, height, bpp):
        return self._call("drm_create_dumb",
                          (7, width * bpp // 8, width * height * bpp // 8))

    def drm_prime_handle_to_fd(self, fd, handle):
        return self._call("drm_prime_handle_to_fd",
                          lambda: os.open("/dev/zero", os.O_RDWR))

    def drm_gem_close(self, fd, handle):
        self._call("drm_gem_close", None)


@pytest.fixture
def fake_native():
    def install(monkeypatch, fail=""):
        fake = FakeNative(fail)
        monkeypatch.setattr(base, "load_native", lambda: fake)
        for module in ("udmabuf", "drmdumb"):
            monkeypatch.setattr(f"qubes_gpu_share.alloc.{module}.load_native",
                                lambda: fake)
        return fake
    return install


def test_udmabuf_allocation_owns_memfd_and_dmabuf(monkeypatch, fake_native,
                                                  no_leak):
    fake_native(monkeypatch)
    with alloc.UdmabufAllocator("/dev/null").allocate(2 * PAGE_SIZE) as buf:
        assert buf.kind == "udmabuf" and buf.size == 2 * PAGE_SIZE
        assert len(buf._keep_fds) == 1


def test_udmabuf_ioctl_failure_leaks_nothing(monkeypatch, fake_native,
                                             no_leak):
    fake_native(monkeypatch, fail="udmabuf_create")
    with pytest.raises(OSError):
        alloc.UdmabufAllocator("/dev/null").allocate(PAGE_SIZE)


def test_drm_dumb_exports_then_drops_its_handle(monkeypatch, fake_native,
                                                no_leak):
    fake = fake_native(monkeypatch)
    node = DrmNode("/dev/null", "card", "vgem", Memory.SYSTEM)
    with alloc.DrmDumbAllocator(node).allocate(3 * PAGE_SIZE) as buf:
        assert buf.size == 3 * PAGE_SIZE and buf.kind == "drm-dumb"
    assert fake.calls == ["drm_create_dumb", "drm_prime_handle_to_fd",
                          "drm_gem_close"]


def test_drm_dumb_export_refused_still_closes_handle(monkeypatch, fake_native,
                                                     no_leak):
    fake = fake_native(monkeypatch, fail="drm_prime_handle_to_fd")
    node = DrmNode("/dev/null", "card", "bochs-drm", Memory.UNKNOWN)
    with pytest.raises(OSError, match="refused"):
        alloc.DrmDumbAllocator(node).allocate(PAGE_SIZE)
    assert fake.calls[-1] == "drm_gem_close"


# --- device sources for real, where this machine has them ---------------------

REAL = [alloc.UdmabufAllocator(), alloc.DmaHeapAllocator()]


@pytest.mark.parametrize("source", REAL, ids=lambda s: s.name)
def test_real_source_gives_a_mappable_dmabuf(source, no_leak):
    found = source.availability()
    if not found.ok:
        pytest.skip(f"{source.name}: {found.reason}")
    with source.allocate(PAGE_SIZE) as buf:
        assert base.fd_kind(buf.fd) == "dmabuf"
        assert base.fd_size(buf.fd) == PAGE_SIZE
        with buf.mmap() as view:
            view[:4] = b"abcd"
            assert view[:4] == b"abcd"

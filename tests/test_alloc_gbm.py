"""The GBM allocator: every refusal reason, with the real libgbm where this
machine lets it answer (library present, no render node; a device that is
not a GPU, which Mesa meets with its software fallback), fd hygiene on
every error path with libgbm replaced, and a real allocation on each render
node found (skipped with the reason elsewhere: the Xen lab runs it)."""

from __future__ import annotations

import errno
import os
import re

import pytest
import test_alloc

from qubes_gpu_share import alloc, devices
from qubes_gpu_share.alloc import base, gbm
from qubes_gpu_share.devices import Devices, DrmNode, Memory
from qubes_gpu_share.formats import MAX_DIMENSION, MOD_INVALID, PAGE_SIZE
from qubes_gpu_share.formats import drm_fourcc

#: every test here must leave no fd open (counted in /proc/self/fd)
no_leak = test_alloc.no_leak
pytestmark = pytest.mark.usefixtures("no_leak")

MISSING_NODE = "/nonexistent/dri/renderD128"
HEADER = "/usr/include/gbm.h"


def render(path: str = "/dev/null", driver: str = "vgem",
           memory: Memory = Memory.SYSTEM) -> DrmNode:
    return DrmNode(path, "render", driver, memory)


def real_libgbm() -> None:
    try:
        gbm.load_libgbm()
    except alloc.AllocatorUnavailable as exc:
        pytest.skip(str(exc))


# --- reasons known before touching the library or the device ------------------

@pytest.mark.parametrize("node, reason", [
    (None, "no DRM render node"),
    (DrmNode("/dev/dri/card0", "card", "vgem", Memory.SYSTEM),
     "/dev/dri/card0 is not a render node"),
    (render(MISSING_NODE, "bochs-drm", Memory.VRAM),
     "driver bochs-drm keeps buffers in VRAM: IMP_TO_REFS refuses them"),
])
def test_refusals_without_library_or_device(node, reason):
    source = gbm.GbmAllocator(node, library="libgbm-not-consulted.so.1")
    found = source.availability()
    assert not found.ok and reason in found.reason
    with pytest.raises(alloc.AllocatorUnavailable, match=re.escape(reason)):
        source.allocate(PAGE_SIZE)


def test_missing_library_names_the_packages():
    source = gbm.GbmAllocator(render(), library="libgbm-missing.so.1")
    reason = source.availability().reason
    assert reason.startswith("libgbm is not installed (Debian: libgbm1, "
                             "Fedora: mesa-libgbm)")
    assert "libgbm-missing.so.1" in reason


def test_real_library_without_a_render_node():
    real_libgbm()
    found = gbm.GbmAllocator(render(MISSING_NODE)).availability()
    assert not found.ok and found.reason == f"{MISSING_NODE} is missing"


def test_real_library_software_fallback_fails_at_allocation():
    """Mesa opens a GBM device even on a fd that is no GPU (kms_swrast),
    says yes to linear XR24, and fails at the dumb buffer: on a render
    node of a driver Mesa has no GBM driver for, the same happens."""
    real_libgbm()
    source = gbm.GbmAllocator(render("/dev/null"))
    found = source.availability()
    assert found.ok, found.reason
    assert found.reason == "driver vgem, GBM backend drm"
    with pytest.raises(alloc.AllocationError,
                       match="gbm_bo_create refused a linear 1024x1 XR24"):
        source.allocate(PAGE_SIZE)


def test_declared_constants_match_the_header():
    """GBM_BO_USE_LINEAR is declared in gbm.py; format codes come from
    formats.drm_fourcc. Both checked against libgbm-dev's header."""
    if not os.path.exists(HEADER):
        pytest.skip(f"{HEADER} is missing (libgbm-dev not installed)")
    with open(HEADER, encoding="utf-8") as f:
        text = f.read()
    shift = re.search(r"GBM_BO_USE_LINEAR\s*=\s*\(1 << (\d+)\)", text)
    assert shift and gbm.GBM_BO_USE_LINEAR == 1 << int(shift.group(1))
    chars = re.search(r"GBM_FORMAT_XRGB8888\s+__gbm_fourcc_code\("
                      r"'(.)', '(.)', '(.)', '(.)'\)", text)
    assert chars and "".join(chars.groups()) == "XR24"
    assert "((uint32_t)(a) | ((uint32_t)(b) << 8)" in text
    assert drm_fourcc("XR24") == int.from_bytes(b"XR24", "little")


def test_real_sources_list_each_render_node_through_gbm():
    nodes = (DrmNode("/dev/dri/card0", "card", "vgem", Memory.SYSTEM),
             render("/dev/dri/renderD128"), render("/dev/dri/renderD129"))
    names = [s.name for s in alloc.real_sources(Devices(drm=nodes))]
    assert names[2:] == ["gbm:renderD128", "gbm:renderD129",
                         "drm-dumb:card0"]
    assert not any(n.startswith("gbm") for n in
                   (s.name for s in alloc.real_sources(Devices())))


@pytest.mark.parametrize("size, shape", [
    (1, (1024, 1)),
    (MAX_DIMENSION * PAGE_SIZE, (1024, MAX_DIMENSION)),
    (MAX_DIMENSION * PAGE_SIZE + 1, (2048, MAX_DIMENSION // 2 + 1)),
    (65535 * PAGE_SIZE, (4096, 16384)),
])
def test_byte_sizes_become_images_drivers_accept(size, shape):
    assert gbm._blob_shape(base.round_to_pages(size)) == shape


# --- error paths with libgbm replaced: nothing leaks -------------------------

class FakeGbm:
    """Stands in for libgbm: a sealed memfd plays the dma-buf; fails the
    call named in ``fail``; counts live devices and buffers."""

    def __init__(self, fail: str = "", modifier: int = 0,
                 dmabuf_size: int | None = None, err: int = 0):
        self.fail, self.modifier, self.err = fail, modifier, err
        self.dmabuf_size = dmabuf_size
        self.live: set[str] = set()
        self.backend = gbm._ffi.new("char[]", b"fake")

    def _new(self, what: str):
        if self.fail == what:
            gbm._ffi.errno = self.err
            return gbm._ffi.NULL
        self.live.add(what)
        return what

    def gbm_create_device(self, fd):
        assert os.fstat(fd)
        return self._new("device")

    def gbm_device_destroy(self, device):
        self.live.remove("device")

    def gbm_device_get_backend_name(self, device):
        return self.backend

    def gbm_device_is_format_supported(self, device, code, flags):
        assert flags == gbm.GBM_BO_USE_LINEAR
        return self.fail != "format"

    def gbm_bo_create(self, device, width, height, code, flags):
        assert flags == gbm.GBM_BO_USE_LINEAR
        self.shape = (width, height)
        return self._new("bo")

    def gbm_bo_get_stride(self, bo):
        return self.shape[0] * 4

    def gbm_bo_get_modifier(self, bo):
        return self.modifier

    def gbm_bo_get_fd(self, bo):
        if self.fail == "fd":
            return -1
        width, height = self.shape
        size = self.dmabuf_size or base.round_to_pages(width * 4 * height)
        return alloc.MemfdAllocator().allocate(size).fd

    def gbm_bo_destroy(self, bo):
        self.live.remove("bo")


@pytest.fixture
def fake_gbm(monkeypatch):
    def install(**how) -> FakeGbm:
        fake = FakeGbm(**how)
        monkeypatch.setattr(gbm, "load_libgbm", lambda library: fake)
        return fake
    return install


def test_allocation_owns_a_mappable_dmabuf_and_nothing_else(fake_gbm):
    fake = fake_gbm(modifier=MOD_INVALID)
    source = gbm.GbmAllocator(render())
    assert source.availability().reason == "driver vgem, GBM backend fake"
    with source.allocate(PAGE_SIZE + 1) as buf:
        assert (buf.kind, buf.size, buf.stride) == ("gbm", 2 * PAGE_SIZE,
                                                    PAGE_SIZE)
        assert (buf.width, buf.height, buf.fourcc) == (1024, 2, "XR24")
        assert buf.modifier == 0  # implicit + GBM_BO_USE_LINEAR: linear
        with buf.mmap() as view:
            view[:4] = b"abcd"
        assert fake.live == set()


def test_gtt_driver_gets_a_caveat(fake_gbm):
    fake_gbm()
    found = gbm.GbmAllocator(render(driver="amdgpu",
                                    memory=Memory.GTT)).availability()
    assert found.ok and "may place a buffer in VRAM" in found.reason


@pytest.mark.parametrize("how, error, message", [
    ({"fail": "device", "err": errno.ENODEV}, alloc.AllocatorUnavailable,
     "Mesa has no GBM backend for driver vgem (gbm_create_device failed: "
     "No such device"),
    ({"fail": "format"}, alloc.AllocatorUnavailable,
     "does not support linear XR24"),
    ({"fail": "bo", "err": errno.EACCES}, alloc.AllocationError,
     "its software fallback makes dumb buffers"),
    ({"fail": "fd"}, alloc.AllocationError, "gbm_bo_get_fd failed"),
    ({"modifier": 0x0100000000000001}, alloc.AllocationError,
     "got modifier 0x100000000000001"),
    ({"dmabuf_size": PAGE_SIZE}, alloc.AllocationError,
     "4096 bytes for 2 rows of 4096"),
])
def test_every_failure_releases_device_buffer_and_fds(fake_gbm, how,
                                                      error, message):
    fake = fake_gbm(**how)
    with pytest.raises(error, match=re.escape(message)):
        gbm.GbmAllocator(render()).allocate(2 * PAGE_SIZE)
    assert fake.live == set()


@pytest.mark.parametrize("shape, message", [
    ((64, 64, "NV12"), "more than one plane"),
    ((0, 64, "XR24"), "width 0"),
    ((64, 64, "YUYV"), "not allowed"),
])
def test_bad_images_are_refused_before_the_device(fake_gbm, shape,
                                                  message):
    fake = fake_gbm()
    with pytest.raises(alloc.AllocationError, match=message):
        gbm.GbmAllocator(render()).allocate_image(*shape)
    assert not hasattr(fake, "shape")


# --- for real, on each render node this machine has ----------------------------

def render_nodes() -> list[DrmNode]:
    return [n for n in devices.scan().drm if n.kind == "render"]


@pytest.mark.parametrize("node", render_nodes() or [None],
                         ids=lambda n: n.node if n else "none")
def test_real_render_node_gives_a_linear_dmabuf(node):
    if node is None:
        pytest.skip("no DRM render node on this machine (the Xen lab has "
                    "vgem and virtio-gpu)")
    source = gbm.GbmAllocator(node)
    found = source.availability()
    if not found.ok:
        pytest.skip(f"{source.name}: {found.reason}")
    try:
        buf = source.allocate_image(256, 64, "XR24")
    except alloc.AllocationError as exc:
        if "software fallback" in str(exc):
            pytest.skip(str(exc))
        raise
    with buf:
        assert base.fd_kind(buf.fd) == "dmabuf"
        assert buf.size == base.fd_size(buf.fd) >= buf.stride * 64
        assert buf.stride >= 256 * 4 and buf.modifier == 0
        with buf.mmap(writable=False) as view:
            assert len(view) == buf.size

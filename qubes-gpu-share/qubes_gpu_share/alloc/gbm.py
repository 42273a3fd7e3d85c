"""GPU buffers through GBM (Mesa's libgbm) on a DRM render node.

Render nodes are what a GPU qube's unprivileged processes get (the render
group), and GBM is how they allocate buffers a GPU driver can render into:
so this is the source for "the GPU qube shares what its GPU draws". Buffers
are asked for LINEAR (the one layout another qube can read without vetting a
modifier) and exported as a dma-buf (gbm_bo_get_fd, a PRIME export).

Whether the pages are system RAM is the driver's business. VRAM-only
drivers are refused up front (IMP_TO_REFS would refuse their buffers, see
the table in :mod:`..devices`); drivers that may place a buffer in VRAM or
GTT get a caveat, and only granting tells (the probe does).

What Mesa does without a hardware GBM driver for the node (read from Mesa
22.3's gbm_dri.c and seen on this build machine with /dev/null as the
device): gbm_create_device falls back to the kms_swrast software driver
(backend name "drm"), which says yes to XR24 and then allocates a DRM dumb
buffer, which render nodes refuse (EACCES). That is expected on the lab's
vgem (Mesa has no vgem driver) and on virtio-gpu without virgl 3D; their
memory is granted through the drm-dumb source on the card node instead.
Mesa prints its own diagnostics ("MESA-LOADER: ...") on stderr.

The binding is cffi in ABI mode, opened at first use: the package builds
without Mesa's headers, and a qube without libgbm gets a reason, not an
ImportError.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
from collections.abc import Iterator
from typing import Any

import cffi

from ..devices import DrmNode, Memory
from ..formats import MAX_DIMENSION, MOD_INVALID, MOD_LINEAR, PAGE_SIZE
from ..formats import InvalidLayout, check_image_size, drm_fourcc
from ..formats import plane_formats
from .base import Allocation, AllocationError, Allocator
from .base import AllocatorUnavailable, Availability, fd_size, open_device
from .base import round_to_pages
from .drmdumb import ROW_PIXELS

LIBRARY = "libgbm.so.1"
PACKAGES = "Debian: libgbm1, Fedora: mesa-libgbm"
#: Mesa's DRI drivers (kms_swrast among them), which libgbm loads
DRI_PACKAGES = "Debian: libgl1-mesa-dri, Fedora: mesa-dri-drivers"

#: enum gbm_bo_flags in Mesa's gbm.h (Debian libgbm-dev 22.3.6,
#: /usr/include/gbm.h line 252: ``GBM_BO_USE_LINEAR = (1 << 4)``). Declared
#: here rather than read from the header at import: the header is in a -dev
#: package that no qube running the agent has. GBM format codes need no
#: such line: gbm.h packs them exactly as DRM fourccs (line 86,
#: ``__gbm_fourcc_code``), which :func:`..formats.drm_fourcc` computes.
GBM_BO_USE_LINEAR = 1 << 4

#: The format a byte-size request is laid out in: 32 bits per pixel.
BLOB_FOURCC = "XR24"

_ffi = cffi.FFI()
_ffi.cdef("""
struct gbm_device;
struct gbm_bo;
struct gbm_device *gbm_create_device(int fd);
void gbm_device_destroy(struct gbm_device *gbm);
const char *gbm_device_get_backend_name(struct gbm_device *gbm);
int gbm_device_is_format_supported(struct gbm_device *gbm,
                                   uint32_t format, uint32_t flags);
struct gbm_bo *gbm_bo_create(struct gbm_device *gbm, uint32_t width,
                             uint32_t height, uint32_t format,
                             uint32_t flags);
int gbm_bo_get_fd(struct gbm_bo *bo);
uint32_t gbm_bo_get_stride(struct gbm_bo *bo);
uint64_t gbm_bo_get_modifier(struct gbm_bo *bo);
void gbm_bo_destroy(struct gbm_bo *bo);
""")


@functools.lru_cache(maxsize=None)
def load_libgbm(library: str = LIBRARY) -> Any:
    """libgbm, opened once per name (a failure is not cached, so installing
    the package later is noticed)."""
    try:
        return _ffi.dlopen(library)
    except OSError as exc:
        # cffi appends what ctypes.util.find_library did not find: noise
        why = str(exc).split(".  Additionally", 1)[0]
        raise AllocatorUnavailable(
            f"libgbm is not installed ({PACKAGES}): {why}") from None


def _errno_text() -> str:
    """What the last libgbm call left in errno (it does not always set
    it: then nothing)."""
    code = _ffi.errno
    return f": {os.strerror(code)}" if code else ""


class GbmAllocation(Allocation):
    """A GBM buffer: one plane, LINEAR, ``stride`` bytes per row as the
    driver chose (at least the minimum, often aligned: not necessarily the
    canonical layout of :func:`..formats.linear_layout`)."""

    def __init__(self, fd: int, size: int, *, width: int, height: int,
                 fourcc: str, stride: int, modifier: int):
        super().__init__(fd, size, "gbm")
        self.width = width
        self.height = height
        self.fourcc = fourcc
        self.stride = stride
        self.modifier = modifier


def _blob_shape(size: int) -> tuple[int, int]:
    """Width and height of an XR24 image covering ``size`` bytes (whole
    pages): one page per row, widened by whole pages when the rows would
    exceed MAX_DIMENSION (drivers refuse taller images)."""
    pages = size // PAGE_SIZE
    pages_per_row = -(-pages // MAX_DIMENSION)
    return ROW_PIXELS * pages_per_row, -(-pages // pages_per_row)


class GbmAllocator(Allocator):
    """Linear buffers from libgbm on one render node, exported as dma-bufs.

    ``node`` None means this qube has no render node (the probe lists one
    allocator per render node found, so it passes none); ``library`` is
    the name given to the dynamic loader."""

    def __init__(self, node: DrmNode | None, library: str = LIBRARY):
        self.node = node
        self.library = library
        self.name = "gbm:" + (os.path.basename(node.node) if node
                              else "no-render-node")

    # --- what can be known before allocating ------------------------------

    def _driver(self) -> str:
        return (self.node and self.node.driver) or "no driver"

    def _refusal(self) -> str | None:
        """Why this node cannot give grantable GBM buffers, without touching
        the library or the device."""
        if self.node is None:
            return "no DRM render node (no GPU, or its driver is not loaded)"
        if self.node.kind != "render":
            return f"{self.node.node} is not a render node"
        if self.node.memory is Memory.VRAM:
            return (f"driver {self._driver()} keeps buffers in VRAM: "
                    f"IMP_TO_REFS refuses them (Xen grants only system RAM "
                    f"pages)")
        return None

    @contextlib.contextmanager
    def _device(self) -> Iterator[tuple[Any, Any]]:
        """libgbm and a GBM device on the node; both the device and the
        node's fd are gone when the block ends, however it ends."""
        refusal = self._refusal()
        if refusal:
            raise AllocatorUnavailable(refusal)
        lib = load_libgbm(self.library)
        fd = open_device(self.node.node)
        try:
            device = lib.gbm_create_device(fd)
            if device == _ffi.NULL:
                raise AllocatorUnavailable(
                    f"Mesa has no GBM backend for driver {self._driver()} "
                    f"(gbm_create_device failed{_errno_text()}; the DRI "
                    f"drivers are in {DRI_PACKAGES})")
            try:
                yield lib, device
            finally:
                lib.gbm_device_destroy(device)
        finally:
            os.close(fd)

    def _check_format(self, lib: Any, device: Any, fourcc: str) -> int:
        """The GBM code of ``fourcc`` if the backend can make it linear."""
        code = drm_fourcc(fourcc)
        if not lib.gbm_device_is_format_supported(device, code,
                                                  GBM_BO_USE_LINEAR):
            raise AllocatorUnavailable(
                f"the GBM backend of driver {self._driver()} does not "
                f"support linear {fourcc}")
        return code

    def availability(self) -> Availability:
        """Opens the node and a GBM device and asks for linear XR24; a
        software fallback passes this and fails at allocation (see the
        module docstring), which the probe then reports."""
        try:
            with self._device() as (lib, device):
                self._check_format(lib, device, BLOB_FOURCC)
                backend = _ffi.string(
                    lib.gbm_device_get_backend_name(device)).decode(
                        "ascii", "replace")
        except AllocatorUnavailable as exc:
            return Availability(False, str(exc))
        found = f"driver {self._driver()}, GBM backend {backend}"
        if self.node.memory is not Memory.SYSTEM:
            found += "; it may place a buffer in VRAM: only granting tells"
        return Availability(True, found)

    # --- allocating ---------------------------------------------------------

    def allocate(self, size: int) -> GbmAllocation:
        """At least ``size`` bytes, as an XR24 image of page-wide rows."""
        return self.allocate_image(*_blob_shape(round_to_pages(size)),
                                   BLOB_FOURCC)

    def allocate_image(self, width: int, height: int,
                       fourcc: str) -> GbmAllocation:
        """A linear single-plane image (XR24, AR24, XB24, AB24, R8, RG88).
        Multi-plane formats are refused: their plane offsets would need
        calls this binding leaves out."""
        try:
            check_image_size(width, height, fourcc)
            if len(plane_formats(fourcc)) != 1:
                raise InvalidLayout(f"{fourcc} has more than one plane; "
                                    f"GBM buffers here are single-plane")
        except InvalidLayout as exc:
            raise AllocationError(f"{self.name}: {exc}") from None
        with self._device() as (lib, device):
            code = self._check_format(lib, device, fourcc)
            bo = lib.gbm_bo_create(device, width, height, code,
                                   GBM_BO_USE_LINEAR)
            if bo == _ffi.NULL:
                raise AllocationError(self._create_failed(width, height,
                                                          fourcc))
            try:
                stride = lib.gbm_bo_get_stride(bo)
                modifier = self._linear(lib.gbm_bo_get_modifier(bo))
                dmabuf = lib.gbm_bo_get_fd(bo)
                if dmabuf < 0:
                    raise AllocationError(
                        f"{self.name}: gbm_bo_get_fd failed{_errno_text()}")
            finally:
                # the dma-buf holds its own reference to the buffer
                lib.gbm_bo_destroy(bo)
        return self._wrap(dmabuf, width=width, height=height, fourcc=fourcc,
                          stride=stride, modifier=modifier)

    def _create_failed(self, width: int, height: int, fourcc: str) -> str:
        why = (f"{self.name}: gbm_bo_create refused a linear {width}x{height}"
               f" {fourcc} buffer{_errno_text()}")
        if _ffi.errno == errno.EACCES:
            why += (f" (Mesa has no hardware GBM driver for "
                    f"{self._driver()}: its software fallback makes dumb "
                    f"buffers, which render nodes refuse)")
        return why

    def _linear(self, modifier: int) -> int:
        """The modifier to record: LINEAR. INVALID means the driver keeps
        the layout implicit, which GBM_BO_USE_LINEAR makes linear."""
        if modifier in (MOD_LINEAR, MOD_INVALID):
            return MOD_LINEAR
        raise AllocationError(f"{self.name}: asked for a linear buffer, got "
                              f"modifier {modifier:#x}")

    def _wrap(self, dmabuf: int, **meta: Any) -> GbmAllocation:
        """Own ``dmabuf`` if it is whole pages holding every row; close it
        otherwise."""
        try:
            size = fd_size(dmabuf)
            rows_end = meta["stride"] * meta["height"]
            if size <= 0 or size % PAGE_SIZE or size < rows_end:
                raise AllocationError(
                    f"{self.name}: the driver returned a buffer of {size} "
                    f"bytes for {meta['height']} rows of {meta['stride']}: "
                    f"not whole pages holding every row")
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(dmabuf)
            raise
        return GbmAllocation(dmabuf, size, **meta)

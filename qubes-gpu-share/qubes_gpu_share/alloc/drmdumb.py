"""GPU buffers: DRM dumb buffers exported as dma-bufs (PRIME).

A dumb buffer is linear and, on drivers whose GEM objects live in system RAM
(vgem, virtio-gpu: measured in the Xen lab), made of ordinary pages that
IMP_TO_REFS accepts. Drivers with VRAM-only memory managers (bochs-drm,
cirrus, qxl) cannot export them at all or only as device memory: the
allocator reports that from the driver table in :mod:`..devices` rather
than trying. Dumb buffers need a primary (card) node: render nodes refuse
DRM_IOCTL_MODE_CREATE_DUMB.
"""

from __future__ import annotations

import contextlib
import os

from ..devices import DrmNode, Memory
from ..formats import PAGE_SIZE
from .base import Allocation, AllocationError, Allocator, Availability
from .base import device_availability, load_native, open_device
from .base import round_to_pages

#: 32 bits per pixel and one page per row: a byte size maps onto
#: ``size / PAGE_SIZE`` rows and the pitch rarely needs padding.
BPP = 32
ROW_PIXELS = PAGE_SIZE // (BPP // 8)


class DrmDumbAllocator(Allocator):
    """Linear dumb buffers on one DRM card node, exported with PRIME."""

    def __init__(self, node: DrmNode):
        self.node = node
        self.name = f"drm-dumb:{os.path.basename(node.node)}"

    def availability(self) -> Availability:
        driver = self.node.driver or "no driver"
        if self.node.kind != "card":
            return Availability(False, "dumb buffers need a card node, "
                                       "render nodes refuse them")
        if self.node.memory is Memory.VRAM:
            return Availability(
                False, f"driver {driver} keeps buffers in VRAM: Xen can "
                       f"grant only system RAM pages")
        found = device_availability(self.node.node)
        if found.ok and self.node.memory is not Memory.SYSTEM:
            return Availability(True, f"driver {driver} may place a buffer "
                                      f"in VRAM; only granting tells")
        return found

    def allocate(self, size: int) -> Allocation:
        size = round_to_pages(size)
        native = load_native()
        card = open_device(self.node.node)
        try:
            handle, _pitch, got = native.drm_create_dumb(
                card, ROW_PIXELS, size // PAGE_SIZE, BPP)
            try:
                dmabuf = native.drm_prime_handle_to_fd(card, handle)
            finally:
                # the dma-buf holds its own reference to the object
                native.drm_gem_close(card, handle)
        finally:
            os.close(card)
        if got % PAGE_SIZE:
            with contextlib.suppress(OSError):
                os.close(dmabuf)
            raise AllocationError(f"{self.name}: the driver returned a "
                                  f"buffer of {got} bytes, not whole pages")
        return Allocation(dmabuf, got, "drm-dumb")

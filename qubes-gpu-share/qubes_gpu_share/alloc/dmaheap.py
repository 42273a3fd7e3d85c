"""dma-heaps (/dev/dma_heap/NAME, DMA_HEAP_IOCTL_ALLOC).

The ``system`` heap hands out dma-bufs of ordinary system RAM pages, which
IMP_TO_REFS accepts; other heaps (``linux,cma``, vendor heaps) may not be
grantable, which only trying tells (the probe does). Needs CONFIG_DMABUF_HEAPS.
"""

from __future__ import annotations

import os

from .base import Allocation, Allocator, Availability, device_availability
from .base import load_native, open_device, round_to_pages

HEAP_DIR = "/dev/dma_heap"


class DmaHeapAllocator(Allocator):
    """dma-bufs from one dma-heap, by default the system heap."""

    def __init__(self, path: str = os.path.join(HEAP_DIR, "system")):
        self.path = path
        self.name = f"dma-heap:{os.path.basename(path)}"

    def availability(self) -> Availability:
        return device_availability(self.path)

    def allocate(self, size: int) -> Allocation:
        size = round_to_pages(size)
        native = load_native()
        heap = open_device(self.path)
        try:
            dmabuf = native.dma_heap_alloc(heap, size)
        finally:
            os.close(heap)
        return Allocation(dmabuf, size, "dma-heap")

"""Buffer allocation: one interface (:mod:`.base`), one module per source.

:func:`real_sources` lists the sources this machine could have, present or
not, so that the probe and the agent report each one with its reason.
"""

from __future__ import annotations

from ..devices import Devices
from .base import Allocation, AllocationError, Allocator, AllocatorUnavailable
from .base import Availability, NotMappable, adopt
from .dmaheap import DmaHeapAllocator
from .drmdumb import DrmDumbAllocator
from .gbm import GbmAllocator
from .memfd import MemfdAllocator
from .udmabuf import UdmabufAllocator

__all__ = [
    "Allocation", "AllocationError", "Allocator", "AllocatorUnavailable",
    "Availability", "NotMappable", "adopt", "real_sources",
    "MemfdAllocator", "UdmabufAllocator", "DmaHeapAllocator",
    "DrmDumbAllocator", "GbmAllocator",
]


def real_sources(devices: Devices) -> list[Allocator]:
    """Every dma-buf source of the real grant device: udmabuf and the
    system heap even when missing (the reason is the news), each other
    dma-heap found, each DRM render node through GBM, and each DRM card
    node (dumb buffers)."""
    sources: list[Allocator] = [UdmabufAllocator(devices.udmabuf or
                                                 "/dev/udmabuf")]
    heaps = devices.dma_heaps or ("/dev/dma_heap/system",)
    sources += [DmaHeapAllocator(path) for path in heaps]
    sources += [GbmAllocator(node) for node in devices.drm
                if node.kind == "render"]
    sources += [DrmDumbAllocator(node) for node in devices.drm
                if node.kind == "card"]
    return sources

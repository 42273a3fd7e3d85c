"""memfd + udmabuf: ordinary shared memory as a dma-buf (UDMABUF_CREATE).

The most widely useful source: it needs no GPU, its pages are system RAM (so
IMP_TO_REFS accepts them), and it is how an application's memfd shared
memory (Wayland SHM, for one) becomes a dma-buf that can be granted without
a copy (qubes-issues #8973). The kernel needs CONFIG_UDMABUF; Debian's stock
kernel lacks it (XEN-LAB.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import os

from .base import Allocation, AllocationError, Allocator, Availability
from .base import close_fds, device_availability, fd_kind, fd_size
from .base import load_native, open_device, round_to_pages
from .memfd import SEALS, create_sealed_memfd

UDMABUF_PATH = "/dev/udmabuf"


class UdmabufAllocator(Allocator):
    """dma-bufs made from sealed memfds by /dev/udmabuf."""

    name = "udmabuf"

    def __init__(self, path: str = UDMABUF_PATH):
        self.path = path

    def availability(self) -> Availability:
        return device_availability(self.path)

    def allocate(self, size: int) -> Allocation:
        size = round_to_pages(size)
        return self._wrap(create_sealed_memfd(size), size)

    def adopt_memfd(self, memfd: int) -> Allocation:
        """Turn an application's memfd (created with MFD_ALLOW_SEALING, whole
        pages) into a dma-buf. Takes ownership of ``memfd`` in every case."""
        try:
            if fd_kind(memfd) != "memfd":
                raise AllocationError("the offered fd is not a memfd")
            size = fd_size(memfd)
            if size <= 0 or size != round_to_pages(size):
                raise AllocationError(
                    f"the offered memfd is {size} bytes: not whole pages")
            fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, SEALS)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.close(memfd)
            raise AllocationError(
                f"cannot seal the offered memfd (created without "
                f"MFD_ALLOW_SEALING?): {exc}") from None
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(memfd)
            raise
        return self._wrap(memfd, size)

    def _wrap(self, memfd: int, size: int) -> Allocation:
        """UDMABUF_CREATE over a sealed memfd we own; the allocation keeps
        the memfd open beside the dma-buf."""
        try:
            native = load_native()
            dev = open_device(self.path)
            try:
                dmabuf = native.udmabuf_create(dev, memfd, 0, size)
            finally:
                os.close(dev)
        except BaseException:
            close_fds((memfd,))
            raise
        return Allocation(dmabuf, size, "udmabuf", keep_fds=(memfd,))

"""Plain memfd buffers: the simulated allocation seam, and udmabuf's input.

A memfd is not a dma-buf, so the real grant device refuses it; the grant
simulator accepts it in its place (it shares the memfd's pages with the
consumer process), which is what tests and ``make demo`` use. The same
sealed memfd is what udmabuf turns into a real dma-buf.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

from .base import Allocation, AllocationError, Allocator, Availability
from .base import round_to_pages

#: udmabuf requires F_SEAL_SHRINK (pages must not vanish under the device)
#: and refuses F_SEAL_WRITE; growing is sealed too, as the size is fixed.
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


def create_sealed_memfd(size: int, name: str = "qubes-gpu-share") -> int:
    """A memfd of ``size`` bytes (whole pages) that can no longer shrink or
    grow. The caller owns the returned fd; nothing leaks on failure."""
    size = round_to_pages(size)
    try:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as exc:
        raise AllocationError(f"memfd_create failed: {exc}") from None
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise AllocationError(f"cannot size and seal a memfd of {size} "
                              f"bytes: {exc}") from None
    return fd


class MemfdAllocator(Allocator):
    """Sealed memfds: what the grant simulator accepts as a dma-buf."""

    name = "memfd"

    def availability(self) -> Availability:
        if not hasattr(os, "memfd_create"):
            return Availability(False, "this Python has no os.memfd_create")
        return Availability(
            True, "a memfd is not a dma-buf: only the grant simulator "
                  "accepts it; the real device needs udmabuf")

    def allocate(self, size: int) -> Allocation:
        size = round_to_pages(size)
        return Allocation(create_sealed_memfd(size), size, "memfd")

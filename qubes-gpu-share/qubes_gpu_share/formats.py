"""Buffer metadata: what travels beside the grant refs (pure, no I/O).

Xen grants pages, not images: the consumer can only interpret the pages if it
knows the layout. DESIGN.md: total size, width, height, DRM fourcc, modifier
and per plane stride and offset, checked by the broker to fit in the size.

The data types below are shared by the protocol, the registry, the decision
core and the agents; the validation and layout functions live here too so
that one place knows what a legal buffer is.
"""

from __future__ import annotations

import dataclasses

PAGE_SIZE = 4096
#: The kernel keeps the grant count of one dma-buf in 16 bits (DESIGN.md).
MAX_LEASE_PAGES = 65535
MAX_PLANES = 4
#: DRM_FORMAT_MOD_LINEAR
MOD_LINEAR = 0


@dataclasses.dataclass(frozen=True)
class Plane:
    """One plane of an image buffer: bytes per row and where it starts."""

    stride: int
    offset: int


@dataclasses.dataclass(frozen=True)
class BufferMeta:
    """Layout of a leased buffer.

    ``fourcc`` is the four-character DRM code as text ("XR24", "NV12", ...)
    or "BLOB" for a compute buffer with no image layout (then width is the
    size in bytes, height is 1 and there is one plane of stride = width).
    """

    pages: int
    width: int
    height: int
    fourcc: str
    modifier: int
    planes: tuple[Plane, ...]

    @property
    def size(self) -> int:
        """Size of the buffer in bytes (whole pages)."""
        return self.pages * PAGE_SIZE

"""Buffer metadata: what travels beside the grant refs (pure, no I/O).

Xen grants pages, not images: the consumer can only interpret the pages if it
knows the layout. DESIGN.md: total size, width, height, DRM fourcc, modifier
and per plane stride and offset, checked by the broker to fit in the size.

The data types below are shared by the protocol, the registry, the decision
core and the agents; the validation and layout functions live here too so
that one place knows what a legal buffer is.

Who decides a layout: the broker. A consumer (or an offering qube) describes
what it wants (:class:`ImageSpec` or :class:`BlobSpec`), the broker computes
the one canonical :class:`BufferMeta` with :func:`layout_for`, and the
provider must allocate exactly that. So neither qube can smuggle a layout
whose planes reach outside the granted pages: :func:`validate_meta` is the
check every side runs on metadata it did not compute itself.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Collection

PAGE_SIZE = 4096
#: The kernel keeps the grant count of one dma-buf in 16 bits (DESIGN.md).
MAX_LEASE_PAGES = 65535
MAX_LEASE_BYTES = MAX_LEASE_PAGES * PAGE_SIZE
MAX_PLANES = 4
#: DRM_FORMAT_MOD_LINEAR
MOD_LINEAR = 0
#: DRM_FORMAT_MOD_INVALID: never a real layout, refused everywhere.
MOD_INVALID = 0x00FFFFFFFFFFFFFF
MAX_MODIFIER = 2**64 - 1
#: Largest image side: what DRM drivers accept for scanout and textures.
MAX_DIMENSION = 16384
#: Canonical row alignment in bytes. 256 satisfies every GPU driver's
#: linear-import rule we know of (amdgpu 256, i915 64, nouveau 256), so a
#: canonical buffer can be imported as a texture anywhere.
STRIDE_ALIGN = 256
#: Canonical plane alignment: each plane starts on its own page, so a plane
#: can be mapped or imported on its own.
PLANE_ALIGN = PAGE_SIZE
BLOB = "BLOB"


class InvalidLayout(ValueError):
    """Buffer metadata or a buffer request that is not legal; one line."""


class ReceiveMode(str, enum.Enum):
    """How a consumer receives a leased buffer (DESIGN.md, hard facts).

    Kept here, in the pure core, because the protocol, the decision core and
    the grant device all name it and the broker must not import grant/.
    """

    #: MAP_GRANT_REF + mmap: the application gets an fd it can mmap.
    CPU = "cpu"
    #: EXP_FROM_REFS: the application gets a dma-buf for GPU import (PRIME);
    #: it has no mmap.
    DMABUF = "dmabuf"


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


@dataclasses.dataclass(frozen=True)
class PlaneFormat:
    """Bytes per pixel of one plane and its subsampling against the image."""

    cpp: int
    hsub: int = 1
    vsub: int = 1


#: The allow-list: DRM fourcc -> its planes. Anything else is refused.
FORMATS: dict[str, tuple[PlaneFormat, ...]] = {
    "XR24": (PlaneFormat(4),),                    # XRGB8888
    "AR24": (PlaneFormat(4),),                    # ARGB8888
    "XB24": (PlaneFormat(4),),                    # XBGR8888
    "AB24": (PlaneFormat(4),),                    # ABGR8888
    "R8": (PlaneFormat(1),),                      # R8 (DRM code "R8  ")
    "RG88": (PlaneFormat(2),),                    # RG88
    "NV12": (PlaneFormat(1), PlaneFormat(2, 2, 2)),  # Y, then CbCr 2x2
    "P010": (PlaneFormat(2), PlaneFormat(4, 2, 2)),  # 16-bit Y, CbCr 2x2
    BLOB: (PlaneFormat(1),),                      # bytes, no image layout
}


def drm_fourcc(fourcc: str) -> int:
    """The 32-bit DRM_FORMAT_* code of an allowed image format (names
    shorter than four characters are padded with spaces, as DRM does)."""
    if fourcc == BLOB:
        raise InvalidLayout("BLOB is not a DRM format")
    plane_formats(fourcc)
    return int.from_bytes(fourcc.ljust(4).encode("ascii"), "little")


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """What a consumer asks for when it wants an image buffer."""

    width: int
    height: int
    fourcc: str
    modifier: int = MOD_LINEAR


@dataclasses.dataclass(frozen=True)
class BlobSpec:
    """What a consumer asks for when it wants raw bytes (compute buffers)."""

    nbytes: int


BufferSpec = ImageSpec | BlobSpec


def _check_range(what: str, value: int, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidLayout(f"{what} must be an integer")
    if not low <= value <= high:
        raise InvalidLayout(f"{what} {value} is outside {low}..{high}")
    return value


def _pages_for(nbytes: int) -> int:
    return -(-nbytes // PAGE_SIZE)


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def plane_formats(fourcc: str) -> tuple[PlaneFormat, ...]:
    """The planes of an allowed fourcc; refuses everything else."""
    try:
        return FORMATS[fourcc]
    except (KeyError, TypeError):
        raise InvalidLayout(
            f"format {str(fourcc)[:8]!r} is not allowed") from None


def check_image_size(width: int, height: int, fourcc: str) -> None:
    """Width and height in range and divisible by the chroma subsampling
    (a half-pixel chroma row has no defined meaning between drivers)."""
    formats = plane_formats(fourcc)
    _check_range("width", width, 1, MAX_DIMENSION)
    _check_range("height", height, 1, MAX_DIMENSION)
    for plane in formats:
        if width % plane.hsub or height % plane.vsub:
            raise InvalidLayout(
                f"{fourcc} needs width and height divisible by "
                f"{plane.hsub}x{plane.vsub}")


def _plane_rows(meta: BufferMeta, plane: PlaneFormat) -> int:
    return meta.height // plane.vsub


def _min_stride(meta: BufferMeta, plane: PlaneFormat) -> int:
    return meta.width // plane.hsub * plane.cpp


def linear_layout(width: int, height: int, fourcc: str) -> BufferMeta:
    """The canonical LINEAR layout of an image: rows aligned to
    STRIDE_ALIGN, planes in order, each starting on a page."""
    if fourcc == BLOB:
        raise InvalidLayout("BLOB has no image layout; use blob_layout")
    check_image_size(width, height, fourcc)
    planes = []
    end = 0
    for plane in FORMATS[fourcc]:
        stride = _align(width // plane.hsub * plane.cpp, STRIDE_ALIGN)
        offset = _align(end, PLANE_ALIGN)
        planes.append(Plane(stride, offset))
        end = offset + stride * (height // plane.vsub)
    pages = _pages_for(end)
    if pages > MAX_LEASE_PAGES:
        raise InvalidLayout(
            f"{width}x{height} {fourcc} needs {pages} pages, more than "
            f"{MAX_LEASE_PAGES} in one lease")
    return BufferMeta(pages, width, height, fourcc, MOD_LINEAR, tuple(planes))


def blob_layout(nbytes: int) -> BufferMeta:
    """The layout of a raw buffer of ``nbytes`` bytes (rounded up to pages)."""
    _check_range("blob size", nbytes, 1, MAX_LEASE_BYTES)
    return BufferMeta(_pages_for(nbytes), nbytes, 1, BLOB, MOD_LINEAR,
                      (Plane(nbytes, 0),))


def check_spec(spec: BufferSpec) -> BufferSpec:
    """Refuse a request that names no legal buffer (before any layout)."""
    if isinstance(spec, BlobSpec):
        _check_range("blob size", spec.nbytes, 1, MAX_LEASE_BYTES)
    elif isinstance(spec, ImageSpec):
        if spec.fourcc == BLOB:
            raise InvalidLayout("BLOB is asked for by size, not as an image")
        check_image_size(spec.width, spec.height, spec.fourcc)
        check_modifier(spec.modifier, None)
    else:
        raise InvalidLayout(f"not a buffer request: {type(spec).__name__}")
    return spec


def layout_for(spec: BufferSpec) -> BufferMeta:
    """What the broker computes for a request. The layout is the linear one;
    a non-linear modifier the admin vetted keeps it (the modifier only
    tells the importer how the bytes are ordered inside the same extent)."""
    check_spec(spec)
    if isinstance(spec, BlobSpec):
        return blob_layout(spec.nbytes)
    meta = linear_layout(spec.width, spec.height, spec.fourcc)
    return dataclasses.replace(meta, modifier=spec.modifier)


def check_modifier(modifier: int,
                   allowed: Collection[int] | None) -> int:
    """A modifier in u64 range, not INVALID, and in ``allowed`` unless that
    is None (None: any modifier; for parsing, before the admin's policy)."""
    _check_range("modifier", modifier, 0, MAX_MODIFIER)
    if modifier == MOD_INVALID:
        raise InvalidLayout("modifier DRM_FORMAT_MOD_INVALID is not a layout")
    if allowed is not None and modifier not in allowed:
        raise InvalidLayout(f"modifier {modifier:#x} is not allowed")
    return modifier


def _check_planes(meta: BufferMeta, formats: tuple[PlaneFormat, ...]) -> None:
    """Each plane holds its rows, lies inside the buffer, and starts after
    the previous one ends (no plane may alias another)."""
    if not isinstance(meta.planes, tuple) or len(meta.planes) != len(formats):
        raise InvalidLayout(
            f"{meta.fourcc} has {len(formats)} plane(s), metadata gives "
            f"{len(meta.planes) if isinstance(meta.planes, tuple) else '?'}")
    end = 0
    for index, (plane, fmt) in enumerate(zip(meta.planes, formats)):
        if not isinstance(plane, Plane):
            raise InvalidLayout(f"plane {index} is not a Plane")
        _check_range(f"plane {index} stride", plane.stride,
                     _min_stride(meta, fmt), meta.size)
        _check_range(f"plane {index} offset", plane.offset, end, meta.size)
        end = plane.offset + plane.stride * _plane_rows(meta, fmt)
        if end > meta.size:
            raise InvalidLayout(
                f"plane {index} ends at byte {end}, past the buffer size "
                f"{meta.size}")


def validate_meta(meta: BufferMeta, *, max_pages: int = MAX_LEASE_PAGES,
                  allowed_modifiers: Collection[int] | None = (MOD_LINEAR,),
                  ) -> BufferMeta:
    """Return ``meta`` if it is a legal buffer, else raise InvalidLayout.

    ``max_pages`` is the per-lease cap (never above MAX_LEASE_PAGES);
    ``allowed_modifiers`` the modifiers the admin vetted (None: any, for a
    parser that checks the admin's policy later).
    """
    if not isinstance(meta, BufferMeta):
        raise InvalidLayout(f"not buffer metadata: {type(meta).__name__}")
    _check_range("pages", meta.pages, 1, min(max_pages, MAX_LEASE_PAGES))
    formats = plane_formats(meta.fourcc)
    check_modifier(meta.modifier, allowed_modifiers)
    if meta.fourcc == BLOB:
        _check_range("blob size", meta.width, 1, meta.size)
        if meta.height != 1 or meta.modifier != MOD_LINEAR \
                or meta.planes != (Plane(meta.width, 0),):
            raise InvalidLayout(
                "BLOB is height 1, LINEAR, one plane of stride = width at 0")
    else:
        check_image_size(meta.width, meta.height, meta.fourcc)
    _check_planes(meta, formats)
    return meta

"""A test picture for XR24 buffers, its check, and a PNG of what was seen.

The provider's application draws :func:`pattern_bytes` into a leased
buffer; the consumer compares the whole mapping with the same bytes, built
once (one ``==`` over the buffer, not a loop per pixel), and saves what it
saw with :func:`xr24_png`. Only zlib and struct: the project has no image
dependency and needs none for this.
"""

from __future__ import annotations

import struct
import zlib

from ..formats import BufferMeta

#: Colour bars as (R, G, B): white, yellow, cyan, green, magenta, red, blue,
#: black, the SMPTE order a person recognises.
BARS = ((235, 235, 235), (235, 235, 16), (16, 235, 235), (16, 235, 16),
        (235, 16, 235), (235, 16, 16), (16, 16, 235), (16, 16, 16))


def _xr24(rgb: tuple[int, int, int]) -> bytes:
    """One XRGB8888 pixel in memory order (little-endian: B, G, R, X)."""
    red, green, blue = rgb
    return bytes((blue, green, red, 0xFF))


def _bars_row(width: int, seed: int) -> bytes:
    """Bars rotated by *seed*, so two leases carry different pictures."""
    edges = [width * i // len(BARS) for i in range(len(BARS) + 1)]
    return b"".join(_xr24(BARS[(i + seed) % len(BARS)]) * (edges[i + 1] - edges[i])
                    for i in range(len(BARS)))


def _ramp_row(width: int) -> bytes:
    """A grey ramp, black to white, left to right."""
    return b"".join(_xr24((v, v, v))
                    for v in (x * 255 // max(width - 1, 1) for x in range(width)))


def pattern_bytes(meta: BufferMeta, seed: int = 0) -> bytes:
    """The whole buffer (``meta.pages`` pages) as the provider draws it:
    bars on the top two thirds, a grey ramp below, zero padding past each
    row's pixels and after the last row."""
    if meta.fourcc != "XR24" or len(meta.planes) != 1:
        raise ValueError(f"test pattern is for one-plane XR24, not "
                         f"{meta.fourcc}")
    stride, offset = meta.planes[0].stride, meta.planes[0].offset
    pad = bytes(stride - meta.width * 4)
    bars = _bars_row(meta.width, seed) + pad
    ramp = _ramp_row(meta.width) + pad
    split = meta.height * 2 // 3
    image = bars * split + ramp * (meta.height - split)
    size = meta.pages * 4096
    return bytes(offset) + image + bytes(size - offset - len(image))


def first_difference(seen, expected: bytes) -> int | None:
    """None when *seen* (any buffer: an mmap, bytes) equals *expected*,
    else the first differing byte offset (found only after a mismatch)."""
    view = memoryview(seen)
    if len(view) == len(expected) and view == expected:
        return None
    for offset in range(0, min(len(view), len(expected)), 4096):
        if view[offset:offset + 4096] != expected[offset:offset + 4096]:
            page = bytes(view[offset:offset + 4096])
            want = expected[offset:offset + 4096]
            return offset + next(i for i in range(len(page))
                                 if page[i] != want[i])
    return min(len(view), len(expected))


def xr24_png(meta: BufferMeta, data) -> bytes:
    """A PNG (8-bit RGB) of the XR24 image in *data* (the whole buffer)."""
    stride, offset = meta.planes[0].stride, meta.planes[0].offset
    view = memoryview(data)
    rows = []
    for y in range(meta.height):
        pixels = view[offset + y * stride:offset + y * stride + meta.width * 4]
        rgb = bytearray(meta.width * 3)
        rgb[0::3] = pixels[2::4]
        rgb[1::3] = pixels[1::4]
        rgb[2::3] = pixels[0::4]
        rows.append(b"\0" + rgb)  # filter type 0 (none) per row
    header = struct.pack(">IIBBBBB", meta.width, meta.height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(b"".join(rows), 6))
            + _chunk(b"IEND", b""))


def _chunk(kind: bytes, body: bytes) -> bytes:
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body)))

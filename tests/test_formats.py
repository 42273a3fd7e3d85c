"""Buffer metadata: the allow-list, the canonical layouts and the checks
that keep every plane inside the granted pages."""

import dataclasses

import pytest
from hypothesis import given, strategies as st

from qubes_gpu_share import formats
from qubes_gpu_share.formats import (
    BLOB, MAX_LEASE_PAGES, MOD_INVALID, MOD_LINEAR, PAGE_SIZE, STRIDE_ALIGN,
    BlobSpec, BufferMeta, ImageSpec, InvalidLayout, Plane, blob_layout,
    check_spec, drm_fourcc, layout_for, linear_layout, validate_meta)

IMAGE_FORMATS = sorted(set(formats.FORMATS) - {BLOB})

#: (fourcc, width, height) -> expected (pages, [(stride, offset), ...]),
#: computed by hand from the DRM definitions.
KNOWN = {
    ("XR24", 3840, 2160): (8100, [(15360, 0)]),
    ("AR24", 100, 10): (2, [(512, 0)]),
    ("XB24", 64, 64): (4, [(256, 0)]),
    ("AB24", 1, 1): (1, [(256, 0)]),
    ("R8", 300, 2): (1, [(512, 0)]),
    ("RG88", 128, 3): (1, [(256, 0)]),
    ("NV12", 1920, 1080): (810, [(2048, 0), (2048, 2048 * 1080)]),
    ("P010", 1920, 1080): (1520, [(3840, 0), (3840, 1013 * 4096)]),
}


def test_required_formats_are_allowed():
    for fourcc in ("XR24", "AR24", "XB24", "AB24", "NV12", "P010", "R8",
                   "RG88", "BLOB"):
        assert fourcc in formats.FORMATS


@pytest.mark.parametrize("key", sorted(KNOWN))
def test_linear_layout_matches_hand_computed(key):
    fourcc, width, height = key
    pages, planes = KNOWN[key]
    meta = linear_layout(width, height, fourcc)
    assert meta.pages == pages
    assert [(p.stride, p.offset) for p in meta.planes] == planes
    assert validate_meta(meta) is meta


def test_every_image_format_has_a_known_case():
    assert {key[0] for key in KNOWN} == set(IMAGE_FORMATS)


def test_drm_codes():
    assert drm_fourcc("XR24") == 0x34325258  # DRM_FORMAT_XRGB8888
    assert drm_fourcc("NV12") == 0x3231564E
    assert drm_fourcc("R8") == 0x20203852    # 'R8  '
    with pytest.raises(InvalidLayout):
        drm_fourcc(BLOB)


@given(fourcc=st.sampled_from(IMAGE_FORMATS),
       width=st.integers(1, 4096), height=st.integers(1, 4096))
def test_canonical_layouts_are_valid_and_aligned(fourcc, width, height):
    planes = formats.FORMATS[fourcc]
    width -= width % max(p.hsub for p in planes)
    height -= height % max(p.vsub for p in planes)
    meta = linear_layout(max(width, 2), max(height, 2), fourcc)
    validate_meta(meta)
    assert all(p.stride % STRIDE_ALIGN == 0 for p in meta.planes)
    assert all(p.offset % PAGE_SIZE == 0 for p in meta.planes)
    # the last plane ends in the last page: no page is granted for nothing
    last, fmt = meta.planes[-1], planes[-1]
    end = last.offset + last.stride * (meta.height // fmt.vsub)
    assert (meta.pages - 1) * PAGE_SIZE < end <= meta.size


@given(st.integers(1, MAX_LEASE_PAGES * PAGE_SIZE))
def test_blob_layout(nbytes):
    meta = blob_layout(nbytes)
    assert meta.pages == -(-nbytes // PAGE_SIZE)
    assert meta.planes == (Plane(nbytes, 0),)
    assert validate_meta(meta) is meta


@pytest.mark.parametrize("nbytes", [0, -1, MAX_LEASE_PAGES * PAGE_SIZE + 1,
                                    True, 1.0])
def test_blob_size_bounds(nbytes):
    with pytest.raises(InvalidLayout):
        blob_layout(nbytes)


@pytest.mark.parametrize("args", [
    (0, 10, "XR24"), (10, 0, "XR24"), (16385, 1, "XR24"),
    (11, 10, "NV12"), (10, 11, "P010"),       # subsampling needs even sizes
    (10, 10, "XR30"), (10, 10, "xr24"), (10, 10, "R8  "),  # not allowed
    (16384, 16384, "XR24"),                   # 1 GiB: over 65,535 pages
])
def test_linear_layout_refuses(args):
    with pytest.raises(InvalidLayout):
        linear_layout(*args)


def test_layout_for_spec_keeps_vetted_modifier():
    meta = layout_for(ImageSpec(64, 64, "XR24", modifier=0x0100000000000001))
    assert meta.modifier == 0x0100000000000001
    with pytest.raises(InvalidLayout, match="not allowed"):
        validate_meta(meta)
    validate_meta(meta, allowed_modifiers={0x0100000000000001})
    assert layout_for(BlobSpec(1)) == blob_layout(1)


@pytest.mark.parametrize("spec", [
    ImageSpec(64, 64, BLOB), ImageSpec(64, 64, "XR24", MOD_INVALID),
    ImageSpec(64, 64, "XR24", -1), ImageSpec(64, 64, "XR24", 2**64),
    BlobSpec(0), "XR24",
])
def test_check_spec_refuses(spec):
    with pytest.raises(InvalidLayout):
        check_spec(spec)


def _nv12() -> BufferMeta:
    return linear_layout(1920, 1080, "NV12")


def _with_plane(meta, index, **changes):
    planes = list(meta.planes)
    planes[index] = dataclasses.replace(planes[index], **changes)
    return dataclasses.replace(meta, planes=tuple(planes))


@pytest.mark.parametrize("mutate, reason", [
    (lambda m: dataclasses.replace(m, pages=0), "pages"),
    (lambda m: dataclasses.replace(m, pages=MAX_LEASE_PAGES + 1), "pages"),
    (lambda m: dataclasses.replace(m, pages=809), "past the buffer"),
    (lambda m: dataclasses.replace(m, fourcc="YUYV"), "not allowed"),
    (lambda m: dataclasses.replace(m, modifier=MOD_INVALID), "INVALID"),
    (lambda m: dataclasses.replace(m, width=2050), "stride"),
    (lambda m: dataclasses.replace(m, height=1081), "divisible"),
    (lambda m: dataclasses.replace(m, planes=m.planes[:1]), "plane"),
    (lambda m: dataclasses.replace(m, planes=m.planes * 2), "plane"),
    (lambda m: _with_plane(m, 0, stride=1919), "stride"),
    # chroma plane starts inside the luma plane: aliasing
    (lambda m: _with_plane(m, 1, offset=4096), "offset"),
    # planes swapped round
    (lambda m: dataclasses.replace(m, planes=m.planes[::-1]), "past"),
    (lambda m: _with_plane(m, 1, offset=-1), "offset"),
    # overflow attempts: a stride so large that stride*rows wraps in C
    (lambda m: _with_plane(m, 0, stride=2**32 // 1080 + 1), "stride"),
    (lambda m: _with_plane(m, 1, stride=2**64), "stride"),
    (lambda m: _with_plane(m, 1, offset=2**64 - 4096), "offset"),
    (lambda m: _with_plane(m, 0, stride=True), "integer"),
    (lambda m: dataclasses.replace(m, planes=list(m.planes)), "plane"),
])
def test_validate_meta_refuses(mutate, reason):
    with pytest.raises(InvalidLayout, match=reason) as info:
        validate_meta(mutate(_nv12()))
    assert "\n" not in str(info.value)


def test_per_lease_cap():
    meta = linear_layout(3840, 2160, "XR24")
    validate_meta(meta, max_pages=8100)
    with pytest.raises(InvalidLayout, match="pages"):
        validate_meta(meta, max_pages=8099)


@pytest.mark.parametrize("meta", [
    BufferMeta(1, 4097, 1, BLOB, MOD_LINEAR, (Plane(4097, 0),)),
    BufferMeta(1, 100, 2, BLOB, MOD_LINEAR, (Plane(100, 0),)),
    BufferMeta(1, 100, 1, BLOB, MOD_LINEAR, (Plane(200, 0),)),
    BufferMeta(1, 100, 1, BLOB, MOD_LINEAR, (Plane(100, 8),)),
    BufferMeta(1, 100, 1, BLOB, 5, (Plane(100, 0),)),
])
def test_blob_meta_refuses_image_tricks(meta):
    with pytest.raises(InvalidLayout):
        validate_meta(meta, allowed_modifiers=None)

"""Buffers on the wire: a requested layout (:class:`..formats.BufferSpec`)
and a granted one (:class:`..formats.BufferMeta`) as header fields.

The layouts themselves, and what makes one legal, are :mod:`..formats`'s;
this module only spells them as ``key=value`` pairs, reads them back and
reports :mod:`..formats`' refusals as :class:`.ProtocolError`. The lease,
offer and export messages all carry one of the two.
"""

from __future__ import annotations

from ..formats import (BLOB, MAX_PLANES, BlobSpec, BufferMeta, BufferSpec,
                       ImageSpec, Plane, check_spec, validate_meta)
from .fields import _Fields, _reason_as_protocol_error


def _spec_fields(spec: BufferSpec) -> list[tuple[str, object]]:
    if isinstance(spec, BlobSpec):
        return [("fourcc", BLOB), ("bytes", spec.nbytes)]
    return [("fourcc", spec.fourcc), ("width", spec.width),
            ("height", spec.height), ("modifier", spec.modifier)]


def _parse_spec(fields: _Fields) -> BufferSpec:
    untrusted_fourcc = fields.text("fourcc")
    if untrusted_fourcc == BLOB:
        return BlobSpec(fields.uint("bytes"))
    return ImageSpec(fields.uint("width"), fields.uint("height"),
                     untrusted_fourcc, fields.uint("modifier"))


def _check_spec(spec: BufferSpec) -> None:
    with _reason_as_protocol_error():
        check_spec(spec)


def _meta_fields(meta: BufferMeta) -> list[tuple[str, object]]:
    pairs: list[tuple[str, object]] = [
        ("pages", meta.pages), ("fourcc", meta.fourcc),
        ("width", meta.width), ("height", meta.height),
        ("modifier", meta.modifier)]
    for index, plane in enumerate(meta.planes):
        pairs += [(f"plane{index}-stride", plane.stride),
                  (f"plane{index}-offset", plane.offset)]
    return pairs


def _parse_meta(fields: _Fields) -> BufferMeta:
    planes = []
    for index in range(MAX_PLANES):
        if not fields.has(f"plane{index}-stride"):
            break
        planes.append(Plane(fields.uint(f"plane{index}-stride"),
                            fields.uint(f"plane{index}-offset")))
    return BufferMeta(fields.uint("pages"), fields.uint("width"),
                      fields.uint("height"), fields.text("fourcc"),
                      fields.uint("modifier"), tuple(planes))


def _check_meta(meta: BufferMeta) -> None:
    """Structurally legal; the admin's modifier policy and per-lease cap
    are the broker's to apply (formats.validate_meta with its limits)."""
    with _reason_as_protocol_error():
        validate_meta(meta, allowed_modifiers=None)

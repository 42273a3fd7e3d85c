#!/usr/bin/env python3
"""Write the seed corpora (fuzz/out/corpus/<target>/) from valid inputs.

Why generated, not committed: seeds follow the protocol as it is today, so
they are rebuilt from the code on every `make fuzz`; only this script is
versioned. Every message type appears, with small and large ref counts,
several layouts (image formats, a blob), and descriptors of every shape.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from harness import CORPUS

from qubes_gpu_share import protocol as p
from qubes_gpu_share.formats import (BlobSpec, ImageSpec, ReceiveMode,
                                     blob_layout, linear_layout)
from qubes_gpu_share.lease import State
from qubes_gpu_share.qrexec.descriptor import ServiceDescriptor

LEASE = "0123456789abcdef0123456789abcdef"
METAS = [linear_layout(64, 32, "XR24"), linear_layout(1920, 1080, "NV12"),
         linear_layout(3840, 2160, "XR24"), blob_layout(4096 * 3)]


def messages() -> Iterator[p._Message]:
    """At least one valid message of every type."""
    for spec in (ImageSpec(1920, 1080, "XR24"), BlobSpec(65536)):
        yield p.LeaseRequest(spec, ReceiveMode.CPU, 600)
        yield p.OfferRequest(spec, 60)
    for meta in METAS:
        yield p.ExportRequest(LEASE, "work", 7, meta)
        refs = p.GrantRefs.from_ints(range(8, 8 + min(meta.pages, 64)))
        if meta.pages <= 64:
            yield p.LeaseAnswer(LEASE, "sys-gpu", 3, ReceiveMode.DMABUF,
                                meta, 1_800_000_000,
                                p.GrantRefs.from_ints(range(8, 8 + meta.pages)))
        yield p.ExportAnswer(refs)
    yield p.ReleaseRequest(LEASE)
    for role in p.Role:
        yield p.RevokeRequest(LEASE, role)
    yield p.RevokeAnswer(p.RevokeStatus.RELEASED)
    yield p.RevokeAnswer(p.RevokeStatus.BUSY, "still mapped")
    yield p.ListRequest()
    yield p.LeaseList(())
    yield p.LeaseList(tuple(
        p.LeaseEntry(LEASE[:-1] + str(i), p.Role.CONSUMER, "sys-gpu",
                     State.ACTIVE, 100 + i, ReceiveMode.CPU, 1_800_000_000)
        for i in range(3)))
    yield p.Ok()
    yield p.Error("quota-pages", "work holds 100 pages; 8100 more exceed it")


def descriptors() -> Iterator[bytes]:
    yield ServiceDescriptor("qubes.GpuLease", "sys-gpu", "work").encode()
    yield ServiceDescriptor("qubes.GpuLease", "", "work").encode()
    yield ServiceDescriptor("qubes.GpuExport", LEASE, "dom0").encode()
    yield ServiceDescriptor("qubes.GpuLease", "sys-gpu", "work", "name",
                            "dom0").encode()
    yield ServiceDescriptor("qubes.GpuLeases", "", "work", "keyword",
                            "adminvm").encode()


def seeds() -> dict[str, list[bytes]]:
    encoded = [p.encode(m) for m in messages()]
    choices = {cls: i + 1 for i, cls in enumerate(p.MESSAGES.values())}
    return {
        "protocol": [bytes([0]) + e for e in encoded]
        + [bytes([choices[type(m)]]) + p.encode(m) for m in messages()],
        "frame_length": encoded + [encoded[0] + encoded[-1], encoded[3][:20]],
        "meta": [p.encode(m) for m in messages()
                 if isinstance(m, (p.ExportRequest, p.LeaseAnswer))],
        "descriptor": list(descriptors()),
        "names": [b"\x00work", b"\x00sys-gpu", b"\x00disp1234",
                  b"\x80" + LEASE.encode()],
        "stream": [bytes([mode]) + body for mode in (2, 3, 0x42, 0x84)
                   for body in (b"one\ntwo\n", b"x" * 20 + b"\n",
                                b"a\0b\0", b"")],
        "appproto": appproto_seeds(),
    }


def appproto_seeds() -> list[bytes]:
    """Valid application requests (even first byte) and a lease reply (odd
    first byte), as fuzz_appproto.py reads them."""
    from qubes_gpu_share.appproto import LeaseInfo, encode
    from qubes_gpu_share.formats import linear_layout as layout
    try:
        meta = layout(64, 32, "XR24")
        info = LeaseInfo(LEASE, p.Role.CONSUMER, "sys-gpu", ReceiveMode.CPU,
                         meta, 1_800_000_000, 0, meta.pages * 4096)
        replies = [b"\x01" + encode(info.to_reply())]
    except TypeError:  # its fields changed: requests still seed the run
        replies = []
    return replies + [b"\x00" + r for r in [
        b'{"op": "lease", "provider": "sys-gpu", "fourcc": "XR24", '
        b'"width": 1920, "height": 1080, "mode": "cpu", "ttl": 600}',
        b'{"op": "lease", "provider": "sys-gpu", "fourcc": "BLOB", '
        b'"bytes": 65536, "mode": "dmabuf", "ttl": 60}',
        b'{"op": "offer", "consumer": "work", "fourcc": "NV12", '
        b'"width": 64, "height": 32, "ttl": 60}',
        b'{"op": "next", "role": "consumer", "timeout": 5}',
        b'{"op": "list"}',
        b'{"op": "release", "lease": "' + LEASE.encode() + b'"}',
    ]]


def write(corpus: Path, name: str, inputs: Iterable[bytes]) -> int:
    folder = corpus / name
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for data in inputs:
        (folder / ("seed-" + hashlib.sha1(data).hexdigest()[:16])) \
            .write_bytes(data)
        count += 1
    return count


def main() -> None:
    corpus = Path(sys.argv[1]) if len(sys.argv) > 1 else CORPUS
    for name, inputs in seeds().items():
        print(f"{name}: {write(corpus, name, inputs)} seeds in "
              f"{corpus / name}")


if __name__ == "__main__":
    main()

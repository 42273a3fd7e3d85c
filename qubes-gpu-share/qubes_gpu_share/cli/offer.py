"""``qubes-gpu-share offer``: hand a buffer this qube has to another qube.

The Wayland-SHM case of qubes-issues #8973: an application's shared memory
(a memfd) or a dma-buf goes to another qube's compositor without a copy.
Like a pulled lease, an offered one lives as long as the connection to the
agent that carries it, so the command holds it while it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

from ..alloc.base import AllocationError, fd_kind, fd_size
from ..alloc.memfd import create_sealed_memfd
from ..client import ClientError
from ..formats import BlobSpec, BufferSpec, check_spec, layout_for
from .lease import (add_buffer_options, add_json_option, add_socket_option,
                    buffer_spec, connect, describe, hold, refused,
                    spec_kwargs)

NAME = "offer"
SUMMARY = "offer a buffer of this qube (memfd, dma-buf, file) to another qube"

DESCRIPTION = """\
Offer a buffer to the qube CONSUMER: dom0's qrexec policy
(qubes.GpuOffer+CONSUMER) and the broker decide, this qube's agent grants
the pages to CONSUMER's domain and dom0 delivers the lease to CONSUMER's
agent, where an application takes it ('next' in the application protocol,
Client.incoming() in Python). This qube needs the gpu-share-provider
service (qvm-service QUBE gpu-share-provider on).

The buffer is --fd N, an fd this command inherited (a memfd made with
MFD_ALLOW_SEALING, or a dma-buf), or --file PATH: a memfd reached as
/proc/PID/fd/N is offered as it is; any other file is copied once, here,
into a new memfd of the described size (zero copy needs a memfd or a
dma-buf). Without --size or --bytes the buffer is described as plain memory
(BLOB) of its own size, which must be whole pages for an fd.

The offer lasts while the command runs: until interrupted (Ctrl-C,
SIGTERM) or, with --hold, for SECONDS. Then the agent withdraws it; dom0
revokes it from CONSUMER first (the consumer lets go before the pages are
released). The offering side gets no notice when the consumer releases
earlier: 'qubes-gpu-share list' shows the lease's state."""

EPILOG = """\
exit status:
  0 the offer was accepted, held and withdrawn;
  1 the agent, dom0 or the consumer refused (the reason is on stderr), the
    buffer cannot be used, or the agent is unreachable; 2 wrong usage

examples:
  qubes-gpu-share offer --to sys-gui --file /proc/$PID/fd/7 --size 800x600
  qubes-gpu-share offer --to sys-gui --file picture.raw --bytes 65536 \\
      --hold 30 --json"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", dest="consumer", required=True,
                        metavar="CONSUMER",
                        help="the qube that receives the buffer")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", metavar="PATH",
                        help="a memfd (/proc/PID/fd/N) or a file to copy "
                             "into a new memfd")
    source.add_argument("--fd", type=int, metavar="N",
                        help="an fd inherited from the caller")
    add_buffer_options(parser, required=False)
    parser.add_argument("--hold", type=float, metavar="SECONDS",
                        help="withdraw the offer after SECONDS instead of "
                             "waiting for an interrupt")
    add_json_option(parser, "the lease")
    add_socket_option(parser)


def _copied(fd: int, path: str, spec: BufferSpec | None) -> int:
    """A new memfd holding the regular file *fd*'s bytes (one copy)."""
    size = os.fstat(fd).st_size
    if spec is None:
        spec = check_spec(BlobSpec(size))
    capacity = layout_for(spec).size
    if size > capacity:
        raise ValueError(f"{path} has {size} bytes, more than the "
                         f"{capacity} of the described buffer")
    memfd = create_sealed_memfd(capacity, "qubes-gpu-share-offer")
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        while chunk := os.read(fd, 1 << 20):
            os.write(memfd, chunk)
    except BaseException:
        os.close(memfd)
        raise
    return memfd


def open_buffer(args: argparse.Namespace,
                spec: BufferSpec | None) -> tuple[int, BufferSpec]:
    """The fd to offer (ours to close) and its description."""
    if args.fd is not None:
        fd = os.dup(args.fd)
    else:
        fd = os.open(args.file, os.O_RDWR | os.O_CLOEXEC)
    try:
        if fd_kind(fd) == "other":
            if args.fd is not None:
                raise ValueError(f"fd {args.fd} is neither a memfd nor a "
                                 f"dma-buf")
            copy = _copied(fd, args.file, spec)
            os.close(fd)
            fd = copy
        if spec is None:
            spec = check_spec(BlobSpec(fd_size(fd)))
        return fd, spec
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise


def run(args: argparse.Namespace) -> int:
    try:
        fd, spec = open_buffer(args, buffer_spec(args))
    except AllocationError as exc:
        raise ValueError(str(exc)) from None
    try:
        with connect(args) as agent:
            lease = agent.offer(args.consumer, fd, ttl=args.ttl,
                                **spec_kwargs(spec))
            os.close(fd)
            fd = -1
            pages = layout_for(spec).pages
            if args.json:
                print(json.dumps({"lease": lease, "peer": args.consumer,
                                  "pages": pages}), flush=True)
            else:
                print(f"offered lease {lease} to {args.consumer}: "
                      f"{describe(layout_for(spec))}, {pages} pages",
                      flush=True)
            hold(agent, lease, args.hold)
    except ClientError as exc:
        return refused(args, exc)
    finally:
        if fd >= 0:
            os.close(fd)
    return 0

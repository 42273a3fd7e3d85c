"""The floors of lease setup and of copying, shared by bench_setup.py and
bench_copy.py: native page touching, a consumer process that receives an fd
with SCM_RIGHTS, maps it and writes every page, and a process that streams
frames through a socket.

Why native touching: the issue asks both the floor and the lease side to
touch pages the same way and at native speed (one memset over the mapping,
never a Python loop per page), so that a ratio shows the project's own
overhead and not the interpreter's.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from qubes_gpu_share.alloc.memfd import create_sealed_memfd

_HERE = Path(__file__).resolve().parent
MiB = 2**20
#: 3840x2160 XRGB8888
FRAME_BYTES = 3840 * 2160 * 4


def fill(view: mmap.mmap | bytearray, value: int) -> None:
    """memset over a whole writable mapping or buffer (one C call)."""
    anchor = (ctypes.c_char * len(view)).from_buffer(view)
    try:
        ctypes.memset(anchor, value, len(view))
    finally:
        del anchor  # release the export, so the mapping can be closed


def copy(dst: bytearray | mmap.mmap, src: bytearray | mmap.mmap) -> None:
    """memcpy of ``src`` into the existing ``dst`` (one C call)."""
    dst_c = (ctypes.c_char * len(dst)).from_buffer(dst)
    src_c = (ctypes.c_char * len(src)).from_buffer(src)
    try:
        ctypes.memmove(dst_c, src_c, len(src))
    finally:
        del dst_c, src_c


def map_and_touch(fd: int, size: int, touch: bool = True,
                  value: int = 0xA5) -> mmap.mmap:
    """What a consumer does with a received fd: map it, write every page."""
    mapping = mmap.mmap(fd, size, mmap.MAP_SHARED,
                        mmap.PROT_READ | mmap.PROT_WRITE)
    if touch:
        fill(mapping, value)
    return mapping


class Peer:
    """Another process at the end of a Unix socket, running ``--serve``."""

    def __init__(self, role: str) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX,
                                              socket.SOCK_STREAM)
        self.proc = subprocess.Popen(
            [sys.executable, str(_HERE / "fdpass.py"), role,
             str(theirs.fileno())], pass_fds=[theirs.fileno()],
            env={**os.environ, "PYTHONPATH": str(_HERE)})
        theirs.close()

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(timeout=30)

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def floor_setup(peer: Peer, size: int,
                touch: bool = True) -> tuple[float, float]:
    """One floor lease: (setup s, teardown s).

    Setup: memfd create and size, SCM_RIGHTS to the consumer process, which
    maps it and (``touch``) writes every page, then answers. Teardown: the
    consumer unmaps and closes, answers, and this side closes its fd.
    """
    start = time.perf_counter()
    fd = create_sealed_memfd(size, "bench-floor")
    try:
        socket.send_fds(peer.sock, [size.to_bytes(8, "little")
                                    + bytes([touch])], [fd])
        if peer.sock.recv(1) != b"k":
            raise RuntimeError("consumer did not map")
        mapped = time.perf_counter()
        peer.sock.sendall(b"t")
        if peer.sock.recv(1) != b"t":
            raise RuntimeError("consumer did not unmap")
    finally:
        os.close(fd)
    return mapped - start, time.perf_counter() - mapped


def cross_process_copy(peer: Peer, dst: bytearray) -> float:
    """Seconds for the peer to send one frame into ``dst`` (existing)."""
    view = memoryview(dst)
    start = time.perf_counter()
    peer.sock.sendall(len(dst).to_bytes(8, "little"))
    got = 0
    while got < len(dst):
        n = peer.sock.recv_into(view[got:])
        if not n:
            raise RuntimeError("frame source closed")
        got += n
    return time.perf_counter() - start


def _serve_consumer(sock: socket.socket) -> None:
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, 9, 1)
        except ConnectionResetError:
            return
        if not msg:
            return
        size = int.from_bytes(msg[:8], "little")
        mapping = map_and_touch(fds[0], size, bool(msg[8]))
        sock.sendall(b"k")
        sock.recv(1)
        mapping.close()
        os.close(fds[0])
        sock.sendall(b"t")


def _serve_frames(sock: socket.socket) -> None:
    frame = bytearray(FRAME_BYTES)
    fill(frame, 0x5A)
    while True:
        msg = sock.recv(8)
        if not msg:
            return
        size = int.from_bytes(msg, "little")
        if size > len(frame):
            frame = bytearray(size)
            fill(frame, 0x5A)
        sock.sendall(memoryview(frame)[:size])


if __name__ == "__main__":
    SERVE = {"consumer": _serve_consumer, "frames": _serve_frames}
    SERVE[sys.argv[1]](socket.socket(fileno=int(sys.argv[2])))

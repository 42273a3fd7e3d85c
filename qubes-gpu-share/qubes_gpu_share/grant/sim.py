"""The simulated grant device: :class:`GrantDevice` over a simulated hypervisor.

Each process opens its own :class:`SimGrantDevice` (as it would open
/dev/xen/gntdev), naming its domain id and its kernel's traits; the
hypervisor (sim_hv.py, a separate process: ``python -m
qubes_gpu_share.grant.sim serve SOCKET``) owns every grant table and enforces
the rules of expected.py. One request, one reply per operation.

In the simulation a dma-buf to grant is a memfd of exactly the granted
size (one this simulator exported is refused, as Xen refuses to grant a
received dma-buf on); a mapping is a view on the provider's own memfd, so a
write on one side is read on the other, without a copy. A received dma-buf
maps for the CPU where the domain's kernel has the exporter's mmap
(``dmabuf_mmap``), and not elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence

from ..formats import PAGE_SIZE
from . import errors
from .device import (AllocatedGrant, CpuView, ForeignMapping, Grant,
                     GrantDevice, ImportedDmabuf, check_page_count)
from .expected import DomainKind
from .sim_proto import (ANCILLARY_SIZE, DOMID, EXPORT, GRANT, HELD, ID,
                        LIMIT, MAP, MAPPED, PEEKED, STATS, STATS_REPLY,
                        STATUS_OK, WAIT,
                        FrameReader, Op, ProtocolError, SimulatorLimit,
                        decode_error, decode_runs, encode_hello, encode_refs,
                        expand_runs, frame, rights, split_fixed, u32_array)

__all__ = ["SimGrantDevice", "SimStats", "SimulatorLimit", "hypervisor"]


@dataclasses.dataclass(frozen=True)
class SimStats:
    """What the hypervisor holds for one domain (and in all)."""

    table_used: int
    table_size: int
    mapped_pages: int
    exports: int
    hypervisor_fds: int
    hazards: int
    #: grants revoked while their peer held pages, not freed yet (the
    #: kernel's deferred ends), and the pages still held
    deferred_grants: int = 0
    deferred_pages: int = 0
    #: xen-gntalloc's accounting: pages allocated now, and its limit
    gntalloc_pages: int = 0
    gntalloc_limit: int = 0


class SimGrantDevice(GrantDevice):
    """One process's simulated /dev/xen/gntdev in domain ``domid``."""

    def __init__(self, socket_path: str, domid: int,
                 kind: DomainKind = DomainKind(), *, table_entries: int = 0,
                 maptrack_entries: int = 0):
        self.domid = domid
        self.kind = kind
        self._lock = threading.Lock()
        self._sock: socket.socket | None = socket.socket(
            socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(socket_path)
            self._call(Op.HELLO, encode_hello(domid, kind, table_entries,
                                              maptrack_entries))
        except OSError as exc:
            self.close()
            raise errors.NoGrantDevice(
                f"no simulated hypervisor at {socket_path} ({exc}); start "
                f"one with `python -m qubes_gpu_share.grant.sim serve "
                f"{socket_path}`") from None
        except BaseException:
            self.close()
            raise

    # -- the interface ----------------------------------------------------

    def grant_dmabuf(self, dmabuf_fd: int, pages: int,
                     to_domid: int) -> Grant:
        check_page_count(pages)
        payload, _ = self._call(Op.GRANT_DMABUF, GRANT.pack(pages, to_domid),
                                dmabuf_fd)
        (gid,), runs = split_fixed(payload, ID)
        return _SimGrant(self, gid, to_domid, expand_runs(decode_runs(runs)))

    def grant_new_pages(self, pages: int, to_domid: int) -> AllocatedGrant:
        check_page_count(pages)
        payload, fd = self._call(Op.GRANT_NEW, GRANT.pack(pages, to_domid),
                                 want_fd=True)
        try:
            (gid,), runs = split_fixed(payload, ID)
            refs = expand_runs(decode_runs(runs))
        except BaseException:
            os.close(fd)
            raise
        return _SimAllocatedGrant(self, gid, to_domid, refs, fd)

    def map_grant(self, from_domid: int, refs: Sequence[int],
                  writable: bool = True) -> ForeignMapping:
        refs = _checked_refs(refs)
        payload, fd = self._call(
            Op.MAP, MAP.pack(from_domid, writable) + encode_refs(refs),
            want_fd=True)
        mid, offset = MAPPED.unpack(payload)
        return _SimMapping(self, mid, from_domid, refs, fd, offset)

    def import_dmabuf(self, from_domid: int,
                      refs: Sequence[int]) -> ImportedDmabuf:
        refs = _checked_refs(refs)
        payload, fd = self._call(
            Op.EXPORT, EXPORT.pack(from_domid) + encode_refs(refs),
            want_fd=True)
        (eid,) = ID.unpack(payload)
        return _SimImport(self, eid, from_domid, refs, fd)

    def close(self) -> None:
        """Like closing /dev/xen/gntdev: the hypervisor drops this process's
        mappings and ends its grants."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    # -- simulator only ---------------------------------------------------

    def hazards(self) -> list[str]:
        """Every hazard the hypervisor saw, in any domain (one line each)."""
        payload, _ = self._call(Op.HAZARDS)
        return [line for line in payload.decode().split("\n") if line]

    def stats(self, domid: int | None = None) -> SimStats:
        payload, _ = self._call(Op.STATS, STATS.pack(
            self.domid if domid is None else domid))
        return SimStats(*STATS_REPLY.unpack(payload))

    def destroy_domain(self, domid: int) -> None:
        """Kill domain ``domid`` (``xl destroy``): Xen drops its mappings
        and exports, its grants end, its devices answer NoGrantDevice."""
        self._call(Op.DESTROY, DOMID.pack(domid))

    def gntalloc_limit(self, pages: int | None = None) -> int:
        """xen-gntalloc's ``limit`` in this domain: read it, or set it (what
        an admin writes to /sys/module/xen_gntalloc/parameters/limit)."""
        payload, _ = self._call(Op.GNTALLOC_LIMIT,
                                LIMIT.pack(-1 if pages is None else pages))
        return HELD.unpack(payload)[0]

    @contextlib.contextmanager
    def received_pages(self, dmabuf_fd: int) -> Iterator[mmap.mmap]:
        """The pages behind a dma-buf this domain received (import_dmabuf),
        mapped read-only: what a GPU driver importing it would read. Real
        Xen has no such view (the dma-buf has no mmap and cannot be granted
        on); tests and the demo use it to check the bytes that crossed."""
        payload, fd = self._call(Op.PEEK, fd=dmabuf_fd, want_fd=True)
        try:
            pages, offset = PEEKED.unpack(payload)
            view = CpuView(fd, offset, pages * PAGE_SIZE).mmap(writable=False)
        finally:
            os.close(fd)
        with view:
            yield view

    @property
    def closed(self) -> bool:
        return self._sock is None

    def _call(self, op: int, payload: bytes = b"", fd: int = -1,
              want_fd: bool = False) -> tuple[bytes, int]:
        """One round trip: the reply's payload and fd (-1 if none)."""
        with self._lock:
            if self._sock is None:
                raise errors.AlreadyReleased(
                    "the grant device was closed (its grants ended with it)")
            data = frame(op, payload)
            sent = (self._sock.sendmsg([data], rights(fd)) if fd >= 0
                    else self._sock.send(data))
            if sent < len(data):  # (no empty send: one syscall per call)
                self._sock.sendall(data[sent:])
            code, reply, fds = _recv_reply(self._sock)
        if code != STATUS_OK or len(fds) != int(want_fd):
            for extra in fds:
                os.close(extra)
            if code != STATUS_OK:
                raise decode_error(reply)
            raise ProtocolError(f"reply to {op} carried {len(fds)} fds")
        return reply, fds[0] if fds else -1


def _recv_reply(sock: socket.socket) -> tuple[int, bytes, list[int]]:
    reader = FrameReader()
    try:
        while not reader.done():
            if not reader.take(*sock.recvmsg(reader.wanted(),
                                             ANCILLARY_SIZE)[:3]):
                raise ProtocolError("the simulated hypervisor went away")
    except BaseException:
        reader.close()
        raise
    return reader.code, reader.payload(), reader.detach_fds()


def _checked_refs(refs: Sequence[int]) -> tuple[int, ...]:
    """The refs as a tuple, each a u32. The check is array's (in C): a
    Python test per ref cost 0.4 ms per 32 MiB lease (8,192 refs)."""
    refs = tuple(refs)
    check_page_count(len(refs))
    try:
        u32_array(refs)
    except (TypeError, OverflowError):
        raise errors.MapRefused(
            "grant refs are 32-bit unsigned integers") from None
    return refs


class _SimGrant(Grant):
    def __init__(self, device: SimGrantDevice, gid: int, domid: int,
                 refs: tuple[int, ...]):
        self._device = device
        self._gid = gid
        self._revoked = False
        self.domid = domid
        self.refs = refs

    def revoke(self) -> None:
        if self._revoked:
            raise errors.AlreadyReleased(f"grant {self._gid} already revoked")
        self._revoked = True
        self._device._call(Op.REVOKE, ID.pack(self._gid))

    def try_end(self) -> int | None:
        if self._revoked:
            raise errors.AlreadyReleased(f"grant {self._gid} already revoked")
        try:
            payload, _ = self._device._call(Op.TRY_END, ID.pack(self._gid))
        except errors.DmabufNotSupported:
            self.revoke()
            return None
        (held,) = HELD.unpack(payload)
        if held == 0:
            self._revoked = True
        return held

    def close(self) -> None:
        with contextlib.suppress(errors.AlreadyReleased):
            super().close()


class _SimAllocatedGrant(_SimGrant, AllocatedGrant):
    def __init__(self, device: SimGrantDevice, gid: int, domid: int,
                 refs: tuple[int, ...], fd: int):
        super().__init__(device, gid, domid, refs)
        self._fd = fd

    def view(self) -> CpuView:
        if self._fd < 0:
            raise errors.AlreadyReleased("the allocated pages were revoked")
        return CpuView(self._fd, 0, self.pages * PAGE_SIZE)

    def revoke(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().revoke()

    def try_end(self) -> int | None:
        """gntalloc pages: no kernel says what the peer still maps."""
        self.revoke()
        return None


class _SimMapping(ForeignMapping):
    def __init__(self, device: SimGrantDevice, mid: int, domid: int,
                 refs: tuple[int, ...], fd: int, offset: int):
        self._device = device
        self._mid = mid
        self._fd = fd
        self._offset = offset
        self.domid = domid
        self.refs = refs

    def view(self) -> CpuView:
        if self._fd < 0:
            raise errors.AlreadyReleased("the mapping was closed")
        return CpuView(self._fd, self._offset, self.length)

    def close(self) -> None:
        """Unmap. The simulator cannot see mmaps made from the view's fd:
        whoever hands the fd out must close this only when they are gone."""
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1
        if not self._device.closed:
            with contextlib.suppress(errors.AlreadyReleased):
                self._device._call(Op.UNMAP, ID.pack(self._mid))


class _SimImport(ImportedDmabuf):
    def __init__(self, device: SimGrantDevice, eid: int, domid: int,
                 refs: tuple[int, ...], fd: int):
        self._device = device
        self._eid = eid
        self._released = False
        self.domid = domid
        self.refs = refs
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def release(self, timeout_ms: int) -> None:
        if self._released:
            raise errors.AlreadyReleased("the dma-buf was already released")
        self.close()
        try:
            self._device._call(Op.WAIT, WAIT.pack(self._eid, timeout_ms))
        except errors.AlreadyReleased:
            pass  # ENOENT: the last user let go before we waited
        self._released = True


@contextlib.contextmanager
def hypervisor(socket_path: str, table_entries: int = 0,
               maptrack_entries: int = 0,
               start_timeout: float = 10.0) -> Iterator[subprocess.Popen]:
    """Run a simulated hypervisor process on ``socket_path`` for a while."""
    argv = [sys.executable, "-m", "qubes_gpu_share.grant.sim", "serve",
            socket_path]
    if table_entries:
        argv += ["--table-entries", str(table_entries)]
    if maptrack_entries:
        argv += ["--maptrack-entries", str(maptrack_entries)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        _wait_listening(proc, socket_path, start_timeout)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)


def _wait_listening(proc: subprocess.Popen, path: str,
                    timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"simulated hypervisor exited ({proc.returncode})")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(path) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"simulated hypervisor did not listen on {path}")


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from .sim_hv import serve_forever

    parser = argparse.ArgumentParser(
        prog="python -m qubes_gpu_share.grant.sim",
        description="Simulated Xen grant tables for qubes-gpu-share.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the hypervisor on a socket")
    serve.add_argument("socket")
    serve.add_argument("--table-entries", type=int, default=0,
                       help="grant table size per domain (default: Xen's)")
    serve.add_argument("--maptrack-entries", type=int, default=0)
    args = parser.parse_args(argv)
    kwargs = {name: value for name, value in (
        ("table_entries", args.table_entries),
        ("maptrack_entries", args.maptrack_entries)) if value}
    serve_forever(args.socket, **kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

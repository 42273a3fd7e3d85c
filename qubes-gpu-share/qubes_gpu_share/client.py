"""The library applications use to get and give buffers (blocking, simple).

    from qubes_gpu_share import client
    with client.Client() as agent:
        buf = agent.lease("sys-gpu", width=1920, height=1080, fourcc="XR24")
        pixels = buf.mmap()                 # either mode, where it maps
        with buf.cpu_access():              # brackets dma-buf CPU access
            ...
        buf.close()                         # unmaps, releases the lease

It talks to this qube's agent over ``/run/qubes-gpu-share/app.sock``
(in dom0, dom0's own agent over ``/run/qubes-gpu-share-dom0-app.sock``;
$QUBES_GPU_SHARE_APP_SOCKET overrides both: :func:`default_socket`;
appproto.py has the messages). One request at a time per
:class:`Client`; the agent may send a revoke notice at any time, which the
client collects in :attr:`Client.revoked`: a program should then stop using
that buffer and close it. Closing the client (or the process dying) releases
every lease it holds.
"""

from __future__ import annotations

import array
import contextlib
import errno
import mmap
import os
import socket
from collections.abc import Iterator
from typing import Any

from . import appproto
from .appproto import LeaseInfo
from .formats import BLOB, BlobSpec, ImageSpec, ReceiveMode
from .grant import this_domain
from .protocol import LeaseEntry, Role

#: the agent's application socket in a qube
APP_SOCKET = "/run/qubes-gpu-share/app.sock"
#: in dom0: the socket systemd holds for dom0's own agent
#: (qubes-gpu-share-dom0-agent.socket), group qubes like the qube's
DOM0_APP_SOCKET = "/run/qubes-gpu-share-dom0-app.sock"
ENV_SOCKET = "QUBES_GPU_SHARE_APP_SOCKET"


def default_socket(proc_root: str = this_domain.PROC_ROOT) -> str:
    """Where this system's agent listens: $QUBES_GPU_SHARE_APP_SOCKET, else
    dom0's agent's socket in dom0, else the qube's agent's."""
    return os.environ.get(ENV_SOCKET) or (
        DOM0_APP_SOCKET if this_domain.is_dom0(proc_root) else APP_SOCKET)


#: the reply kind of each request whose reply is named differently
_REPLY_TO = {"next": "lease"}


class ClientError(Exception):
    """The agent refused; ``code`` for programs, ``str()`` one line."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


#: Why a received dma-buf may not map, for the application's error.
NO_DMABUF_MMAP = (
    "this qube's kernel cannot map a received dma-buf for the CPU (its "
    "gntdev dma-buf exporter has no mmap: kernel/0002 of qubes-gpu-share "
    "adds it): import the fd into a GPU driver (PRIME), or lease in cpu mode")


class LeasedBuffer:
    """A buffer this program holds: the fd and what it is.

    Whatever the mode, :meth:`mmap` maps it for the CPU where this qube's
    kernel can: ``cpu`` mode is a grant mapping (every kernel); ``dmabuf``
    mode is a dma-buf of the provider's pages, which maps where the kernel's
    gntdev exporter has mmap (the project's kernel series) and is otherwise
    for a GPU driver to import (PRIME). :attr:`mode` says which it is,
    :meth:`describe_mapping` what that means here.
    """

    def __init__(self, client: Client, fd: int, info: LeaseInfo):
        self._client = client
        self.fd = fd
        self.info = info
        self._maps: list[mmap.mmap] = []

    lease = property(lambda self: self.info.lease)
    mode = property(lambda self: self.info.mode)
    meta = property(lambda self: self.info.meta)

    @property
    def is_dmabuf(self) -> bool:
        """The fd is a dma-buf (received in dmabuf mode)."""
        return self.info.mode is ReceiveMode.DMABUF \
            and self.info.role is Role.CONSUMER

    def mmap(self, writable: bool = True) -> mmap.mmap:
        """Map the pages for the CPU, in either mode.

        ``cpu`` mode: on Xen a received buffer can be mmapped once (the
        kernel's gntdev allows one mmap per mapping, even after munmap, and
        the first one fixes it read-only or writable): keep the returned map
        for the lease's life. The simulator cannot enforce this
        (docs/native.md).

        ``dmabuf`` mode: a dma-buf maps any number of times, where the
        kernel allows it (ClientError ``mode`` with the reason where it
        does not); bracket access with :meth:`cpu_access`. Every map keeps
        the buffer: :meth:`close` unmaps the maps made here.
        """
        if self.fd < 0:
            raise ClientError("closed", "the buffer was closed")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            view = mmap.mmap(self.fd, self.info.length, mmap.MAP_SHARED,
                             prot, offset=self.info.offset)
        except OSError as exc:
            if self.is_dmabuf and exc.errno in (errno.EINVAL, errno.ENODEV):
                raise ClientError("mode", NO_DMABUF_MMAP) from None
            raise
        self._maps.append(view)
        return view

    @contextlib.contextmanager
    def cpu_access(self, read: bool = True,
                   write: bool = True) -> Iterator[None]:
        """Bracket CPU reads/writes of the mapped pages: for a dma-buf,
        DMA_BUF_IOCTL_SYNC start and end (cache coherency with devices);
        for a cpu-mode mapping, nothing is needed."""
        if not self.is_dmabuf:
            yield
            return
        from . import native
        if not _sync(native, self.fd, True, read, write):
            yield       # not a dma-buf (the grant simulator hands a memfd)
            return
        try:
            yield
        finally:
            _sync(native, self.fd, False, read, write)

    def describe_mapping(self) -> str:
        """One line: what this buffer is here, and how to use it."""
        if not self.is_dmabuf:
            return ("cpu mode: a grant mapping of the provider's pages; "
                    "mmap() it once and keep the map")
        try:
            with mmap.mmap(self.fd, mmap.PAGESIZE, mmap.MAP_SHARED,
                           mmap.PROT_READ):
                pass
        except (OSError, ValueError):
            return "dmabuf mode: " + NO_DMABUF_MMAP
        return ("dmabuf mode: a dma-buf of the provider's pages; import it "
                "into a GPU driver (PRIME) or mmap() it (bracket access "
                "with cpu_access())")

    def close(self, release: bool = True) -> None:
        """Unmap the maps made with :meth:`mmap` (one still exported to a
        memoryview is left to its owner), close the fd and release the
        lease (consumer)."""
        for view in self._maps:
            with contextlib.suppress(BufferError):
                view.close()
        self._maps.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            if release and self.info.role is Role.CONSUMER:
                self._client.release(self.lease)

    def __enter__(self) -> LeasedBuffer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _sync(native, fd: int, start: bool, read: bool, write: bool) -> bool:
    """DMA_BUF_IOCTL_SYNC; False when the fd is no dma-buf (ENOTTY)."""
    try:
        native.dma_buf_sync(fd, start, read, write)
    except OSError as exc:
        if exc.errno == errno.ENOTTY:
            return False
        raise
    return True


def _spec(width, height, fourcc, nbytes, modifier):
    if nbytes is not None:
        return BlobSpec(nbytes)
    return ImageSpec(width, height, fourcc or "XR24", modifier)


class Client:
    """A connection to this qube's agent."""

    def __init__(self, path: str | None = None):
        path = path or default_socket()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._sock.connect(path)
        except OSError as exc:
            self._sock.close()
            raise ClientError("no-agent", f"cannot reach the agent at "
                              f"{path}: {exc}") from None
        #: leases the agent said dom0 revokes (let go of them)
        self.revoked: set[str] = set()

    def close(self) -> None:
        self._sock.close()

    def fileno(self) -> int:
        """The connection's fd, for select()/poll() in an application's own
        loop: readable means the agent sent a notice (see take_event)."""
        return self._sock.fileno()

    def take_event(self) -> None:
        """Read one unsolicited message (call when fileno() is readable): a
        revoke notice adds its lease to :attr:`revoked`; the application
        must then let go of that buffer. ClientError when the agent left."""
        message, fds = self._receive()
        for fd in fds:
            os.close(fd)
        if message.get("event") == "revoke":
            self.revoked.add(str(message.get("lease")))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _request(self, obj: dict[str, Any], fd: int | None = None
                 ) -> tuple[dict[str, Any], int | None]:
        rights = [] if fd is None else [
            (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
        self._sock.sendmsg([appproto.encode(obj)], rights)
        while True:
            reply, fds = self._receive()
            if reply.get("event") == "revoke":
                self.revoked.add(str(reply.get("lease")))
                continue
            if reply.get("reply") == "error":
                raise ClientError(str(reply.get("code")),
                                  str(reply.get("message")))
            if reply.get("reply") != _REPLY_TO.get(obj["op"], obj["op"]):
                raise ClientError("protocol", "unexpected answer from the "
                                  "agent")
            return reply, (fds[0] if fds else None)

    def _receive(self) -> tuple[dict[str, Any], list[int]]:
        fds = array.array("i")
        data, ancdata, _flags, _ = self._sock.recvmsg(
            appproto.MAX_REPLY, socket.CMSG_SPACE(fds.itemsize))
        if not data:
            raise ClientError("no-agent", "the agent closed the connection")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % 4])
        return appproto.load_object(data, appproto.MAX_REPLY), list(fds)

    def _buffer(self, reply: dict[str, Any], fd: int | None) -> LeasedBuffer:
        if fd is None:
            raise ClientError("protocol", "the agent sent no fd")
        try:
            return LeasedBuffer(self, fd, LeaseInfo.from_reply(reply))
        except appproto.AppProtocolError:
            os.close(fd)
            raise

    def lease(self, provider: str, *, width: int | None = None,
              height: int | None = None, fourcc: str | None = None,
              nbytes: int | None = None, modifier: int = 0,
              mode: ReceiveMode | str = ReceiveMode.CPU,
              ttl: int = appproto.DEFAULT_TTL) -> LeasedBuffer:
        """A new buffer from ``provider`` (pull)."""
        spec = _spec(width, height, fourcc, nbytes, modifier)
        return self._buffer(*self._request(
            {"op": "lease", "provider": provider,
             "mode": ReceiveMode(mode).value, "ttl": ttl,
             **appproto.spec_fields(spec)}))

    def offer(self, consumer: str, fd: int, *, width: int | None = None,
              height: int | None = None, fourcc: str | None = None,
              nbytes: int | None = None, modifier: int = 0,
              ttl: int = appproto.DEFAULT_TTL) -> str:
        """Offer the buffer ``fd`` (a memfd or dma-buf of exactly the
        layout's pages) to ``consumer``; returns the lease id. The fd is
        sent, not taken: close yours when you like."""
        if fourcc == BLOB:
            fourcc = None
        spec = _spec(width, height, fourcc, nbytes, modifier)
        reply, _ = self._request({"op": "offer", "consumer": consumer,
                                  "ttl": ttl, **appproto.spec_fields(spec)},
                                 fd)
        return str(reply["lease"])

    def incoming(self, timeout: int = 0) -> LeasedBuffer:
        """The next buffer another qube offered to us (0: wait forever)."""
        return self._buffer(*self._request(
            {"op": "next", "role": "consumer", "timeout": timeout}))

    def exported(self, timeout: int = 0) -> LeasedBuffer:
        """The next buffer this qube exports for a pull (to draw into)."""
        return self._buffer(*self._request(
            {"op": "next", "role": "provider", "timeout": timeout}))

    def list(self) -> list[LeaseEntry]:
        reply, _ = self._request({"op": "list"})
        return [LeaseEntry.from_line(str(line))
                for line in reply.get("leases", [])]

    def release(self, lease: str) -> None:
        self._request({"op": "release", "lease": lease})

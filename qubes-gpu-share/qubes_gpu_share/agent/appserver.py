"""The application socket: local programs ask the agent for buffers here.

A ``SOCK_SEQPACKET`` Unix socket (one message per packet, fds attached with
SCM_RIGHTS; ../appproto.py has the messages). Who may connect:

* the socket file is created mode 0660 (group: the ``--app-group``, when
  given), so the file system is the first gate; dom0's agent, which is
  not in that group and so cannot give it the file, gets the listening
  socket from systemd instead (socket activation, created with the same
  group and mode: ``listening``);
* then every connection's SO_PEERCRED is checked: the peer's uid must be
  root, the agent's own uid or one of the allowed uids (``--app-user``), or
  a member (primary or supplementary) of the ``--app-group``. In a qube that is the
  default user ``user``; in dom0 the GUI user. Anyone else is refused with
  one line and the connection is closed.

Each connection owns the leases it took (``lease``, ``next`` as consumer)
or offered (``offer``); when it closes, for whatever reason including the
process's death, the agent releases every one of them (Agent.connection_closed).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import dataclasses
import grp
import itertools
import logging
import os
import pwd
import socket
import struct
from typing import Any

from .. import appproto
from ..appproto import AppProtocolError
from ..protocol import Role
from .broker_link import BrokerRefused
from .daemon import Agent, RequestRefused
from ..alloc import AllocationError
from ..grant.errors import GrantError

log = logging.getLogger(__name__)

_FD_SPACE = socket.CMSG_SPACE(struct.calcsize("i"))
_ids = itertools.count(1)


@dataclasses.dataclass(frozen=True)
class PeerPolicy:
    """Which local users may use the agent (besides root and itself)."""

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()

    def allows(self, uid: int, gid: int) -> bool:
        return uid in (0, os.geteuid()) or uid in self.uids \
            or gid in self.gids or self._member(uid)

    def _member(self, uid: int) -> bool:
        """A supplementary member of an allowed group: in a qube the user
        ``user`` is in group ``qubes`` only as a supplementary group (its
        primary group is ``user``), which SO_PEERCRED does not show.
        Looked up at each connection, so a change to /etc/group counts."""
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            return False
        for gid in self.gids:
            with contextlib.suppress(KeyError):
                if user in grp.getgrgid(gid).gr_mem:
                    return True
        return False


class _Packets:
    """Non-blocking packet I/O of one SEQPACKET socket under asyncio."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        sock.setblocking(False)

    async def _ready(self, add, remove) -> None:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        add(self.sock.fileno(),
            lambda: future.done() or future.set_result(None))
        try:
            await future
        finally:
            remove(self.sock.fileno())

    async def recv(self, max_len: int) -> tuple[bytes, list[int], bool]:
        """(data, fds, truncated); b"" at EOF. Extra fds are closed."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(max_len + 1,
                                                            _FD_SPACE)
                break
            except BlockingIOError:
                await self._ready(loop.add_reader, loop.remove_reader)
        fds = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) %
                                      fds.itemsize])
        truncated = bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)) \
            or len(data) > max_len
        return data, list(fds), truncated

    async def send(self, data: bytes, fd: int | None = None) -> None:
        loop = asyncio.get_running_loop()
        rights = [] if fd is None else [
            (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
        while True:
            try:
                self.sock.sendmsg([data], rights)
                return
            except BlockingIOError:
                await self._ready(loop.add_writer, loop.remove_writer)


class AppConnection:
    """One application's connection, the owner of its leases."""

    def __init__(self, sock: socket.socket, uid: int, pid: int):
        self.id = next(_ids)
        self.packets = _Packets(sock)
        self.uid = uid
        self.pid = pid

    def __repr__(self) -> str:
        return f"<app {self.id} pid {self.pid} uid {self.uid}>"

    async def send(self, obj: dict[str, Any], fd: int | None = None) -> None:
        """Send a message; ``fd`` (if any) is closed here, sent or not."""
        try:
            await self.packets.send(appproto.encode(obj), fd)
        finally:
            if fd is not None:
                os.close(fd)


class AppServer:
    """Serves applications on ``path`` for ``agent``."""

    def __init__(self, agent: Agent, path: str | os.PathLike,
                 policy: PeerPolicy = PeerPolicy(), group: int | None = None,
                 listening: socket.socket | None = None):
        """``listening``: a socket already bound at ``path`` and listening,
        whose file someone else (systemd) owns: used as it is, and its
        file left in place at close."""
        self.agent = agent
        self.path = os.fspath(path)
        self.policy = policy
        self._group = group
        self._listening = listening
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task] = set()
        self.connections: set[AppConnection] = set()
        agent.notify_app = self._notify

    async def start(self) -> None:
        sock = self._listening or self._bind()
        sock.setblocking(False)
        self._sock = sock
        self._spawn(self._accept_loop())

    def _bind(self) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            old_umask = os.umask(0o117)
            try:
                sock.bind(self.path)
            finally:
                os.umask(old_umask)
            if self._group is not None:
                os.chown(self.path, -1, self._group)
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
        return sock

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            if self._listening is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self._sock)
            pid, uid, gid = struct.unpack(
                "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                      struct.calcsize("3i")))
            if not self.policy.allows(uid, gid):
                log.warning("refused application pid %d uid %d", pid, uid)
                with contextlib.suppress(OSError):
                    sock.send(appproto.encode(appproto.error_reply(
                        "permission", f"uid {uid} may not use this agent")))
                sock.close()
                continue
            self._spawn(self._serve(AppConnection(sock, uid, pid)))

    async def _serve(self, connection: AppConnection) -> None:
        self.connections.add(connection)
        log.info("application connected: %r", connection)
        try:
            while True:
                data, fds, truncated = await connection.packets.recv(
                    appproto.MAX_REQUEST)
                if not data and not fds:
                    break
                await self._one(connection, data, fds, truncated)
        except (ConnectionError, OSError) as exc:
            log.info("%r: %s", connection, exc)
        finally:
            self.connections.discard(connection)
            connection.packets.sock.close()
            await self.agent.connection_closed(connection)
            log.info("application went away: %r", connection)

    async def _one(self, connection: AppConnection, untrusted_data: bytes,
                   fds: list[int], truncated: bool) -> None:
        """Answer one request; the fds received are owned here."""
        try:
            if truncated:
                raise AppProtocolError("request longer than "
                                       f"{appproto.MAX_REQUEST} bytes")
            request = appproto.decode_request(untrusted_data)
            wants_fd = isinstance(request, appproto.OfferReq)
            if len(fds) != int(wants_fd):
                raise AppProtocolError(
                    f"{'offer needs exactly one fd' if wants_fd else 'no fd'}"
                    f" expected, got {len(fds)}")
            fd = fds.pop() if wants_fd else None
            reply, out_fd = await self._dispatch(connection, request, fd)
        except AppProtocolError as exc:
            reply, out_fd = appproto.error_reply("malformed", str(exc)), None
        except RequestRefused as exc:
            reply, out_fd = appproto.error_reply(exc.code, str(exc)), None
        except BrokerRefused as exc:
            reply, out_fd = appproto.error_reply(exc.code, str(exc)), None
        except (AllocationError, GrantError) as exc:
            reply, out_fd = appproto.error_reply("buffer", str(exc)), None
        finally:
            for extra in fds:
                os.close(extra)
        if reply.get("reply") == "error":
            log.warning("%r: %s: %s", connection, reply["code"],
                        reply["message"])
        await connection.send(reply, out_fd)

    async def _dispatch(self, connection: AppConnection, request,
                        fd: int | None) -> tuple[dict, int | None]:
        agent = self.agent
        if isinstance(request, appproto.LeaseReq):
            out_fd, info = await agent.lease(request, connection)
            return info.to_reply(), out_fd
        if isinstance(request, appproto.OfferReq):
            lease = await agent.offer(request, fd, connection)
            return {"reply": "offer", "lease": lease}, None
        if isinstance(request, appproto.NextReq):
            holder = connection if request.role is Role.CONSUMER else None
            out_fd, info = await agent.next(request.role, request.timeout,
                                            holder)
            return info.to_reply(), out_fd
        if isinstance(request, appproto.ListReq):
            return appproto.list_reply(await agent.list()), None
        await agent.release(request.lease, connection)
        return {"reply": "release", "lease": request.lease}, None

    def _notify(self, connection: object, lease: str) -> None:
        if isinstance(connection, AppConnection):
            self._spawn(self._send_event(connection, lease))

    async def _send_event(self, connection: AppConnection, lease: str) -> None:
        with contextlib.suppress(OSError):
            await connection.send(appproto.revoke_event(lease))

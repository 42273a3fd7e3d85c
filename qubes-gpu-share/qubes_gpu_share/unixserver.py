"""An asyncio Unix stream server as every daemon here needs one.

Three things each socket of the broker and the agent needs, in one place:

* the socket file gets its mode (and group) before anyone can connect: the
  file permission is the first gate (qrexec's, qvm-gpu-share's);
* a socket left by a previous run is replaced, any other file refused;
* each connection's task is held until it ends: Python < 3.12 keeps no
  reference to the task it creates per connection, so a connection waiting
  on a future nobody else holds could be garbage-collected mid-call.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from collections.abc import Awaitable, Callable

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                 Awaitable[None]]


class UnixServer:
    """Serves *serve(reader, writer)* per connection on the socket *path*."""

    def __init__(self, path: str | os.PathLike, serve: Serve, *,
                 mode: int = 0o660, group: int | None = None,
                 limit: int = 2 ** 16, backlog: int = 100):
        self.path = os.fspath(path)
        self._serve = serve
        self._mode, self._group, self._limit = mode, group, limit
        #: the kernel's queue of connections not accepted yet; asyncio also
        #: accepts at most this many per turn of the loop
        self._backlog = backlog
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Bind and listen; a stale socket left by a previous run is replaced."""
        remove_stale_socket(self.path)
        old_umask = os.umask(0o777 & ~self._mode)
        try:
            self._server = await asyncio.start_unix_server(
                self._connected, path=self.path, limit=self._limit,
                backlog=self._backlog)
        finally:
            os.umask(old_umask)
        if self._group is not None:
            os.chown(self.path, -1, self._group)
        os.chmod(self.path, self._mode)

    async def close(self) -> None:
        """Stop listening and remove the socket."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def __aenter__(self) -> UnixServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def _connected(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._connections.discard(task)


#: how long a connect waits while the server's accept queue is full
CONNECT_SECONDS = 10.0


async def open_unix_connection(path: str | os.PathLike, *,
                               limit: int = 2 ** 16,
                               seconds: float = CONNECT_SECONDS
                               ) -> tuple[asyncio.StreamReader,
                                          asyncio.StreamWriter]:
    """asyncio.open_unix_connection that waits while the server's accept
    queue is full.

    A non-blocking connect to a Unix socket whose backlog is full fails
    with EAGAIN: try again later, nothing is under way (unlike TCP's
    EINPROGRESS). asyncio takes it for a connection in progress and hands
    back a socket that is not connected (the first write fails with
    ENOTCONN): a server busy refusing a flood would break its honest
    callers' calls. Here the connect is simply tried again."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        while True:
            try:
                sock.connect(os.fspath(path))
                break
            except BlockingIOError:
                if loop.time() > deadline:
                    raise ConnectionRefusedError(
                        f"{path}: the server's queue stayed full") from None
                await asyncio.sleep(0.005)
        return await asyncio.open_unix_connection(sock=sock, limit=limit)
    except BaseException:
        sock.close()
        raise


def remove_stale_socket(path: str) -> None:
    """Remove a socket left behind, but never a file of another kind."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    os.unlink(path)

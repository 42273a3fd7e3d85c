"""An asyncio server for qrexec socket services.

qrexec serves a service that is a Unix socket (usually a symlink in
/etc/qubes-rpc to a daemon's socket, as every ``admin.*`` service points to
qubesd's) by connecting to it and writing the service descriptor, then the
caller's bytes; what the service writes back goes to the caller. No process
starts per call, so one daemon serves every call of its services here.

The server reads the descriptor with a hard bound and a timeout, dispatches
on the service name to a handler from a fixed table (anything else is
refused), and closes the connection when the handler returns. Handlers read
the untrusted body with :mod:`.stream` and answer with :mod:`.reply`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Awaitable, Callable, Mapping, Optional, TypeVar

from ..unixserver import UnixServer
from . import reply
from .descriptor import (MAX_DESCRIPTOR_LEN, DescriptorError, ServiceDescriptor,
                         parse_descriptor)
from .stream import StreamError

log = logging.getLogger(__name__)
T = TypeVar("T")

Handler = Callable[
    [ServiceDescriptor, asyncio.StreamReader, asyncio.StreamWriter],
    Awaitable[None]]

#: qrexec writes the descriptor at once; a peer that does not is not qrexec.
DESCRIPTOR_TIMEOUT = 5.0
#: After answering, how long and how much of the caller's unread input the
#: server reads and drops before it closes (see :func:`_close_after_input`).
LINGER_SECONDS = 2.0
LINGER_BYTES = 1 << 20


async def _within(seconds: float, coro: Awaitable[T]) -> T:
    """``coro`` with a time limit (asyncio.TimeoutError), in this task.

    asyncio.timeout (3.11) limits the running task; wait_for (older
    Pythons) runs the coroutine in a task of its own, which costs two more
    turns of the event loop on every call a service serves.
    """
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await coro
    return await asyncio.wait_for(coro, seconds)


async def _close_after_input(reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
    """End the answer, let the caller finish sending, then close.

    A service may answer before it has read all the caller's input (a
    refusal is decided from the descriptor). Closing at once would make the
    caller's next write fail (EPIPE), and an asyncio caller then loses the
    answer already in its buffer. So: shut down our side (the caller reads
    EOF after the answer), read and drop what the caller still sends until
    its EOF, bounded by LINGER_BYTES and LINGER_SECONDS, and close.
    """
    with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()
        await _within(LINGER_SECONDS, _drop_input(reader, LINGER_BYTES))
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def _drop_input(reader: asyncio.StreamReader, limit: int) -> None:
    """Read and drop input until EOF or *limit* bytes."""
    dropped = 0
    while dropped < limit and not reader.at_eof():
        dropped += len(await reader.read(1 << 16))


async def read_descriptor(reader: asyncio.StreamReader) -> ServiceDescriptor:
    """Read and parse the NUL-terminated descriptor, at most
    :data:`MAX_DESCRIPTOR_LEN` bytes; :class:`DescriptorError` otherwise."""
    try:
        untrusted_line = await reader.readuntil(b"\0")
    except asyncio.LimitOverrunError:
        raise DescriptorError("service descriptor too long") from None
    except asyncio.IncompleteReadError:
        raise DescriptorError("connection closed inside the descriptor") from None
    return parse_descriptor(untrusted_line)


class SocketServiceServer(UnixServer):
    """Serves a fixed set of services on one Unix socket.

    *handlers* maps service names (without argument) to coroutines called
    with (descriptor, reader, writer). *only_source*, when set, refuses every
    other caller before dispatch (the agent serves dom0 only). The socket is
    created with *mode* (and *group*, a gid, when given) before anyone can
    connect, since qrexec's file permission is the only gate in front of it.
    """

    def __init__(self, path: str | os.PathLike, handlers: Mapping[str, Handler],
                 *, mode: int = 0o660, group: Optional[int] = None,
                 only_source: Optional[str] = None,
                 descriptor_timeout: float = DESCRIPTOR_TIMEOUT):
        super().__init__(path, self._connected_service, mode=mode,
                         group=group, limit=max(MAX_DESCRIPTOR_LEN, 2 ** 16))
        self._handlers = dict(handlers)
        self._only_source = only_source
        self._timeout = descriptor_timeout

    async def _connected_service(self, reader: asyncio.StreamReader,
                                 writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve_one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            log.info("caller went away")
        finally:
            await _close_after_input(reader, writer)

    async def _serve_one(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        try:
            descriptor = await _within(self._timeout, read_descriptor(reader))
        except (DescriptorError, asyncio.TimeoutError) as exc:
            log.warning("refused connection: %s", exc or "descriptor timeout")
            return
        refusal = self._refusal(descriptor)
        if refusal:
            log.warning("%s from %s: %s", descriptor.service_with_arg,
                        descriptor.source, refusal)
            writer.write(reply.error_reply(refusal))
            await writer.drain()
            return
        try:
            await self._handlers[descriptor.service](descriptor, reader, writer)
        except StreamError as exc:
            log.warning("%s from %s: %s", descriptor.service_with_arg,
                        descriptor.source, exc)
            writer.write(reply.error_reply(str(exc)))
        except Exception:  # pylint: disable=broad-except
            # A bug in one handler must not take the daemon down, and the
            # caller still deserves an answer it can parse.
            log.exception("%s from %s failed", descriptor.service_with_arg,
                          descriptor.source)
            writer.write(reply.error_reply("internal error"))
        await writer.drain()

    def _refusal(self, descriptor: ServiceDescriptor) -> Optional[str]:
        if descriptor.service not in self._handlers:
            return f"service {descriptor.service} is not served here"
        if self._only_source and descriptor.source != self._only_source:
            return f"only {self._only_source} may call {descriptor.service}"
        return None


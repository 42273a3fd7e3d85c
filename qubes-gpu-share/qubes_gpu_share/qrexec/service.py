"""An asyncio server for qrexec socket services.

qrexec serves a service that is a Unix socket (usually a symlink in
/etc/qubes-rpc to a daemon's socket, as every ``admin.*`` service points to
qubesd's) by connecting to it and writing the service descriptor, then the
caller's bytes; what the service writes back goes to the caller. No process
starts per call, so one daemon serves every call of its services here.

The server bounds what a caller can make it hold: the whole input of a
call (descriptor and body) has one deadline, the answer must be taken in
time, and only so many calls are served at once, in all and per calling
qube (one more is refused at once, with one line). It reads the
descriptor with a hard size bound, dispatches on the service name to a
handler from a fixed table (anything else is refused), and closes the
connection when the handler returns. Handlers read the untrusted body with
:mod:`.stream` and answer with :mod:`.reply`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
from typing import Awaitable, Callable, Mapping, Optional

from ..unixserver import UnixServer
from . import reply
from .descriptor import (MAX_DESCRIPTOR_LEN, DescriptorError, ServiceDescriptor,
                         parse_descriptor)
from .stream import DeadlineReader, StreamError, within

log = logging.getLogger(__name__)

Handler = Callable[
    [ServiceDescriptor, asyncio.StreamReader, asyncio.StreamWriter],
    Awaitable[None]]
#: told of every call refused before its handler ran: (descriptor or None
#: when there was none, the one-line reason)
Refusals = Callable[[Optional[ServiceDescriptor], str], None]

#: The whole input of a call (descriptor and body) must arrive within this:
#: qrexec writes the descriptor at once and a caller's message is at most a
#: few hundred KiB; a peer that dribbles holds a connection for nothing.
INPUT_SECONDS = 10.0
#: The answer must be taken within this (a caller that never reads would
#: hold the connection through a full socket buffer).
OUTPUT_SECONDS = 10.0
#: Calls served at once, in all and per calling qube (the descriptor's
#: source); one more is refused at once with one line. The unit's
#: LimitNOFILE leaves a margin over these (systemd/ and docs/broker.md).
MAX_CALLS = 256
MAX_CALLS_PER_SOURCE = 16
#: After answering, how long and how much of the caller's unread input the
#: server reads and drops before it closes (see :func:`_close_after_input`).
LINGER_SECONDS = 2.0
LINGER_BYTES = 1 << 20


async def _close_after_input(reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
    """End the answer, let the caller finish sending, then close.

    A service may answer before it has read all the caller's input (a
    refusal is decided from the descriptor). Closing at once would make the
    caller's next write fail (EPIPE), and an asyncio caller then loses the
    answer already in its buffer. So: shut down our side (the caller reads
    EOF after the answer), read and drop what the caller still sends until
    its EOF, bounded by LINGER_BYTES and LINGER_SECONDS, and close; an
    answer the caller does not take in OUTPUT_SECONDS is dropped (abort).
    """
    with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()
        await within(LINGER_SECONDS, _drop_input(reader, LINGER_BYTES))
    writer.close()
    try:
        await within(OUTPUT_SECONDS, writer.wait_closed())
    except asyncio.TimeoutError:
        writer.transport.abort()
    except ConnectionError:
        pass


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
    with (descriptor, reader, writer); the reader's reads end by the call's
    input deadline (*input_seconds* from the connection, descriptor
    included; a handler may allow a later turn more with ``reader.allow``).
    *only_source*, when set, refuses every other caller before dispatch
    (the agent serves dom0 only). At most *max_calls* calls at once, and
    *max_per_source* per calling qube: one more is refused at once.
    *on_refused* is told of each call refused before its handler ran (the
    broker's audit). The socket is created with *mode* (and *group*, a
    gid, when given) before anyone can connect, since qrexec's file
    permission is the only gate in front of it.
    """

    def __init__(self, path: str | os.PathLike, handlers: Mapping[str, Handler],
                 *, mode: int = 0o660, group: Optional[int] = None,
                 only_source: Optional[str] = None,
                 input_seconds: float = INPUT_SECONDS,
                 max_calls: int = MAX_CALLS,
                 max_per_source: int = MAX_CALLS_PER_SOURCE,
                 on_refused: Refusals = lambda descriptor, why: None):
        super().__init__(path, self._connected_service, mode=mode,
                         group=group, limit=max(MAX_DESCRIPTOR_LEN, 2 ** 16))
        self._handlers = dict(handlers)
        self._only_source = only_source
        self._input_seconds = input_seconds
        self._max_calls = max_calls
        self._max_per_source = max_per_source
        self._on_refused = on_refused
        #: calls being served, in all and per source
        self.calls = 0
        self.per_source: collections.Counter[str] = collections.Counter()

    async def _connected_service(self, raw: asyncio.StreamReader,
                                 writer: asyncio.StreamWriter) -> None:
        self.calls += 1
        try:
            if self.calls > self._max_calls:
                self._refuse(writer, None, f"too many calls at once (more "
                             f"than {self._max_calls}); try again later")
            else:
                await self._serve_one(
                    DeadlineReader(raw, self._input_seconds), writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            log.info("caller went away")
        finally:
            self.calls -= 1
            await _close_after_input(raw, writer)

    async def _serve_one(self, reader: DeadlineReader,
                         writer: asyncio.StreamWriter) -> None:
        try:
            descriptor = await read_descriptor(reader)
        except (DescriptorError, StreamError) as exc:
            log.warning("refused connection: %s", exc)
            return
        refusal = self._refusal(descriptor)
        if refusal:
            self._refuse(writer, descriptor, refusal)
            await self._drain(writer)
            return
        source = descriptor.source
        self.per_source[source] += 1
        try:
            if self.per_source[source] > self._max_per_source:
                self._refuse(writer, descriptor, f"too many calls from "
                             f"{source} at once (more than "
                             f"{self._max_per_source}); try again later")
            else:
                await self._dispatch(descriptor, reader, writer)
        finally:
            self.per_source[source] -= 1
            if not self.per_source[source]:
                del self.per_source[source]
        await self._drain(writer)

    async def _dispatch(self, descriptor: ServiceDescriptor,
                        reader: DeadlineReader,
                        writer: asyncio.StreamWriter) -> None:
        try:
            await self._handlers[descriptor.service](descriptor, reader,
                                                     writer)
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

    def _refuse(self, writer: asyncio.StreamWriter,
                descriptor: Optional[ServiceDescriptor], why: str) -> None:
        if descriptor is not None:
            log.warning("%s from %s: %s", descriptor.service_with_arg,
                        descriptor.source, why)
        self._on_refused(descriptor, why)
        writer.write(reply.error_reply(why))

    @staticmethod
    async def _drain(writer: asyncio.StreamWriter) -> None:
        """Send the answer, within OUTPUT_SECONDS."""
        try:
            await within(OUTPUT_SECONDS, writer.drain())
        except asyncio.TimeoutError:
            writer.transport.abort()

    def _refusal(self, descriptor: ServiceDescriptor) -> Optional[str]:
        if descriptor.service not in self._handlers:
            return f"service {descriptor.service} is not served here"
        if self._only_source and descriptor.source != self._only_source:
            return f"only {self._only_source} may call {descriptor.service}"
        return None

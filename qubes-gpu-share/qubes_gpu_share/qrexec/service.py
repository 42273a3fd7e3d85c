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
#: ... of which the descriptor (qrexec writes it at once).
DESCRIPTOR_SECONDS = 2.0
#: connections queued by the kernel, and accepted per turn of the loop
BACKLOG = 32
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
                             writer: asyncio.StreamWriter, *,
                             linger: bool = True) -> None:
    """End the answer, let the caller finish sending, then close.

    A service may answer before it has read all the caller's input (a
    refusal is decided from the descriptor). Closing at once would make the
    caller's next write fail (EPIPE), and an asyncio caller then loses the
    answer already in its buffer. So: shut down our side (the caller reads
    EOF after the answer), read and drop what the caller still sends until
    its EOF, bounded by LINGER_BYTES and LINGER_SECONDS, and close; an
    answer the caller does not take in OUTPUT_SECONDS is dropped (abort).
    A call refused over a cap (not ``linger``) is closed at once: lingering
    would let a flood of such calls hold the very fds the caps protect
    (the input asyncio already read is no obstacle; only bytes arriving in
    the last instant could cost that caller its one-line refusal).
    """
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()
        if linger:
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
                         group=group, limit=max(MAX_DESCRIPTOR_LEN, 2 ** 16),
                         backlog=BACKLOG)
        self._handlers = dict(handlers)
        self._only_source = only_source
        self._input_seconds = input_seconds
        self._max_calls = max_calls
        self._max_per_source = max_per_source
        self._on_refused = on_refused
        #: connections whose descriptor has not arrived yet
        self.pending = 0
        #: calls being served (descriptor read), in all and per source
        self.calls = 0
        self.per_source: collections.Counter[str] = collections.Counter()

    async def _connected_service(self, raw: asyncio.StreamReader,
                                 writer: asyncio.StreamWriter) -> None:
        """One connection. Until its descriptor arrived it is anonymous
        (counted in ``pending``; its descriptor is due within
        DESCRIPTOR_SECONDS: qrexec writes it at once, and the server
        accepts at most BACKLOG connections per turn of the loop, so a
        flood of connections is identified, and refused over its qube's
        cap, as fast as it comes); then it counts for its source and in
        ``calls`` until it is closed (lingering included). A call over a
        cap is refused with one line and closed at once (no linger: it
        holds an fd no longer than it takes to say no)."""
        source, linger = None, False
        self.pending += 1
        identified = False
        try:
            reader = DeadlineReader(raw, min(DESCRIPTOR_SECONDS,
                                             self._input_seconds))
            try:
                descriptor = await read_descriptor(reader)
            except (DescriptorError, StreamError) as exc:
                log.warning("refused connection: %s", exc)
                return
            finally:
                self.pending -= 1
                identified = True
            reader.allow(self._input_seconds)  # the whole input's deadline
            source = descriptor.source
            self.per_source[source] += 1
            self.calls += 1
            linger = await self._serve_one(descriptor, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            log.info("caller went away")
        finally:
            if not identified:
                self.pending -= 1
            await _close_after_input(raw, writer, linger=linger)
            if source is not None:
                self.calls -= 1
                self.per_source[source] -= 1
                if not self.per_source[source]:
                    del self.per_source[source]

    async def _serve_one(self, descriptor: ServiceDescriptor,
                         reader: DeadlineReader,
                         writer: asyncio.StreamWriter) -> bool:
        """Serve (or refuse) one identified call; whether to linger."""
        source = descriptor.source
        over = (f"too many calls from {source} at once (more than "
                f"{self._max_per_source})"
                if self.per_source[source] > self._max_per_source else
                f"too many calls at once (more than {self._max_calls})"
                if self.calls > self._max_calls else None)
        if over:
            self._refuse(writer, descriptor, f"{over}; try again later")
            await self._drain(writer)
            return False
        refusal = self._refusal(descriptor)
        if refusal:
            self._refuse(writer, descriptor, refusal)
        else:
            await self._dispatch(descriptor, reader, writer)
        await self._drain(writer)
        return True

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

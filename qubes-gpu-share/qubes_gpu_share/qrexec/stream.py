"""Bounded reads of untrusted bytes from an asyncio stream.

Both ends of a qrexec call read what the other end chose to send: a service
reads the caller's request, a caller reads the service's answer. Neither may
let the other make it buffer without limit, so every read here has a hard
maximum and fails with :class:`StreamError` (one line) instead of growing.

Three shapes are needed: a one-shot body that ends at EOF (the caller
shuts down its write side), and one message of a multi-turn conversation,
which ends at a terminator byte (:func:`read_message`) or where its own
framing says (:func:`read_frame`, the offer flow's protocol messages)
while the stream stays open.

Size is one bound, time the other: a peer that sends one byte a second
stays under every size limit while it holds a connection (and a file
descriptor, and a place among the calls in flight) for as long as it
likes. :class:`DeadlineReader` gives a whole input one deadline.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Optional, TypeVar

T = TypeVar("T")

#: Chunk size for reads until EOF; the bound, not this, limits memory.
_CHUNK = 64 * 1024


class StreamError(ValueError):
    """The peer sent more than allowed, or stopped in the middle."""


class StreamClosed(StreamError):
    """The peer ended its output cleanly where a message could have begun."""


class InputTimeout(StreamError):
    """The peer did not send its input before the deadline."""


class DeadlineReader:
    """An asyncio.StreamReader whose reads all end by one deadline (the
    loop's clock), so that the whole input of a call, not each read, is
    bounded in time. The owner may move the deadline (a conversation's next
    turn gets its own)."""

    def __init__(self, reader: asyncio.StreamReader, seconds: float):
        self._reader = reader
        self.deadline = asyncio.get_running_loop().time() + seconds

    def allow(self, seconds: float) -> None:
        """The next input may take ``seconds`` from now."""
        self.deadline = asyncio.get_running_loop().time() + seconds

    def at_eof(self) -> bool:
        return self._reader.at_eof()

    async def read(self, n: int = -1) -> bytes:
        return await self._within(self._reader.read(n))

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        return await self._within(self._reader.readuntil(separator))

    async def _within(self, coro):
        remaining = self.deadline - asyncio.get_running_loop().time()
        try:
            return await within(max(remaining, 0.0), coro)
        except asyncio.TimeoutError:
            raise InputTimeout("the input did not arrive in time") from None


async def within(seconds: float, coro: Awaitable[T]) -> T:
    """``coro`` with a time limit (asyncio.TimeoutError), in this task.

    asyncio.timeout (3.11) limits the running task; wait_for (older
    Pythons) runs the coroutine in a task of its own, which costs two more
    turns of the event loop on every read a service makes.
    """
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await coro
    return await asyncio.wait_for(coro, seconds)


async def read_to_eof(reader: asyncio.StreamReader, max_len: int) -> bytes:
    """Read until EOF; refuse once more than *max_len* bytes arrived."""
    untrusted_data = bytearray()
    while True:
        chunk = await reader.read(min(_CHUNK, max_len + 1 - len(untrusted_data)))
        if not chunk:
            return bytes(untrusted_data)
        untrusted_data += chunk
        if len(untrusted_data) > max_len:
            raise StreamError(f"more than {max_len} bytes before end of input")


async def read_message(reader: asyncio.StreamReader, max_len: int,
                       terminator: bytes = b"\n") -> bytes:
    """Read one message ending in *terminator*; return it without it.

    *max_len* counts the message without its terminator and must not exceed
    the stream's buffer limit (asyncio's default is 64 KiB), which is what
    bounds the buffering while the terminator is searched for. An empty
    stream at the message start raises :class:`StreamClosed`, so that a caller
    can tell "the peer is done" from "the peer broke off".
    """
    try:
        untrusted_message = await reader.readuntil(terminator)
    except asyncio.LimitOverrunError:
        raise StreamError(f"message longer than {max_len} bytes") from None
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise StreamClosed("end of input before a message") from None
        raise StreamError("end of input in the middle of a message") from None
    untrusted_message = untrusted_message[:-len(terminator)]
    if len(untrusted_message) > max_len:
        raise StreamError(f"message longer than {max_len} bytes")
    return untrusted_message


async def read_frame(reader: asyncio.StreamReader, max_len: int,
                     frame_length: Callable[[bytearray], Optional[int]]
                     ) -> bytes:
    """Read one framed message from a stream that stays open; nothing may
    follow it before our answer.

    ``frame_length`` (e.g. :func:`..protocol.frame_length`) tells the
    length of the message at the start of what arrived so far, or None
    while it is incomplete, and raises on what cannot start a message.
    What arrived is kept in one growing buffer that it reads in place, so
    reading costs what the message is long, as long as ``frame_length``
    costs no more than a header (the protocol's does, for every message
    but the lease list, which no conversation carries). More than
    *max_len* bytes, an early EOF or data after the message raise
    :class:`StreamError`.
    """
    untrusted_data = bytearray()
    while True:
        end = frame_length(untrusted_data)
        if end is not None:
            if end != len(untrusted_data):
                raise StreamError("data after the message")
            return bytes(untrusted_data)
        if len(untrusted_data) >= max_len:
            raise StreamError(f"message over {max_len} bytes")
        chunk = await reader.read(min(_CHUNK, max_len - len(untrusted_data)))
        if not chunk:
            raise StreamError("end of input inside a message")
        untrusted_data += chunk

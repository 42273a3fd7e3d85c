"""Bounded reads of untrusted bytes from an asyncio stream.

Both ends of a qrexec call read what the other end chose to send: a service
reads the caller's request, a caller reads the service's answer. Neither may
let the other make it buffer without limit, so every read here has a hard
maximum and fails with :class:`StreamError` (one line) instead of growing.

Two shapes are needed: a one-shot body that ends at EOF (the caller shuts
down its write side), and one message of a multi-turn conversation (the
offer flow), which ends at a terminator byte while the stream stays open.
"""

from __future__ import annotations

import asyncio

#: Chunk size for reads until EOF; the bound, not this, limits memory.
_CHUNK = 64 * 1024


class StreamError(ValueError):
    """The peer sent more than allowed, or stopped in the middle."""


class StreamClosed(StreamError):
    """The peer ended its output cleanly where a message could have begun."""


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

#!/usr/bin/env python3
"""qrexec.stream.read_message and read_to_eof over whatever the peer sent:
the first byte picks the reader, the bound and the terminator. Only
StreamError (StreamClosed included) may escape, and nothing returned may be
longer than the bound.
"""

from __future__ import annotations

import asyncio

from harness import fuzz_main, instrumented

with instrumented():
    from qubes_gpu_share.qrexec.stream import (StreamClosed, StreamError,
                                               read_message, read_to_eof)

NAME = "stream"
BOUNDS = (0, 1, 16, 255, 4096)
_LOOP = asyncio.new_event_loop()


async def _read(data: bytes) -> None:
    mode = data[0]
    bound = BOUNDS[mode % len(BOUNDS)]
    reader = asyncio.StreamReader(limit=max(bound, 1) + 1)
    reader.feed_data(data[1:])
    reader.feed_eof()
    if mode & 0x80:
        if len(await read_to_eof(reader, bound)) > bound:
            raise AssertionError("read_to_eof returned more than its bound")
        return
    terminator = b"\0" if mode & 0x40 else b"\n"
    while True:
        try:
            message = await read_message(reader, bound, terminator)
        except StreamClosed:
            return
        if len(message) > bound:
            raise AssertionError("read_message returned more than its bound")


def target(data: bytes) -> None:
    if not data:
        return
    try:
        _LOOP.run_until_complete(_read(data))
    except StreamError:
        return


if __name__ == "__main__":
    fuzz_main(NAME, target)

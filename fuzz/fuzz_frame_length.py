#!/usr/bin/env python3
"""protocol.frame_length over any prefix of a stream: None (read more), the
length of the first message, or ProtocolError; nothing else may escape. A
length it returns must be within the input and within the largest message.
"""

from __future__ import annotations

from harness import fuzz_main, instrumented

with instrumented():
    from qubes_gpu_share import protocol as p

NAME = "frame_length"
LARGEST = max(p.MAX_SIZE.values())


def target(data: bytes) -> None:
    try:
        length = p.frame_length(data)
    except p.ProtocolError:
        return
    if length is not None and not 0 < length <= min(len(data), LARGEST):
        raise AssertionError(f"frame length {length} for {len(data)} bytes")


if __name__ == "__main__":
    fuzz_main(NAME, target)

#!/usr/bin/env python3
"""protocol.decode, for every message type: the first input byte chooses
which types the caller expects (none = any, as the broker's first read, or
exactly one, as every later read); the rest is the message.

Only protocol.ProtocolError may escape. A message that decodes must encode
to the very same bytes (nothing half-parsed, nothing normalised away).
"""

from __future__ import annotations

from harness import fuzz_main, instrumented

with instrumented():
    from qubes_gpu_share import protocol as p

NAME = "protocol"
CHOICES: list[tuple[type, ...]] = [()] + [(cls,) for cls in
                                          p.MESSAGES.values()]


def target(data: bytes) -> None:
    if not data:
        return
    expected = CHOICES[data[0] % len(CHOICES)]
    body = data[1:]
    try:
        message = p.decode(body, *expected)
    except p.ProtocolError:
        return
    if expected and type(message) not in expected:
        raise AssertionError(f"decoded {type(message)} for {expected}")
    if p.encode(message) != body:
        raise AssertionError("decode then encode changed the bytes")


if __name__ == "__main__":
    fuzz_main(NAME, target)

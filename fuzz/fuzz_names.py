#!/usr/bin/env python3
"""names.parse_qube_name and names.parse_lease_id, on bytes and on text
(they take both): only InvalidName may escape, and what they accept is
returned unchanged as text.
"""

from __future__ import annotations

from harness import fuzz_main, instrumented

with instrumented():
    from qubes_gpu_share.names import InvalidName, parse_lease_id, parse_qube_name

NAME = "names"


def target(data: bytes) -> None:
    parse = parse_qube_name if data[:1] < b"\x80" else parse_lease_id
    for value in (data[1:], data[1:].decode("latin-1")):
        try:
            name = parse(value)
        except InvalidName:
            continue
        expected = value if isinstance(value, str) else value.decode("ascii")
        if name != expected:
            raise AssertionError(f"{parse.__name__} changed {value!r}")


if __name__ == "__main__":
    fuzz_main(NAME, target)

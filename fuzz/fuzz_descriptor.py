#!/usr/bin/env python3
"""qrexec.descriptor.parse_descriptor: the line qrexec writes before the
caller's bytes (its argument part is the caller's choice). Only
DescriptorError may escape; a descriptor that parses must encode to a line
that parses to the same descriptor.
"""

from __future__ import annotations

from harness import fuzz_main, instrumented

with instrumented():
    from qubes_gpu_share.qrexec.descriptor import DescriptorError, parse_descriptor

NAME = "descriptor"


def target(data: bytes) -> None:
    try:
        descriptor = parse_descriptor(data)
    except DescriptorError:
        return
    if parse_descriptor(descriptor.encode()) != descriptor:
        raise AssertionError("descriptor does not round-trip")


if __name__ == "__main__":
    fuzz_main(NAME, target)

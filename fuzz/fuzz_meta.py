#!/usr/bin/env python3
"""formats.validate_meta as qube input reaches it: through the messages
that carry a buffer layout (ExportRequest to a provider, LeaseAnswer to a
consumer). A layout that decodes must also pass validate_meta on its own
(the decoder must not accept what the registry would refuse).
"""

from __future__ import annotations

from harness import fuzz_main, instrumented

with instrumented():
    from qubes_gpu_share import protocol as p
    from qubes_gpu_share.formats import validate_meta

NAME = "meta"


def target(data: bytes) -> None:
    try:
        message = p.decode(data, p.ExportRequest, p.LeaseAnswer)
    except p.ProtocolError:
        return
    validate_meta(message.meta, allowed_modifiers=None)


if __name__ == "__main__":
    fuzz_main(NAME, target)

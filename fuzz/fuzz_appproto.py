#!/usr/bin/env python3
"""The agent's application protocol (appproto.py), both directions:
an application's request to its agent (decode_request) and, for the
client, a lease reply from the agent (load_object + LeaseInfo.from_reply).
The first byte chooses which. Only AppProtocolError may escape.
"""

from __future__ import annotations

from harness import fuzz_main, instrumented

with instrumented():
    from qubes_gpu_share.appproto import (MAX_REPLY, AppProtocolError,
                                          LeaseInfo, decode_request,
                                          load_object)

NAME = "appproto"


def target(data: bytes) -> None:
    if not data:
        return
    try:
        if data[0] & 1:
            LeaseInfo.from_reply(load_object(data[1:], MAX_REPLY))
        else:
            decode_request(data[1:])
    except AppProtocolError:
        return


if __name__ == "__main__":
    fuzz_main(NAME, target)

"""The agent's qrexec socket services: what dom0 asks of this qube.

``/etc/qubes-rpc/qubes.GpuExport``, ``qubes.GpuDeliver`` and
``qubes.GpuRevoke`` are symlinks to the agent's ``agent.sock``; qrexec
connects and writes the descriptor, the broker's request follows, the
caller ends its input, and the agent answers ``0\\0`` + one protocol message
(qrexec/reply.py). Only dom0 may call: the server refuses every other source
before a handler runs (``only_source``), since a qube that could ask us to
grant or revoke would bypass the broker's policy and accounting.

Each handler decodes the body strictly (protocol.decode with its size
bound); a malformed body gets ``Error(malformed)`` and changes nothing.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from ..names import DOM0
from ..protocol import (Error, ExportRequest, LeaseAnswer, Message,
                        ProtocolError, RevokeRequest, decode, encode,
                        max_size_for)
from ..qrexec import reply, stream
from ..qrexec.descriptor import ServiceDescriptor
from ..qrexec.service import SocketServiceServer

if TYPE_CHECKING:
    from .daemon import Agent

log = logging.getLogger(__name__)

EXPORT = "qubes.GpuExport"
DELIVER = "qubes.GpuDeliver"
REVOKE = "qubes.GpuRevoke"


async def _read_request(reader, *expected: type) -> Message | Error:
    untrusted_body = await stream.read_to_eof(reader, max_size_for(*expected))
    try:
        return decode(untrusted_body, *expected)
    except ProtocolError as exc:
        return Error.of(exc.code, str(exc))


def _answer(writer, descriptor: ServiceDescriptor, message: Message) -> None:
    if isinstance(message, Error):
        log.warning("%s from %s: %s: %s", descriptor.service,
                    descriptor.source, message.code, message.message)
    writer.write(reply.ok_reply(encode(message)))


def make_server(agent: Agent, path: str | os.PathLike,
                mode: int = 0o600) -> SocketServiceServer:
    """The service socket of ``agent``; ``mode`` 0600 because qrexec (root
    in a qube) is the only process meant to connect."""

    async def export(descriptor, reader, writer) -> None:
        request = await _read_request(reader, ExportRequest)
        if isinstance(request, ExportRequest):
            request = agent.export(request)
        _answer(writer, descriptor, request)

    async def deliver(descriptor, reader, writer) -> None:
        request = await _read_request(reader, LeaseAnswer)
        if isinstance(request, LeaseAnswer):
            request = agent.deliver(request)
        _answer(writer, descriptor, request)

    async def revoke(descriptor, reader, writer) -> None:
        request = await _read_request(reader, RevokeRequest)
        if isinstance(request, RevokeRequest):
            request = await agent.revoke(request.lease, request.role)
        _answer(writer, descriptor, request)

    return SocketServiceServer(
        path, {EXPORT: export, DELIVER: deliver, REVOKE: revoke},
        mode=mode, only_source=DOM0)


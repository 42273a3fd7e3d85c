"""A hostile qube's tools for tests/test_hostile.py.

- :func:`call_service`: bytes straight to a service socket (the broker's
  broker.sock, an agent's agent.sock) after the descriptor qrexec would
  write for the calling qube (qrexec/descriptor.py), or after any raw
  descriptor bytes a test chooses;
- :func:`app_exchange`: one raw packet to an agent's app.sock;
- :class:`ScriptedProvider`: a process-like peer serving a provider
  qube's agent.sock (qubes.GpuExport / GpuRevoke) with scripted answers,
  i.e. a provider agent that lies.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable

from qubes_gpu_share import protocol
from qubes_gpu_share import appproto
from qubes_gpu_share.names import DOM0
from qubes_gpu_share.protocol import (ExportRequest, GrantRefs, RevokeAnswer,
                                      RevokeStatus)
from qubes_gpu_share.qrexec import reply
from qubes_gpu_share.qrexec.descriptor import ServiceDescriptor
from qubes_gpu_share.qrexec.service import SocketServiceServer

#: Longest answer read back: far more than any legal one.
MAX_ANSWER = 1 << 20


def dom0_descriptor(source: str, service_with_arg: str) -> bytes:
    """What qrexec writes to a dom0 service called by *source*."""
    service, _plus, argument = service_with_arg.partition("+")
    return ServiceDescriptor(service, argument, source, "keyword",
                             "adminvm").encode()


def qube_descriptor(source: str, service: str) -> bytes:
    """What qrexec writes to a qube's service called by *source*."""
    return ServiceDescriptor(service, "", source).encode()


def call_service(path, descriptor: bytes, body: bytes = b"",
                 timeout: float = 20.0) -> bytes:
    """Connect, write *descriptor* and *body*, end input, read the whole
    answer (bounded)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        try:
            sock.sendall(descriptor + body)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before it read everything: the answer tells
        answer = b""
        while len(answer) <= MAX_ANSWER:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
    return answer


def refusal_of(answer: bytes) -> tuple[str, str]:
    """(code, message) of a broker refusal: ``0\\0`` + error message, or
    ``1\\0`` + one line (refused before the handler). AssertionError if
    *answer* is anything else."""
    if answer.startswith(reply.ERROR_PREFIX):
        line = answer[len(reply.ERROR_PREFIX):].decode("ascii")
        assert line.endswith("\n") and line.count("\n") == 1, answer
        return "refused", line.strip()
    payload = reply.parse_reply(answer)
    error = protocol.decode(payload, protocol.Error)
    assert "\n" not in error.message
    return error.code, error.message


def app_exchange(path, packet: bytes, timeout: float = 20.0) -> dict:
    """One raw packet to app.sock; the agent's one reply, decoded."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.send(packet)
        data = sock.recv(appproto.MAX_REPLY)
    return appproto.load_object(data, appproto.MAX_REPLY)


#: A scripted GpuExport answer: the request -> the bytes written back
#: (status included).
ExportScript = Callable[[ExportRequest], bytes]


def export_answer(refs) -> bytes:
    return reply.ok_reply(protocol.encode(
        protocol.ExportAnswer(GrantRefs.from_ints(refs))))


class ScriptedProvider:
    """Serves a provider qube's agent.sock from a thread of the test with
    its own event loop, answering GpuExport with *script* and GpuRevoke
    with ``released`` (it granted nothing, so it holds nothing)."""

    def __init__(self, path, script: ExportScript):
        self.requests: list[ExportRequest] = []
        self._path = path
        self._script = script
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Future | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ScriptedProvider:
        self._thread.start()
        assert self._ready.wait(10), "scripted provider did not start"
        return self

    def __exit__(self, *exc_info) -> None:
        self._loop.call_soon_threadsafe(self._stop.set_result, None)
        self._thread.join(10)

    def _run(self) -> None:
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = self._loop.create_future()
        server = SocketServiceServer(
            self._path, {"qubes.GpuExport": self._export,
                         "qubes.GpuRevoke": self._revoke},
            only_source=DOM0)
        async with server:
            self._ready.set()
            await self._stop

    async def _export(self, _descriptor, reader, writer) -> None:
        request = protocol.decode(await reader.read(), ExportRequest)
        self.requests.append(request)
        writer.write(self._script(request))

    async def _revoke(self, _descriptor, reader, writer) -> None:
        await reader.read()
        writer.write(reply.ok_reply(protocol.encode(
            RevokeAnswer(RevokeStatus.RELEASED))))

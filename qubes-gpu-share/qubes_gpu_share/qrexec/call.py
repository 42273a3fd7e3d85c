"""Making a qrexec call: the interface, the real qube->dom0 call, statuses.

A caller names a target, ``SERVICE+ARG``, and gets the exit status and the
(bounded) output. qrexec's own failures arrive as exit statuses, the same
from ``qrexec-client-vm`` and from the simulated router (:mod:`.router`):
126 policy denied, 125 qrexec trouble, 127 no such service; socket services
always exit 0 and put their own status in the output (:mod:`.reply`).

:class:`ServiceCaller` is what the broker needs for dom0 -> qube calls; the
real one lives in qubes/admin.py (qubesadmin's ``vm.run_service``), the
simulated one is the router's. Qubes need :class:`DuplexCaller` as well:
the offer flow is a conversation of several turns on one call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
from typing import Awaitable, Callable, Optional, Protocol, Tuple

from . import reply, stream

log = logging.getLogger(__name__)

QREXEC_CLIENT_VM = "/usr/bin/qrexec-client-vm"
#: dom0's client (qubesadmin.config.QREXEC_CLIENT says the same)
QREXEC_CLIENT = "/usr/lib/qubes/qrexec-client"
EXIT_PROBLEM = 125
EXIT_REFUSED = 126
EXIT_NOT_FOUND = 127
#: How much of qrexec-client-vm's stderr is kept per call: its messages
#: are a line or two ("Request refused", a vchan error); the rest is read
#: and dropped, so it can neither block on a full pipe nor flood the log.
STDERR_KEPT = 4096
#: How long the last of that stderr may take after the program exited.
STDERR_WAIT = 1.0


class QrexecCallError(Exception):
    """A qrexec call did not reach a service that answered properly."""


class PolicyDenied(QrexecCallError):
    """qrexec policy refused the call (exit status 126)."""


class QrexecProblem(QrexecCallError):
    """qrexec itself failed (exit status 125, or an unexpected one)."""


class ServiceNotFound(QrexecCallError):
    """The target has no such service (exit status 127)."""


class OutputTooLong(QrexecCallError):
    """The service sent more than the caller's bound."""


def raise_for_status(status: int, target: str, service_with_arg: str) -> None:
    """Map a non-zero qrexec exit status to its exception."""
    if status == 0:
        return
    where = f"{service_with_arg} to {target}"
    if status == EXIT_REFUSED:
        raise PolicyDenied(f"{where}: refused by qrexec policy")
    if status == EXIT_NOT_FOUND:
        raise ServiceNotFound(f"{where}: no such service")
    raise QrexecProblem(f"{where}: qrexec failed with status {status}")


class ServiceCaller(Protocol):
    """One-shot call: the whole payload in, at most *max_output* bytes out."""

    async def call_service(self, target: str, service_with_arg: str,
                           payload: bytes, max_output: int) -> Tuple[int, bytes]:
        ...


class Conversation:
    """One open qrexec call whose two directions are used turn by turn."""

    def __init__(self, target: str, service_with_arg: str,
                 reader: asyncio.StreamReader,
                 writer: Optional[asyncio.StreamWriter],
                 wait_status: Callable[[], Awaitable[int]]):
        self.target = target
        self.service_with_arg = service_with_arg
        self._reader = reader
        self._writer = writer
        self._wait_status = wait_status

    async def send(self, data: bytes) -> None:
        """Write to the service (dropped when the call never got through,
        like writes to a qrexec-client-vm that already exited)."""
        if self._writer is None or self._writer.is_closing():
            return
        self._writer.write(data)
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()

    async def end_input(self) -> None:
        """Shut down the write side: the service sees EOF."""
        if self._writer is None or self._writer.is_closing():
            return
        with contextlib.suppress(ConnectionError):
            if self._writer.can_write_eof():
                self._writer.write_eof()
            else:
                self._writer.close()

    async def read_message(self, max_len: int, terminator: bytes = b"\n") -> bytes:
        """One message of the answer; qrexec's failure when there is none."""
        try:
            return await stream.read_message(self._reader, max_len, terminator)
        except stream.StreamClosed:
            await self._fail_on_status()
            raise QrexecProblem(f"{self.service_with_arg} to {self.target}: "
                                "the answer ended early") from None
        except stream.StreamError as exc:
            raise QrexecProblem(f"{self.service_with_arg} to {self.target}: "
                                f"{exc}") from None
        except ConnectionError as exc:
            raise self._gone(exc) from None

    async def read_to_eof(self, max_len: int) -> bytes:
        """The rest of the answer, bounded."""
        try:
            return await stream.read_to_eof(self._reader, max_len)
        except stream.StreamError as exc:
            raise OutputTooLong(f"{self.service_with_arg}: {exc}") from None
        except ConnectionError as exc:
            raise self._gone(exc) from None

    def _gone(self, exc: ConnectionError) -> QrexecProblem:
        """The service's end vanished mid-call (its daemon died): qrexec's
        trouble for the caller, like any other broken call."""
        return QrexecProblem(f"{self.service_with_arg} to {self.target}: "
                             f"the service went away ({exc.strerror})")

    async def wait(self) -> int:
        """Close the call and return its exit status."""
        if self._writer is not None:
            self._writer.close()
        return await self._wait_status()

    async def _fail_on_status(self) -> None:
        raise_for_status(await self.wait(), self.target, self.service_with_arg)

    async def __aenter__(self) -> "Conversation":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.wait()


class DuplexCaller(ServiceCaller, Protocol):
    """A caller that can also hold a conversation."""

    async def open_service(self, target: str,
                           service_with_arg: str) -> Conversation:
        ...


class ConversationCaller:
    """:meth:`call_service` on top of :meth:`open_service`, for both
    implementations below and in :mod:`.router`."""

    async def open_service(self, target: str,
                           service_with_arg: str) -> Conversation:
        raise NotImplementedError

    async def call_service(self, target: str, service_with_arg: str,
                           payload: bytes, max_output: int) -> Tuple[int, bytes]:
        conversation = await self.open_service(target, service_with_arg)
        async with conversation:
            await conversation.send(payload)
            await conversation.end_input()
            output = await conversation.read_to_eof(max_output)
        return await conversation.wait(), output


class ClientVmCaller(ConversationCaller):
    """Calls from a qube, through ``qrexec-client-vm TARGET SERVICE+ARG``.

    Its stderr is captured, not inherited: qrexec's own messages would
    otherwise reach the agent's journal without saying which call they
    belong to. They are logged once per call, as one line naming the call
    (:func:`stderr_line`): a warning when the call failed, debug otherwise.
    """

    def __init__(self, program: str = QREXEC_CLIENT_VM):
        self._program = program

    def argv(self, target: str, service_with_arg: str) -> list:
        """The program's command line for one call."""
        return [self._program, "--", target, service_with_arg]

    async def open_service(self, target: str,
                           service_with_arg: str) -> Conversation:
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv(target, service_with_arg),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE)
        except OSError as exc:
            raise QrexecProblem(f"cannot run {self._program}: {exc}") from None
        stderr = asyncio.ensure_future(_read_bounded(proc.stderr, STDERR_KEPT))
        logged = False

        async def wait_status() -> int:
            nonlocal logged
            with contextlib.suppress(ProcessLookupError):
                if proc.returncode is None and not proc.stdout.at_eof():
                    proc.kill()
            status = await proc.wait()
            if not logged:
                logged = True
                await _log_stderr(stderr, status,
                                  f"{os.path.basename(self._program)} "
                                  f"{service_with_arg} to {target}")
            return status

        return Conversation(target, service_with_arg, proc.stdout, proc.stdin,
                            wait_status)


class QrexecClientCaller(ClientVmCaller):
    """Calls from dom0 into a qube: ``qrexec-client -d QUBE
    'DEFAULT:QUBESRPC SERVICE+ARG dom0'`` (what qubesadmin's run_service
    runs in dom0), as an asyncio subprocess: no thread waits on a qube.
    Exit status: the service's, 125 when the qube does not run or qrexec
    cannot connect, 127 when it has no such service."""

    def __init__(self, program: str = QREXEC_CLIENT):
        super().__init__(program)

    def argv(self, target: str, service_with_arg: str) -> list:
        return [self._program, "-d", target,
                f"DEFAULT:QUBESRPC {service_with_arg} dom0"]


async def _read_bounded(reader: asyncio.StreamReader,
                        kept: int) -> Tuple[bytes, int]:
    """Read *reader* to its end; the first *kept* bytes, and how many more
    were dropped."""
    data, dropped = bytearray(), 0
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            return bytes(data), dropped
        room = max(0, kept - len(data))
        data += chunk[:room]
        dropped += len(chunk) - min(room, len(chunk))


def stderr_line(data: bytes, dropped: int = 0) -> str:
    """A program's stderr as one log line: printable ASCII (anything else
    shows as '?'), its non-empty lines joined by ' | ', and how much was
    dropped; '' when it said nothing."""
    lines = ("".join(c if " " <= c <= "~" else " " if c == "\t" else "?"
                     for c in line).strip()
             for line in data.decode("ascii", "replace").splitlines())
    text = " | ".join(line for line in lines if line)
    if dropped:
        text += f" | ({dropped} more bytes dropped)"
    return text


async def _log_stderr(collected: "asyncio.Future[Tuple[bytes, int]]",
                      status: int, call_name: str) -> None:
    try:
        data, dropped = await asyncio.wait_for(collected, STDERR_WAIT)
    except asyncio.TimeoutError:
        # a child of qrexec-client-vm still holds the pipe: not ours to wait
        log.debug("%s: its stderr did not end", call_name)
        return
    text = stderr_line(data, dropped)
    if text:
        log.log(logging.WARNING if status else logging.DEBUG,
                "%s: exit status %d: %s", call_name, status,
                text)


async def call(caller: ServiceCaller, target: str, service_with_arg: str,
               payload: bytes, max_output: int) -> bytes:
    """Call a socket service of this project and return its payload.

    Raises a :class:`QrexecCallError` for qrexec's failures and
    :class:`.reply.ServiceRefused` when the service said no.
    """
    status, untrusted_output = await caller.call_service(
        target, service_with_arg, payload, max_output)
    raise_for_status(status, target, service_with_arg)
    try:
        return reply.parse_reply(untrusted_output)
    except reply.BadReply as exc:
        raise QrexecProblem(f"{service_with_arg} to {target}: {exc}") from None

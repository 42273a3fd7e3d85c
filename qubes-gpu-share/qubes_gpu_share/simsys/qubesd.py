"""A stand-in qubesd: the Admin API's wire format over a model of qubes.

For the tests and the benchmark of the broker's qubesd path: the project's
own code, answering the calls the broker makes (admin.vm.List,
admin.vm.property.GetAll/Get, admin.vm.feature.List/Get, admin.vm.tag.List,
admin.vm.CurrentState, admin.Events) from a :class:`~..qubes.memory.
MemoryQubes` model, the way qubesd frames them (facts read from Qubes'
sources, see docs/bench.md):

* a call is ``METHOD+ARG SOURCE name DEST\\0`` then the payload and EOF;
* an answer is ``0\\0`` + data, or ``2\\0`` + the exception's class name,
  ``\\0``, a traceback (empty), ``\\0``, a message format, ``\\0``, and each
  argument followed by ``\\0``;
* admin.Events answers with events, each ``1\\0`` + subject ``\\0`` + name
  ``\\0`` + (key ``\\0`` value ``\\0``)* + ``\\0``, the first one
  ``connection-established``.

qubesd serves one call at a time; so does this stand-in, each after
``delay`` seconds (what a real dom0's qubesd costs per call is the
benchmark's parameter). ``calls`` counts the calls by method. It is served
on a Unix socket (qubesadmin connects to it where that library is present)
or called in-process (:meth:`call`, :meth:`listen`: the CI tests of
:mod:`..qubes.qubesd`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from collections.abc import Mapping

from ..qubeinfo import EventKind, QubeEvent, QubeInfo
from ..qubes.memory import MemoryQubes
from ..qubes.qubesd import EventHandler, QubesdError
from ..unixserver import UnixServer

#: qubesd's event names for the model's events
_EVENT_NAMES = {EventKind.START: "domain-start",
                EventKind.PRE_SHUTDOWN: "domain-pre-shutdown",
                EventKind.SHUTDOWN: "domain-shutdown",
                EventKind.CONNECTED: "connection-established"}
#: filler properties, so that GetAll costs about what a real one does
_OTHER_PROPERTIES = ("autostart", "backup_timestamp", "debug",
                     "default_dispvm", "default_user", "include_in_backups",
                     "kernel", "kernelopts", "label", "mac", "maxmem",
                     "memory", "netvm", "provides_network", "qrexec_timeout",
                     "shutdown_timeout", "template", "uuid", "vcpus",
                     "visible_ip", "visible_netmask")


class StandInQubesd:
    """Answers Admin API calls about ``model``'s qubes."""

    def __init__(self, model: MemoryQubes, *, delay: float = 0.0):
        self.model = model
        self.delay = delay
        self.calls: collections.Counter[str] = collections.Counter()
        #: a broken events connection stops in the middle of an event
        #: (qubesadmin then raises IncompleteReadError), not between two
        self.cut_mid_event = False
        self._lock = asyncio.Lock()
        self._server: UnixServer | None = None

    # -- in-process (tests of qubes/qubesd.py without qubesadmin) --

    def call(self, dest: str, method: str, arg: str | None) -> bytes:
        """A blocking call, as QubesdFacts' transport: the data, or
        QubesdError for an error answer."""
        if self.delay:
            time.sleep(self.delay)
        return data_of(self.answer(dest, method, arg))

    async def listen(self, handler: EventHandler) -> None:
        """One events connection: returns when it ends, raises when the
        model breaks it."""
        stream = self.model.events()
        try:
            async for event in stream:
                if event.kind is EventKind.LOST:
                    raise ConnectionResetError(event.detail or "broken")
                subject, name, kwargs = qubesd_event(event)
                handler(subject, name, kwargs)
        finally:
            await stream.aclose()

    # -- the wire format --

    def answer(self, dest: str, method: str, arg: str | None) -> bytes:
        """The raw answer of one call."""
        self.calls[method] += 1
        if method == "admin.vm.List" and dest == "dom0" and not arg:
            return _ok("".join(_list_line(info) for info in self._all()))
        info = self.model.peek(dest)
        if info is None:
            return _error("QubesVMNotFoundError", "No such domain: %s", dest)
        handler = _METHODS.get(method)
        if handler is None:
            return _error("QubesException", "unsupported method %s", method)
        return handler(info, arg or "")

    def _all(self) -> list[QubeInfo]:
        return [info for info in (self.model.peek(name)
                                  for name in self.model.names()) if info]

    # -- the socket --

    async def start(self, path: str | os.PathLike) -> None:
        self._server = UnixServer(path, self._serve, mode=0o600)
        await self._server.start()

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()

    async def _serve(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        try:
            header = (await reader.readuntil(b"\0"))[:-1].decode("ascii")
            await reader.read()  # the payload, unused by these calls
            method_arg, _source, _kind, dest = header.split(" ")
            method, _, arg = method_arg.partition("+")
            if method == "admin.Events":
                await self._events(writer)
                return
            async with self._lock:  # qubesd serves one call at a time
                if self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(self.answer(dest, method, arg or None))
            await writer.drain()
        except (ValueError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _events(self, writer: asyncio.StreamWriter) -> None:
        self.calls["admin.Events"] += 1
        stream = self.model.events()
        try:
            async for event in stream:
                if event.kind is EventKind.LOST:  # the connection breaks
                    if self.cut_mid_event:
                        writer.write(b"1\0work\0domain-sta")
                        await writer.drain()
                    return
                subject, name, kwargs = qubesd_event(event)
                writer.write(_event_frame(subject, name, kwargs))
                await writer.drain()
        finally:
            await stream.aclose()


def qubesd_event(event: QubeEvent) -> tuple[str | None, str,
                                            Mapping[str, str]]:
    """(subject, qubesd's event name, kwargs) of a model event."""
    if event.kind is EventKind.FEATURE:
        return event.qube, f"domain-feature-set:{event.detail}", {
            "feature": event.detail}
    subject = event.qube or None
    return subject, _EVENT_NAMES[event.kind], {}


def data_of(untrusted_answer: bytes) -> bytes:
    """The data of an answer, QubesdError for an error answer (the client
    side of the format above, for the in-process calls)."""
    if untrusted_answer[:2] == b"0\0":
        return untrusted_answer[2:]
    if untrusted_answer[:2] == b"2\0":
        fields = untrusted_answer[2:].split(b"\0")
        kind, fmt, args = fields[0], fields[2], fields[3:-1]
        message = fmt.decode() % tuple(a.decode() for a in args) \
            if args else fmt.decode()
        raise QubesdError(kind.decode(), message)
    raise QubesdError("QubesDaemonCommunicationError",
                      "invalid response format")


def _ok(text: str) -> bytes:
    return b"0\0" + text.encode("ascii")


def _error(kind: str, fmt: str, *args: str) -> bytes:
    return ("2\0" + kind + "\0\0" + fmt + "\0"
            + "".join(a + "\0" for a in args)).encode("ascii")


def _event_frame(subject: str | None, name: str,
                 kwargs: Mapping[str, str]) -> bytes:
    fields = [subject or "", name]
    for key, value in kwargs.items():
        fields += [key, value]
    return ("1\0" + "".join(f + "\0" for f in fields) + "\0").encode()


def _list_line(info: QubeInfo) -> str:
    return f"{info.name} class={info.klass} state={info.power.value}\n"


def _properties(info: QubeInfo) -> dict[str, tuple[str, str]]:
    props = {name: ("str", "x") for name in _OTHER_PROPERTIES}
    props.update(name=("str", info.name), klass=("str", info.klass))
    if info.klass != "AdminVM":
        props.update(xid=("int", str(info.xid)),
                     start_time=("str", info.start and f"{_seconds(info)}"),
                     virt_mode=("str", info.virt_mode))
    return props


def _seconds(info: QubeInfo) -> str:
    """The model's run id as qubesd's start_time (seconds.centiseconds)."""
    digits = "".join(c for c in info.start if c.isdigit()) or "0"
    return f"{1700000000 + int(digits)}.00"


def _get_all(info: QubeInfo, _arg: str) -> bytes:
    return _ok("".join(f"{name} default=False type={kind} {value}\n"
                       for name, (kind, value)
                       in sorted(_properties(info).items())))


def _get(info: QubeInfo, arg: str) -> bytes:
    props = _properties(info)
    if arg not in props:
        return _error("QubesNoSuchPropertyError", "Invalid property %s", arg)
    kind, value = props[arg]
    return _ok(f"default=False type={kind} {value}")


def _feature_get(info: QubeInfo, arg: str) -> bytes:
    if arg not in info.features:
        return _error("QubesFeatureNotFoundError", "%s", arg)
    return _ok(info.features[arg])


_METHODS = {
    "admin.vm.List": lambda info, _a: _ok(_list_line(info)),
    "admin.vm.property.GetAll": _get_all,
    "admin.vm.property.Get": _get,
    "admin.vm.feature.List": lambda info, _a: _ok(
        "".join(f"{k}\n" for k in sorted(info.features))),
    "admin.vm.feature.Get": _feature_get,
    "admin.vm.tag.List": lambda info, _a: _ok(
        "".join(f"{t}\n" for t in sorted(info.tags))),
    "admin.vm.CurrentState": lambda info, _a: _ok(
        f"mem=0 mem_static_max=0 cputime=0 power_state={info.power.value}"),
}


@contextlib.asynccontextmanager
async def served(model: MemoryQubes, path: str | os.PathLike, *,
                 delay: float = 0.0):
    """A stand-in qubesd on ``path`` for the duration of the block."""
    qubesd = StandInQubesd(model, delay=delay)
    await qubesd.start(path)
    try:
        yield qubesd
    finally:
        await qubesd.close()


def main(argv=None) -> int:
    """``python -m qubes_gpu_share.simsys.qubesd SOCKET MODEL [--delay S]``:
    serve the model file's qubes (following its starts and shutdowns, as
    the broker's memory facts do) until SIGTERM."""
    import argparse
    import signal
    parser = argparse.ArgumentParser(
        prog="python -m qubes_gpu_share.simsys.qubesd",
        description="A stand-in qubesd (Admin API wire format) over a "
                    "simulated system's qubes.json, for tests and benchmarks.")
    parser.add_argument("socket", help="where to listen")
    parser.add_argument("model", help="the qubes.json of the simulation")
    parser.add_argument("--delay", type=float, default=0.0,
                        help="seconds each call takes (qubesd's cost)")
    options = parser.parse_args(argv)

    async def serve() -> None:
        model = MemoryQubes.from_file(options.model)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        follower = loop.create_task(model.follow_file(options.model))
        async with served(model, options.socket, delay=options.delay):
            await stop.wait()
        follower.cancel()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

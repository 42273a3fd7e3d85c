"""Qubes facts from qubesd, through Qubes' own qubesadmin library (dom0).

The only module of the package that imports qubesadmin: it exists only in
dom0 (python3-qubesadmin), so nothing else may need it to import. Every
qubesadmin error becomes an answer of the seam: an unknown qube is None, a
missing feature is absent, anything else qubesd says is one
:class:`~.facts.QubesFactsError` line, never a crash of the broker.

Facts are read fresh from qubesd on each query (the event dispatcher runs
with its cache off): a lease decision must not rest on a stale cache if the
event stream was ever closed or lagging.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from typing import IO, Any

import qubesadmin
import qubesadmin.events
import qubesadmin.exc

from .facts import (QubesFacts, QubesFactsError, QueuedEventStream,
                    ServiceCallError)
from .info import ADMIN_VM, EventKind, QubeEvent, QubeInfo, ServiceResult

#: Only features this service reads are fetched (one qubesd call each).
_FEATURE_PREFIXES = ("gpu-share", "service.gpu-share")
_READ_CHUNK = 65536

DispatcherFactory = Callable[..., qubesadmin.events.EventsDispatcher]


class AdminQubes(QubesFacts):
    """Facts about qubes as qubesd tells them, for the dom0 broker."""

    def __init__(self, app: Any = None,
                 dispatcher_factory: DispatcherFactory =
                 qubesadmin.events.EventsDispatcher):
        self.app = app if app is not None else qubesadmin.Qubes()
        self._dispatcher_factory = dispatcher_factory

    def qube(self, name: str) -> QubeInfo | None:
        try:
            return _describe(self.app.domains[name])
        except KeyError:  # includes QubesVMNotFoundError: gone meanwhile
            return None
        except (qubesadmin.exc.QubesException, OSError) as err:
            raise QubesFactsError(
                f"qubesd could not describe qube {name}: "
                f"{_one_line(err)}") from None

    def events(self) -> QueuedEventStream:
        """Start/shutdown events (call from within the running loop)."""
        dispatcher = self._dispatcher_factory(self.app, enable_cache=False)
        task = asyncio.get_running_loop().create_task(
            dispatcher.listen_for_events())
        stream = QueuedEventStream(task.cancel)

        def handler(subject: Any, event: str, **_kwargs: str) -> None:
            stream.push(QubeEvent(EventKind(event), str(subject)))

        for kind in EventKind:
            dispatcher.add_handler(kind.value, handler)
        return stream

    async def _call_service(self, qube: str, service: str, payload: bytes,
                            max_output: int) -> ServiceResult:
        loop = asyncio.get_running_loop()
        proc = await loop.run_in_executor(None, self._start_service,
                                          qube, service)
        done = False
        try:
            writing = loop.run_in_executor(None, _write_all, proc.stdin,
                                           payload)
            output = await loop.run_in_executor(None, _read_bounded,
                                                proc.stdout, max_output + 1)
            if len(output) > max_output:
                proc.stdout.close()  # it gets EPIPE instead of blocking
            await writing
            status = await loop.run_in_executor(None, proc.wait)
            done = True
        finally:
            if not done:  # cancelled (timeout) or failed: stop the call
                proc.kill()
        return ServiceResult(status, output)

    def _start_service(self, qube: str, service: str) -> subprocess.Popen:
        """vm.run_service, never starting a halted qube (blocking)."""
        try:
            return self.app.domains[qube].run_service(
                service, autostart=False, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        except KeyError:
            raise ServiceCallError(f"no qube {qube}") from None
        except qubesadmin.exc.QubesVMNotRunningError:
            raise ServiceCallError(f"qube {qube} is not running") from None
        except (qubesadmin.exc.QubesException, OSError) as err:
            raise ServiceCallError(f"cannot call {service} in {qube}: "
                                   f"{_one_line(err)}") from None


def _describe(vm: Any) -> QubeInfo:
    """One snapshot from qubesd (raises what qubesadmin raises)."""
    klass = vm.klass
    if klass == ADMIN_VM:  # dom0: domain 0, PV, no virt_mode property
        running, xid, virt_mode = True, 0, "pv"
    else:
        running = vm.is_running()
        xid = int(vm.xid) if running else -1  # the mock's xid is a str
        virt_mode = str(vm.virt_mode)
    return QubeInfo(name=vm.name, klass=klass, running=running, xid=xid,
                    virt_mode=virt_mode, features=_features(vm),
                    tags=frozenset(vm.tags))


def _features(vm: Any) -> dict[str, str]:
    features = {}
    for key in vm.features.keys():
        if key.startswith(_FEATURE_PREFIXES):
            value = vm.features.get(key)  # None: removed since the listing
            if value is not None:
                features[key] = value
    return features


def _write_all(stream: IO[bytes], payload: bytes) -> None:
    try:
        stream.write(payload)
        stream.close()
    except BrokenPipeError:  # the service ended without reading it all
        pass


def _read_bounded(stream: IO[bytes], limit: int) -> bytes:
    """Read until EOF or ``limit`` bytes, whichever comes first."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = stream.read(min(_READ_CHUNK, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:200]

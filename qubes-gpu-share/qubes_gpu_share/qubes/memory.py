"""Qubes facts from an in-memory model (tests and the demo).

The model is loaded from a small JSON file, e.g.::

    {"qubes": [
      {"name": "sys-gpu", "running": true, "virt_mode": "hvm",
       "services": ["gpu-share-provider"]},
      {"name": "work", "running": true, "xid": 7, "virt_mode": "pvh",
       "services": ["gpu-share"], "features": {"gpu-share-quota-leases": "4"},
       "tags": ["gpu"]}
    ]}

Keys per qube: name (required), running, power, xid, virt_mode, klass,
services, features, tags; nothing else. ``power`` is one of qubesd's power
states (default Running or Halted, by ``running``). dom0 is always present
(AdminVM, running, xid 0, PV) and may be listed to give it features.
Qubes with a domain but no xid get the next free one, as Xen hands them
out (counting up, never reusing an id it gave before unless told to);
halted qubes have -1. Every start is a new run (a new ``start`` value).
Service calls go to the ``service_handler`` given at construction (the
simulated qrexec router).

The simulation starts and shuts down qubes by rewriting the file;
:meth:`MemoryQubes.follow_file` (run by the broker when its facts come from
``memory:FILE``) turns each changed ``running`` into the model's own start
or stop, which emit the events Qubes would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ..limits import SERVICE_FEATURE_PREFIX
from ..names import DOM0, parse_qube_name
from .facts import (QubesFacts, QubesFactsError, QueuedEventStream,
                    ServiceCallError)
from ..qubeinfo import (ADMIN_VM, EventKind, PowerState, QubeEvent, QubeInfo,
                   ServiceResult)

#: (qube, "SERVICE+ARG", payload) -> (exit status, output)
ServiceHandler = Callable[[str, str, bytes], Awaitable[tuple[int, bytes]]]

_KEYS = frozenset({"name", "running", "power", "xid", "virt_mode", "klass",
                   "services", "features", "tags"})
_MAX_FILE = 1 << 20

log = logging.getLogger(__name__)


async def _no_services(qube: str, service: str, payload: bytes):
    raise ServiceCallError(f"no qrexec router: cannot call {service} "
                           f"in {qube}")


class MemoryQubes(QubesFacts):
    """A mutable model of qubes: add, start, stop, set features; and the
    failures of qubesd a test needs: an events connection that breaks
    (events meanwhile are lost, as they are for a real listener) and
    queries that fail."""

    def __init__(self, service_handler: ServiceHandler = _no_services):
        self._qubes: dict[str, QubeInfo] = {}
        self._streams: set[QueuedEventStream] = set()
        self._next_xid = itertools.count(1)
        self._runs = itertools.count(1)
        self._service_handler = service_handler
        #: why the events connection is down; None while it is up
        self._events_broken: str | None = None
        #: set: every query raises QubesFactsError with this text
        self.query_error: str | None = None
        self.queries = 0
        self.add(QubeInfo(DOM0, ADMIN_VM, PowerState.RUNNING, 0, "pv"))

    @classmethod
    def from_file(cls, path: str, **kwargs: Any) -> MemoryQubes:
        """Load a model written as in the module docstring."""
        return cls.from_dict(_read_file(path), **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **kwargs: Any) -> MemoryQubes:
        model = cls(**kwargs)
        for entry in _entries(data):
            model.add(_qube_from_dict(entry, model))
        return model

    def add(self, info: QubeInfo) -> None:
        """Create or replace a qube (no event: Qubes sends none either)."""
        parse_qube_name(info.name)
        self._qubes[info.name] = info

    def remove(self, name: str) -> None:
        del self._qubes[name]

    def new_xid(self) -> int:
        used = {q.xid for q in self._qubes.values()}
        return next(x for x in self._next_xid if x not in used)

    def new_run(self) -> str:
        """A start value no earlier run had (qubesd's start_time)."""
        return f"run-{next(self._runs)}"

    def start(self, name: str, xid: int | None = None) -> None:
        """Start a halted qube with domain id *xid* (default: a fresh one);
        emits domain-start. An *xid* another qube's domain holds is refused,
        as Xen refuses it."""
        info = self._qubes[name]
        if info.domain is not None:
            raise ValueError(f"qube {name} is already running")
        if xid is not None and any(q.xid == xid for q in self._qubes.values()):
            raise ValueError(f"domain id {xid} is in use")
        self._replace(info, power=PowerState.RUNNING,
                      xid=self.new_xid() if xid is None else xid,
                      start=self.new_run())
        self._emit(EventKind.START, name)

    def stop(self, name: str) -> None:
        """Shut a qube down; emits domain-pre-shutdown, domain-shutdown."""
        info = self._qubes[name]
        if info.domain is None or info.is_dom0:
            raise ValueError(f"qube {name} is not running or is dom0")
        self._emit(EventKind.PRE_SHUTDOWN, name)
        self._replace(info, power=PowerState.HALTED, xid=-1, start="")
        self._emit(EventKind.SHUTDOWN, name)

    def set_power(self, name: str, power: PowerState) -> None:
        """Put a qube in ``power`` without an event (a crash, a pause, or
        qubesd losing track: NA); a state without a domain drops its xid."""
        info = self._qubes[name]
        if power is PowerState.HALTED:
            self._replace(info, power=power, xid=-1, start="")
        else:
            self._replace(info, power=power)

    def break_events(self, why: str = "connection reset") -> None:
        """The events connection breaks: listeners get connection-lost,
        then nothing (events meanwhile are lost) until restore_events."""
        for stream in list(self._streams):
            stream.push(QubeEvent(EventKind.LOST, detail=why))
        self._events_broken = why

    def restore_events(self) -> None:
        """The connection is back: listeners get connection-established."""
        self._events_broken = None
        for stream in list(self._streams):
            stream.push(QubeEvent(EventKind.CONNECTED))

    def set_feature(self, name: str, feature: str, value: str | None) -> None:
        """Set (or with None, delete) one feature of a qube; emits
        domain-feature-set (qubesd sends -delete for a deletion: the same
        to a listener that only drops what it cached)."""
        info = self._qubes[name]
        features = dict(info.features)
        if value is None:
            features.pop(feature, None)
        else:
            features[feature] = value
        self._replace(info, features=features)
        self._emit(EventKind.FEATURE, name, feature)

    def qube(self, name: str) -> QubeInfo | None:
        self.queries += 1
        if self.query_error is not None:
            raise QubesFactsError(self.query_error)
        return self._qubes.get(name)

    def names(self) -> list[str]:
        """Every qube of the model (tests and the stand-in qubesd)."""
        return list(self._qubes)

    def peek(self, name: str) -> QubeInfo | None:
        """The model's own view of a qube (tests): no query, no failure."""
        return self._qubes.get(name)

    async def follow_file(self, path: str | os.PathLike,
                          interval: float = 0.05) -> None:
        """Apply qube starts and shutdowns written to the model file at
        *path* (see :meth:`apply_file`), until cancelled. Polls the file's
        inode and mtime: the simulation replaces it atomically, so each
        write is a new inode (two writes within one clock tick share an
        mtime), and inotify would be one more dependency for a test seam."""
        seen = None
        while True:
            try:
                status = os.stat(path)
                stamp = (status.st_ino, status.st_mtime_ns)
                if stamp != seen:
                    seen = stamp
                    self.apply_file(path)
            except (OSError, ValueError) as exc:
                log.warning("cannot follow %s: %s", path, exc)
            await asyncio.sleep(interval)

    def apply_file(self, path: str | os.PathLike) -> None:
        """Start or stop the qubes whose ``running`` differs in the file;
        a started qube takes the file's domain id (the one its simulated
        agent uses). Other changes (new qubes, features) are not followed.
        The whole file is checked before anything changes."""
        entries = [_qube_from_dict(entry, self)
                   for entry in _entries(_read_file(path))]
        for entry in entries:
            info = self._qubes.get(entry.name)
            if info is None or info.is_dom0 or \
                    (info.domain is None) == (entry.domain is None):
                continue
            if entry.domain is not None:
                self.start(info.name, entry.xid)
            else:
                self.stop(info.name)
            log.info("qube %s %s (from %s)", info.name,
                     "shut down" if entry.domain is None else "started",
                     path)

    def events(self) -> QueuedEventStream:
        stream = QueuedEventStream(lambda: self._streams.discard(stream))
        self._streams.add(stream)
        if self._events_broken is None:
            stream.push(QubeEvent(EventKind.CONNECTED))
        return stream

    async def _call_service(self, qube: str, service: str, payload: bytes,
                            max_output: int) -> ServiceResult:
        info = self._qubes.get(qube)
        if info is None or info.domain is None:
            raise ServiceCallError(f"qube {qube} is not running")
        status, output = await self._service_handler(qube, service, payload)
        return ServiceResult(status, output[:max_output + 1])

    def _replace(self, info: QubeInfo, **changes: Any) -> None:
        self._qubes[info.name] = dataclasses.replace(info, **changes)

    def _emit(self, kind: EventKind, name: str, detail: str = "") -> None:
        if self._events_broken is not None:
            return  # nobody hears it: lost, as on a broken connection
        for stream in list(self._streams):
            stream.push(QubeEvent(kind, name, detail))


def _read_file(path: str | os.PathLike) -> Any:
    """The model file's JSON, read bounded."""
    with open(path, "rb") as file:
        data = file.read(_MAX_FILE + 1)
    if len(data) > _MAX_FILE:
        raise ValueError(f"{path}: larger than {_MAX_FILE} bytes")
    return json.loads(data)


def _entries(data: Any) -> list:
    """The qube entries of a model, ValueError when it is not one."""
    if not isinstance(data, Mapping) or set(data) != {"qubes"} \
            or not isinstance(data["qubes"], list):
        raise ValueError('model must be {"qubes": [...]}')
    return data["qubes"]


def _qube_from_dict(entry: Any, model: MemoryQubes) -> QubeInfo:
    """One qube of the model file, checked strictly."""
    if not isinstance(entry, Mapping) or "name" not in entry \
            or not set(entry) <= _KEYS:
        raise ValueError(f"qube entry must be an object with a name and only "
                         f"{sorted(_KEYS)}: {str(entry)[:80]}")
    name = entry["name"]
    running = _typed(entry, "running", bool, name == DOM0)
    power = PowerState.of(_typed(
        entry, "power", str, "Running" if running else "Halted"))
    features = dict(_typed(entry, "features", dict, {}))
    services = _typed(entry, "services", list, [])
    tags = _typed(entry, "tags", list, [])
    if not all(isinstance(v, str)
               for v in [*features.values(), *services, *tags]):
        raise ValueError(f"qube {name}: services, feature values and tags "
                         f"must be strings")
    features.update((SERVICE_FEATURE_PREFIX + s, "1") for s in services)
    if running != (power is PowerState.RUNNING) and "power" in entry \
            and "running" in entry:
        raise ValueError(f"qube {name}: power {power.value} contradicts "
                         f"running={running}")
    has_domain = power is not PowerState.HALTED
    default_xid = (0 if name == DOM0 else model.new_xid()) if has_domain \
        else -1
    xid = _typed(entry, "xid", int, default_xid)
    if (xid >= 0) != has_domain:
        raise ValueError(f"qube {name}: xid {xid} contradicts power "
                         f"{power.value} (halted qubes have xid -1)")
    return QubeInfo(
        name=name,
        klass=_typed(entry, "klass", str, ADMIN_VM if name == DOM0
                     else "AppVM"),
        power=power,
        xid=xid,
        start=model.new_run() if has_domain else "",
        virt_mode=_typed(entry, "virt_mode", str,
                         "pv" if name == DOM0 else "pvh"),
        features=features,
        tags=frozenset(tags))


def _typed(entry: Mapping[str, Any], key: str, kind: type, default: Any):
    value = entry.get(key, default)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"qube {entry['name']}: {key} must be "
                         f"{kind.__name__}")
    return value

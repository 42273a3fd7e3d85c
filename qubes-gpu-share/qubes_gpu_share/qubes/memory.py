"""Qubes facts from an in-memory model (tests and the demo).

The model is loaded from a small JSON file, e.g.::

    {"qubes": [
      {"name": "sys-gpu", "running": true, "virt_mode": "hvm",
       "services": ["gpu-share-provider"]},
      {"name": "work", "running": true, "xid": 7, "virt_mode": "pvh",
       "services": ["gpu-share"], "features": {"gpu-share-quota-leases": "4"},
       "tags": ["gpu"]}
    ]}

Keys per qube: name (required), running, xid, virt_mode, klass, services,
features, tags; nothing else. dom0 is always present (AdminVM, running,
xid 0, PV) and may be listed to give it features. Running qubes without an
xid get the next free one, as Xen hands them out; halted qubes have -1.
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
from .facts import QubesFacts, QueuedEventStream, ServiceCallError
from .info import ADMIN_VM, EventKind, QubeEvent, QubeInfo, ServiceResult

#: (qube, "SERVICE+ARG", payload) -> (exit status, output)
ServiceHandler = Callable[[str, str, bytes], Awaitable[tuple[int, bytes]]]

_KEYS = frozenset({"name", "running", "xid", "virt_mode", "klass",
                   "services", "features", "tags"})
_MAX_FILE = 1 << 20

log = logging.getLogger(__name__)


async def _no_services(qube: str, service: str, payload: bytes):
    raise ServiceCallError(f"no qrexec router: cannot call {service} "
                           f"in {qube}")


class MemoryQubes(QubesFacts):
    """A mutable model of qubes: add, start, stop, set features."""

    def __init__(self, service_handler: ServiceHandler = _no_services):
        self._qubes: dict[str, QubeInfo] = {}
        self._streams: set[QueuedEventStream] = set()
        self._next_xid = itertools.count(1)
        self._service_handler = service_handler
        self.add(QubeInfo(DOM0, ADMIN_VM, True, 0, "pv"))

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

    def start(self, name: str, xid: int | None = None) -> None:
        """Start a halted qube with domain id *xid* (default: a fresh one);
        emits domain-start."""
        info = self._qubes[name]
        if info.running:
            raise ValueError(f"qube {name} is already running")
        self._replace(info, running=True,
                      xid=self.new_xid() if xid is None else xid)
        self._emit(EventKind.START, name)

    def stop(self, name: str) -> None:
        """Shut a qube down; emits domain-pre-shutdown, domain-shutdown."""
        info = self._qubes[name]
        if not info.running or info.is_dom0:
            raise ValueError(f"qube {name} is not running or is dom0")
        self._emit(EventKind.PRE_SHUTDOWN, name)
        self._replace(info, running=False, xid=-1)
        self._emit(EventKind.SHUTDOWN, name)

    def set_feature(self, name: str, feature: str, value: str | None) -> None:
        """Set (or with None, delete) one feature of a qube."""
        info = self._qubes[name]
        features = dict(info.features)
        if value is None:
            features.pop(feature, None)
        else:
            features[feature] = value
        self._replace(info, features=features)

    def qube(self, name: str) -> QubeInfo | None:
        return self._qubes.get(name)

    async def follow_file(self, path: str | os.PathLike,
                          interval: float = 0.05) -> None:
        """Apply qube starts and shutdowns written to the model file at
        *path* (see :meth:`apply_file`), until cancelled. Polls the file's
        mtime: the simulation replaces it atomically, and inotify would be
        one more dependency for a test seam."""
        seen = None
        while True:
            try:
                stamp = os.stat(path).st_mtime_ns
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
            if info is None or info.is_dom0 or info.running == entry.running:
                continue
            if entry.running:
                self.start(info.name, entry.xid)
            else:
                self.stop(info.name)
            log.info("qube %s %s (from %s)", info.name,
                     "started" if entry.running else "shut down", path)

    def events(self) -> QueuedEventStream:
        stream = QueuedEventStream(lambda: self._streams.discard(stream))
        self._streams.add(stream)
        return stream

    async def _call_service(self, qube: str, service: str, payload: bytes,
                            max_output: int) -> ServiceResult:
        info = self._qubes.get(qube)
        if info is None or not info.running:
            raise ServiceCallError(f"qube {qube} is not running")
        status, output = await self._service_handler(qube, service, payload)
        return ServiceResult(status, output[:max_output + 1])

    def _replace(self, info: QubeInfo, **changes: Any) -> None:
        self._qubes[info.name] = dataclasses.replace(info, **changes)

    def _emit(self, kind: EventKind, name: str) -> None:
        for stream in list(self._streams):
            stream.push(QubeEvent(kind, name))


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
    features = dict(_typed(entry, "features", dict, {}))
    services = _typed(entry, "services", list, [])
    tags = _typed(entry, "tags", list, [])
    if not all(isinstance(v, str)
               for v in [*features.values(), *services, *tags]):
        raise ValueError(f"qube {name}: services, feature values and tags "
                         f"must be strings")
    features.update((SERVICE_FEATURE_PREFIX + s, "1") for s in services)
    default_xid = (0 if name == DOM0 else model.new_xid()) if running else -1
    xid = _typed(entry, "xid", int, default_xid)
    if (xid >= 0) != running:
        raise ValueError(f"qube {name}: xid {xid} contradicts running="
                         f"{running} (halted qubes have xid -1)")
    return QubeInfo(
        name=name,
        klass=_typed(entry, "klass", str, ADMIN_VM if name == DOM0
                     else "AppVM"),
        running=running,
        xid=xid,
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

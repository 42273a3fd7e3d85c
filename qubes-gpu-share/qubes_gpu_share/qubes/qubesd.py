"""Facts from qubesd's Admin API, kept current by qubesd's events.

qubesd is one Python process that every Qubes tool shares; each Admin API
call is a round trip to it. So the broker reads a qube once (its class and
power state, its properties, its gpu-share features, its tags: 4 calls and
one per such feature), keeps that snapshot, and drops it when qubesd says
something about the qube changed (any ``domain-*`` or ``property-*`` event
with that subject). Only while the events connection is up: after a break
nothing cached is trusted, and every read goes to qubesd again until the
connection is back (``connection-established`` clears everything). What a
grant must not get wrong, the domain id and run of each side, is read
fresh at grant time with one call per qube (:meth:`current_domain`);
decisions about the same qube at once share reads that started after they
asked (:mod:`.freshreads`).

Blocking calls run on a small pool of their own (never asyncio's default
executor, which other work shares): a slow qubesd delays the decisions that
wait for it, never the event loop.

This module speaks qubesd's answers, not its transport: it is given a
blocking ``call(dest, method, arg) -> data`` and a ``listen(handler)``
coroutine (one events connection). In dom0 both come from qubesadmin
(:mod:`.admin`); tests and the benchmark use the project's stand-in qubesd
(:mod:`qubes_gpu_share.simsys.qubesd`). Answers are parsed strictly: qubesd
is trusted, but a parser that guesses would turn a format change into a
wrong decision.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import threading
from collections.abc import Awaitable, Callable, Mapping

from ..names import DOM0, InvalidName, parse_qube_name
from .facts import (QubesFacts, QubesFactsError, QueuedEventStream,
                    ServiceCallError)
from .freshreads import FreshReads
from ..qubeinfo import (ADMIN_VM, VIRT_MODES, Domain, EventKind, PowerState,
                   QubeEvent, QubeInfo, ServiceResult)

log = logging.getLogger(__name__)

#: (dest, method, arg) -> the answer's data; raises QubesdError for an
#: error answer and QubesFactsError when qubesd cannot be reached.
Call = Callable[[str, str, "str | None"], bytes]
#: subject (None for the system), event name, its keyword arguments
EventHandler = Callable[["str | None", str, Mapping[str, str]], None]
#: one events connection: returns when qubesd ended it, raises when it broke
Listen = Callable[[EventHandler], Awaitable[None]]

#: (qube, "SERVICE+ARG", payload) -> (exit status, output)
ServiceHandler = Callable[[str, str, bytes], Awaitable[tuple[int, bytes]]]

#: Only features this service reads are fetched (one call each).
FEATURE_PREFIXES = ("gpu-share", "service.gpu-share")
#: qubesd's blocking calls at once (the broker's reads; qubesd serialises
#: its own work anyway, more would only queue there).
WORKERS = 4
#: events connection: first wait before reconnecting, longest wait
RECONNECT = 0.5
RECONNECT_MAX = 30.0
_KINDS = {"domain-start": EventKind.START,
          "domain-pre-shutdown": EventKind.PRE_SHUTDOWN,
          "domain-shutdown": EventKind.SHUTDOWN}
_MAX_ANSWER = 1 << 20
_PROPERTY = re.compile(rb"([a-z_][a-z0-9_]{0,63}) default=(True|False) "
                       rb"type=([a-z]{1,16})(?: (.*))?")
_START_TIME = re.compile(r"[0-9]{1,20}(\.[0-9]{1,9})?")
_ESCAPED = re.compile(r"\\(.)")


class QubesdError(QubesFactsError):
    """qubesd answered with an error: ``kind`` is its exception's name."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"qubesd: {kind}: {message}")
        self.kind = kind


class BadAnswer(QubesFactsError):
    """An answer this module cannot read (one line)."""


# -- parsing qubesd's answers (pure) -----------------------------------------

def parse_list_entry(untrusted_data: bytes, name: str) -> tuple[str, PowerState]:
    """``admin.vm.List`` to one qube: a line ``NAME class=KLASS
    state=STATE ...`` (to dom0, qubesd lists every qube: dom0's line)."""
    lines = [line.split(" ") for line in _ascii(untrusted_data).split("\n")
             if line.startswith(name + " ")]
    if len(lines) != 1:
        raise BadAnswer(f"admin.vm.List for {name}: {len(lines)} lines for "
                        f"it")
    words = lines[0]
    fields = dict(word.partition("=")[::2] for word in words[1:])
    if "class" not in fields or "state" not in fields:
        raise BadAnswer(f"admin.vm.List for {name}: unexpected answer "
                        f"{' '.join(words)[:80]!r}")
    klass = fields["class"]
    if not klass.isidentifier():
        raise BadAnswer(f"admin.vm.List for {name}: bad class {klass[:40]!r}")
    return klass, PowerState.of(fields["state"])


def parse_properties(untrusted_data: bytes) -> dict[str, str]:
    """``admin.vm.property.GetAll``: ``NAME default=B type=T VALUE`` per
    line, with backslash and newline escaped in VALUE."""
    if len(untrusted_data) > _MAX_ANSWER:
        raise BadAnswer("admin.vm.property.GetAll: answer too long")
    properties = {}
    for line in untrusted_data.split(b"\n"):
        if not line:
            continue
        match = _PROPERTY.fullmatch(line)
        if match is None:
            raise BadAnswer(f"admin.vm.property.GetAll: unexpected line "
                            f"{line[:60]!r}")
        value = _unescape(_ascii(match.group(4) or b""))
        properties[match.group(1).decode()] = value
    return properties


def parse_names(untrusted_data: bytes) -> list[str]:
    """One name per line (feature.List, tag.List)."""
    names = _ascii(untrusted_data).split("\n")
    return [name for name in names if name]


def domain_of(properties: Mapping[str, str], power: PowerState,
              klass: str) -> tuple[int, str]:
    """(xid, start) from a qube's properties; dom0 is always domain 0."""
    if klass == ADMIN_VM:
        return 0, ""
    if power is PowerState.HALTED:
        return -1, ""
    try:
        xid = int(properties.get("xid", "-1"), 10)
    except ValueError:
        raise BadAnswer(f"xid {properties.get('xid', '')[:20]!r} is not a "
                        f"number") from None
    start = properties.get("start_time", "")
    if start and not _START_TIME.fullmatch(start):
        raise BadAnswer(f"start_time {start[:40]!r} is not a time")
    return max(xid, -1), start


def _ascii(data: bytes) -> str:
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise BadAnswer("qubesd answered with non-ASCII bytes") from None


def _unescape(value: str) -> str:
    if "\\" not in value:  # most values: nothing escaped
        return value
    return _ESCAPED.sub(lambda m: "\n" if m.group(1) == "n"
                        else m.group(1), value)


# -- the snapshots -----------------------------------------------------------

class Snapshots:
    """Per-qube snapshots, trusted only while the events connection is up.

    Every change of knowledge bumps a counter (per qube, and for the whole
    cache on (re)connection and loss), so that a read that started before
    an invalidation never stores what it read (it may be older than the
    event)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._infos: dict[str, QubeInfo | None] = {}
        self._versions: dict[str, int] = {}
        self._generation = 0
        self.trusted = False

    def get(self, name: str) -> tuple[bool, QubeInfo | None]:
        """(hit, snapshot); a miss while untrusted too."""
        with self._lock:
            if self.trusted and name in self._infos:
                return True, self._infos[name]
            return False, None

    def token(self, name: str) -> tuple[int, int]:
        with self._lock:
            return self._generation, self._versions.get(name, 0)

    def put(self, name: str, info: QubeInfo | None,
            token: tuple[int, int]) -> None:
        with self._lock:
            if self.trusted and token == (self._generation,
                                          self._versions.get(name, 0)):
                self._infos[name] = info

    def forget(self, name: str) -> None:
        with self._lock:
            self._infos.pop(name, None)
            self._versions[name] = self._versions.get(name, 0) + 1

    def reset(self, *, trusted: bool) -> None:
        """Forget everything: connected (trusted) or lost (not)."""
        with self._lock:
            self._infos.clear()
            self._versions.clear()
            self._generation += 1
            self.trusted = trusted

    def __len__(self) -> int:
        return len(self._infos)


def touched(subject: str | None, event: str,
            kwargs: Mapping[str, str]) -> str | None:
    """The qube whose snapshot an event makes stale, if any."""
    if subject and event.startswith(("domain-", "property-")):
        return subject
    if subject is None and event in ("domain-add", "domain-delete"):
        return kwargs.get("vm")
    return None


# -- the facts -------------------------------------------------------------

class QubesdFacts(QubesFacts):
    """The Qubes-facts seam over qubesd's Admin API and events."""

    def __init__(self, call: Call, listen: Listen, *, workers: int = WORKERS,
                 service_handler: ServiceHandler | None = None):
        self._call = call
        self._listen = listen
        self._service_handler = service_handler
        self._pool = concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix="qubesd")
        self.snapshots = Snapshots()
        self._calls_lock = threading.Lock()
        #: qubesd round trips made so far (the benchmark reports them)
        self.calls = 0
        #: concurrent decisions about one qube share reads (freshreads.py)
        self._reads: FreshReads[str, QubeInfo | None] = \
            FreshReads(self._read_qube)
        self._domains: FreshReads[str, Domain | None] = \
            FreshReads(self._read_domain)

    # -- reads --

    def qube(self, name: str) -> QubeInfo | None:
        """A full read from qubesd (blocking): 4 calls (2 for dom0) and
        one per gpu-share feature; None when no such qube exists."""
        try:
            parse_qube_name(name)
            if name == DOM0:  # always running, domain 0, PV (no List:
                # to dom0 it lists every qube)
                klass, power, properties = ADMIN_VM, PowerState.RUNNING, {}
            else:
                klass, power = parse_list_entry(
                    self._ask(name, "admin.vm.List"), name)
                properties = parse_properties(
                    self._ask(name, "admin.vm.property.GetAll"))
            features = self._features(name)
            tags = parse_names(self._ask(name, "admin.vm.tag.List"))
        except QubesdError as exc:
            if exc.kind == "QubesVMNotFoundError":
                return None
            raise
        except InvalidName:
            return None
        xid, start = domain_of(properties, power, klass)
        virt_mode = properties.get("virt_mode", "pv")
        if klass == ADMIN_VM or virt_mode not in VIRT_MODES:
            virt_mode = "pv" if klass == ADMIN_VM else virt_mode
        return QubeInfo(name=name, klass=klass, power=power, xid=xid,
                        virt_mode=virt_mode, features=features,
                        tags=frozenset(tags), start=start)

    async def describe(self, name: str) -> QubeInfo | None:
        hit, info = self.snapshots.get(name)
        if hit:
            return info
        return await self._reads.get(name)

    async def current_domain(self, name: str) -> Domain | None:
        """The qube's domain now, from one call (GetAll: xid and
        start_time) that started after this one; concurrent callers about
        the same qube share it."""
        if name == DOM0:
            return Domain(0)
        return await self._domains.get(name)

    async def _read_qube(self, name: str) -> QubeInfo | None:
        token = self.snapshots.token(name)
        info = await asyncio.get_running_loop().run_in_executor(
            self._pool, self.qube, name)
        self.snapshots.put(name, info, token)
        return info

    async def _read_domain(self, name: str) -> Domain | None:
        data = await asyncio.get_running_loop().run_in_executor(
            self._pool, self._ask, name, "admin.vm.property.GetAll")
        xid, start = domain_of(parse_properties(data), PowerState.RUNNING,
                               "")
        return Domain(xid, start) if xid >= 0 else None

    def _features(self, name: str) -> dict[str, str]:
        features = {}
        for key in parse_names(self._ask(name, "admin.vm.feature.List")):
            if not key.startswith(FEATURE_PREFIXES):
                continue
            try:
                features[key] = _ascii(
                    self._ask(name, "admin.vm.feature.Get", key))
            except QubesdError as exc:
                if exc.kind != "QubesFeatureNotFoundError":
                    raise  # (not found: removed since the listing)
        return features

    def _ask(self, dest: str, method: str, arg: str | None = None) -> bytes:
        with self._calls_lock:
            self.calls += 1
        return self._call(dest, method, arg)

    # -- events --

    def events(self) -> QueuedEventStream:
        """Start/shutdown events and the connection's state; reconnects
        with backoff for as long as the stream is open."""
        task: asyncio.Task | None = None
        stream = QueuedEventStream(lambda: task.cancel() if task else None)
        task = asyncio.get_running_loop().create_task(self._follow(stream))
        task.add_done_callback(lambda t: _ended(t, stream))
        return stream

    async def _follow(self, stream: QueuedEventStream) -> None:
        delay = [RECONNECT]

        def handler(subject: str | None, event: str,
                    kwargs: Mapping[str, str]) -> None:
            if event == "connection-established":
                self.snapshots.reset(trusted=True)
                delay[0] = RECONNECT
                stream.push(QubeEvent(EventKind.CONNECTED))
                return
            qube = touched(subject, event, kwargs)
            if qube is not None:
                self.snapshots.forget(qube)
            if event in _KINDS and subject:
                stream.push(QubeEvent(_KINDS[event], subject))

        while True:
            try:
                await self._listen(handler)
                why = "qubesd ended the events connection"
                if _cancelling():  # (qubesadmin's loop swallows it)
                    raise asyncio.CancelledError
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # pylint: disable=broad-except
                # a break in the middle of an event included (qubesadmin
                # lets IncompleteReadError out of its own reconnect loop)
                why = f"{type(exc).__name__}: {exc}" if str(exc) \
                    else type(exc).__name__
            self.snapshots.reset(trusted=False)
            if stream.connected:
                stream.push(QubeEvent(EventKind.LOST, detail=why[:200]))
            log.warning("qubes events: %s; reconnecting in %g s", why[:200],
                        delay[0])
            await asyncio.sleep(delay[0])
            delay[0] = min(delay[0] * 2, RECONNECT_MAX)

    async def _call_service(self, qube: str, service: str, payload: bytes,
                            max_output: int) -> ServiceResult:
        """Through ``service_handler`` (the simulated router); in dom0,
        :mod:`.admin` runs qrexec-client instead."""
        if self._service_handler is None:
            raise ServiceCallError(f"no way to call {service} in {qube}")
        status, output = await self._service_handler(qube, service, payload)
        return ServiceResult(status, output[:max_output + 1])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _cancelling() -> bool:
    """Whether the current task is being cancelled (Python 3.11+)."""
    task = asyncio.current_task()
    return bool(task is not None and getattr(task, "cancelling",
                                             lambda: 0)())


def _ended(task: asyncio.Task, stream: QueuedEventStream) -> None:
    """The follower stopped: unless the stream was closed, by a bug or
    someone else's cancellation; the stream ends (the broker stops and is
    restarted) instead of waiting for events forever."""
    if not task.cancelled() and task.exception() is not None:
        log.error("qubes events follower stopped: %r", task.exception())
    stream.end()

"""The audit trail in the journal: one line per decision of the broker.

An admin must be able to answer "who got which buffer from whom, and why
was that refused": every line names both qubes, the lease id (``-`` when
none was made), the pages and the reason; every refusal a qube gets has
its line (services.py writes it where the refusal is answered, with the
service and the caller). The registry keeps the same history per lease for
a bounded time (``qvm-gpu-share show``); the journal is the long-term,
time-ordered view across all leases.

Three things make the trail hold against a qube that floods or lies:

* Lines are ``EVENT key=value ...`` words. Qube names and lease ids are
  validated before they get here; anything else a qube wrote (a provider's
  error text in a reason) is quoted and escaped (:func:`quote`), so it
  cannot forge a ``consumer=`` of its own.
* In the journal the lines carry the identifier ``qubes-gpu-share-audit``
  (``journalctl -t qubes-gpu-share-audit``) and fields
  (``journalctl GPU_SHARE_CONSUMER=work``), through journald's native
  socket (:class:`JournalHandler`); elsewhere they go to stderr.
* journald drops a flooding service's lines without saying whose, so the
  broker limits each qube itself (:class:`PerQubeLimit`): a qube's lines
  beyond its burst in a window are counted, not written, and one line says
  what was dropped ("work: 1234 audit lines suppressed in 10 s (refused
  1234)"). Other qubes' lines are never dropped for it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import re
import socket
import time
from collections.abc import Callable

from ..lease import Lease

log = logging.getLogger("qubes_gpu_share.audit")

IDENTIFIER = "qubes-gpu-share-audit"
JOURNAL_SOCKET = "/run/systemd/journal/socket"
#: A qube's lines per window before its lines are counted instead: 100 a
#: second on average, above what a busy honest qube writes (leases are
#: long-lived buffers; even one lease per frame at 30 frames a second is
#: 90 lines a second), while journald (the unit's LogRateLimitBurst=10000
#: per 10 s) still takes ten qubes writing at this rate.
BURST = 1000
WINDOW = 10.0

_BARE = re.compile(r"-|[A-Za-z0-9][A-Za-z0-9_.:+/-]{0,63}")


def quote(value: object) -> str:
    """A field value as one word: bare when it is a plain token, else in
    double quotes with backslash, quote and anything unprintable escaped.
    A quoted value never ends early, so nothing inside it reads as a
    field of its own."""
    text = str(value)
    if _BARE.fullmatch(text):
        return text
    text = text[:400]
    if text.isascii() and text.isprintable() and '"' not in text \
            and "\\" not in text:
        return f'"{text}"'  # nothing to escape (the usual reason)
    escaped = "".join(
        "\\\\" if c == "\\" else '\\"' if c == '"'
        else c if " " <= c <= "~" else f"\\x{ord(c) & 0xff:02x}"
        for c in text)
    return f'"{escaped}"'


class PerQubeLimit:
    """At most ``burst`` lines per qube per ``window`` seconds; the rest
    are counted by event and reported once the window is over."""

    def __init__(self, burst: int = BURST, window: float = WINDOW,
                 clock: Callable[[], float] = time.monotonic):
        self.burst, self.window, self._clock = burst, window, clock
        self._windows: dict[str, tuple[float, int]] = {}
        self._dropped: dict[str, collections.Counter[str]] = {}
        self._lines = 0

    def allow(self, qube: str, event: str) -> bool:
        """Whether this line of ``qube`` is written; False: counted."""
        self._lines += 1
        if self._lines % 1000 == 0:
            self.forget_idle()
        now = self._clock()
        start, count = self._windows.get(qube, (now, 0))
        if now - start >= self.window:
            self.report(qube)
            start, count = now, 0
        self._windows[qube] = (start, count + 1)
        if count < self.burst:
            return True
        dropped = self._dropped.setdefault(qube, collections.Counter())
        if not dropped:
            _report_later(self, qube, start + self.window - now)
        dropped[event] += 1
        return False

    def report(self, qube: str) -> None:
        """Say what was dropped of ``qube``'s lines (once per window)."""
        dropped = self._dropped.pop(qube, None)
        if dropped:
            log.warning("%s: %d audit lines suppressed in %g s (%s)", qube,
                        sum(dropped.values()), self.window,
                        ", ".join(f"{event} {count}" for event, count
                                  in sorted(dropped.items())),
                        extra={"fields": {"GPU_SHARE_QUBE": qube,
                                          "GPU_SHARE_EVENT": "suppressed"}})

    def forget_idle(self) -> None:
        """Drop the windows that ended (bounded memory: one entry per
        qube that wrote in the last window)."""
        now = self._clock()
        for qube, (start, _count) in list(self._windows.items()):
            if now - start >= self.window:
                self.report(qube)
                del self._windows[qube]


def _report_later(limit: PerQubeLimit, qube: str, delay: float) -> None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return  # no loop: reported at the qube's next line
    loop.call_later(max(delay, 0.0), limit.report, qube)


#: the broker's limiter (one per process)
LIMIT = PerQubeLimit()


def decision(event: str, *, reason: str, consumer: str = "-",
             provider: str = "-", pages: int = 0, lease_id: str = "-",
             charged: str | None = None) -> None:
    """Log one decision: ``event`` is a word like granted, refused, active,
    released, revoked, expired, failed, busy. ``-`` (or 0 pages) stands for
    what a refusal came before knowing (a malformed request names no
    lease). ``charged``: the qube whose rate limit the line counts against
    (default the consumer, else the provider)."""
    qube = charged or (consumer if consumer != "-" else provider)
    if not LIMIT.allow(qube, event):
        return
    fields = {"GPU_SHARE_EVENT": event, "GPU_SHARE_LEASE": lease_id,
              "GPU_SHARE_CONSUMER": consumer, "GPU_SHARE_PROVIDER": provider,
              "GPU_SHARE_PAGES": str(pages), "GPU_SHARE_QUBE": qube}
    log.info("%s lease=%s consumer=%s provider=%s pages=%d reason=%s",
             event, quote(lease_id), quote(consumer), quote(provider), pages,
             quote(reason), extra={"fields": fields})


def lease_fields(lease: Lease) -> dict:
    """:func:`decision`'s keywords for ``lease``."""
    return dict(lease_id=lease.id, consumer=lease.consumer,
                provider=lease.provider, pages=lease.pages)


def lease_event(event: str, lease: Lease, reason: str) -> None:
    """Log one decision about ``lease``."""
    decision(event, reason=reason, **lease_fields(lease))


class JournalHandler(logging.Handler):
    """Writes records to journald's native socket with the audit
    identifier and the record's ``fields`` (no dependency: the protocol is
    KEY=VALUE lines in one datagram)."""

    def __init__(self, path: str = JOURNAL_SOCKET):
        super().__init__()
        self._path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def emit(self, record: logging.LogRecord) -> None:
        fields = {"MESSAGE": self.format(record),
                  "PRIORITY": str(_priority(record.levelno)),
                  "SYSLOG_IDENTIFIER": IDENTIFIER,
                  **getattr(record, "fields", {})}
        data = "".join(f"{key}={_journal_value(value)}\n"
                       for key, value in fields.items()).encode()
        try:
            self._sock.sendto(data, self._path)
        except OSError:
            self.handleError(record)

    def close(self) -> None:
        self._sock.close()
        super().close()


def to_journal(path: str = JOURNAL_SOCKET) -> bool:
    """Send the audit lines to the journal when it is there (systemd sets
    JOURNAL_STREAM for the unit); True when it does."""
    if not (os.environ.get("JOURNAL_STREAM") and os.path.exists(path)):
        return False
    handler = JournalHandler(path)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.propagate = False
    return True


def _priority(levelno: int) -> int:
    return 4 if levelno >= logging.WARNING else 6


def _journal_value(value: object) -> str:
    """A field value for journald's native protocol, where a newline ends
    the field. Not :func:`..oneline.one_line`: the value is kept whole
    (an audit line runs past 200 characters, its reason already escaped
    by :func:`quote`), only the newline that would end it early goes."""
    return str(value).replace("\n", " ")

"""The lease registry: SQLite in dom0, the only writer of lease state.

Nothing may be lost across a broker crash (DESIGN.md, lease registry): a
lease the broker told anyone about must still be found after a restart, in
the state it was in, so that reconciliation can finish what was in flight.
Hence WAL with ``synchronous=FULL`` (every commit is fsync'd before it
returns) and one transaction per change.

A change is validated by the pure state machine in :mod:`.lease` inside the
transaction that writes it; an illegal change raises and the transaction is
rolled back. :meth:`Registry.apply` takes a *batch* of changes (of one lease
or of many, e.g. from concurrent requests) and commits them together: each is
validated against the state the previous ones left, and the batch is all or
nothing. One fsync then covers the whole batch, which is what lets the broker
run several lease cycles per commit without weakening durability: nothing in
a batch is reported done before the batch committed.

See docs/registry.md for the schema and the reasons behind it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Union

from . import lease as lease_mod
from .formats import BufferMeta, Plane, ReceiveMode
from .lease import Initiator, Lease, State

DEFAULT_PATH = "/var/lib/qubes-gpu-share/leases.db"
#: SQLite's automatic checkpoint, in pages (its default), and the size the
#: WAL is truncated to after a checkpoint (docs/registry.md).
WAL_CHECKPOINT_PAGES = 1000
WAL_LIMIT_BYTES = 4 << 20

#: Schema migrations, in order: migration N (1-based) brings the database
#: from user_version N-1 to N. Append, never edit a released one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE leases (
        id TEXT PRIMARY KEY CHECK (length(id) = 32),
        consumer TEXT NOT NULL,
        provider TEXT NOT NULL,
        consumer_domid INTEGER NOT NULL,
        provider_domid INTEGER NOT NULL,
        mode TEXT NOT NULL CHECK (mode IN ('cpu', 'dmabuf')),
        initiator TEXT NOT NULL CHECK (initiator IN ('lease', 'offer')),
        pages INTEGER NOT NULL CHECK (pages BETWEEN 1 AND 65535),
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        fourcc TEXT NOT NULL,
        modifier INTEGER NOT NULL,
        planes TEXT NOT NULL,
        refs BLOB NOT NULL,
        ttl INTEGER NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        deadline REAL NOT NULL,
        state TEXT NOT NULL,
        reason TEXT NOT NULL
    );
    CREATE INDEX leases_consumer ON leases (consumer, state, pages);
    CREATE INDEX leases_provider ON leases (provider, state, pages);
    CREATE INDEX leases_state ON leases (state, deadline);
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        lease_id TEXT NOT NULL REFERENCES leases (id),
        time REAL NOT NULL,
        old_state TEXT,
        new_state TEXT NOT NULL,
        reason TEXT NOT NULL
    );
    CREATE INDEX events_lease ON events (lease_id, seq);
    """,
    # 2: what each qube holds, kept beside the leases so that admission reads
    # one row instead of summing every live lease of a busy provider. The
    # live states are written out (those of version 2); the registry keeps
    # the rows in the transaction of every change that enters or leaves
    # them, and check_usage() compares them with the sums.
    """
    CREATE TABLE usage (
        qube TEXT NOT NULL,
        side TEXT NOT NULL CHECK (side IN ('consumer', 'provider')),
        leases INTEGER NOT NULL CHECK (leases >= 0),
        pages INTEGER NOT NULL CHECK (pages >= 0),
        PRIMARY KEY (qube, side)
    ) WITHOUT ROWID;
    INSERT INTO usage (qube, side, leases, pages)
        SELECT consumer, 'consumer', count(*), sum(pages) FROM leases
        WHERE state IN ('active', 'exporting', 'releasing', 'requested',
                        'revoking')
        GROUP BY consumer;
    INSERT INTO usage (qube, side, leases, pages)
        SELECT provider, 'provider', count(*), sum(pages) FROM leases
        WHERE state IN ('active', 'exporting', 'releasing', 'requested',
                        'revoking')
        GROUP BY provider;
    """,
    # 3: the run of each side's domain (a domain id alone can be reused),
    # the leases bound to a domain id (to end them when another domain
    # gets it), and when a lease ended (ended leases are kept for a
    # bounded time and count, then deleted with their events). Ended
    # leases keep no refs.
    """
    ALTER TABLE leases ADD COLUMN consumer_start TEXT NOT NULL DEFAULT '';
    ALTER TABLE leases ADD COLUMN provider_start TEXT NOT NULL DEFAULT '';
    ALTER TABLE leases ADD COLUMN ended REAL;
    UPDATE leases SET ended = updated, refs = x''
        WHERE state IN ('expired', 'failed', 'released', 'revoked');
    CREATE INDEX leases_consumer_domid ON leases (consumer_domid, state);
    CREATE INDEX leases_provider_domid ON leases (provider_domid, state);
    CREATE INDEX leases_ended ON leases (ended) WHERE ended IS NOT NULL;
    """,
]

_LIVE = tuple(sorted(s.value for s in lease_mod.LIVE))
_IN_FLIGHT = tuple(sorted(s.value for s in lease_mod.IN_FLIGHT))
_EXPIRABLE = tuple(sorted(s.value for s in lease_mod.EXPIRABLE))


def _in(values: Sequence[str]) -> str:
    """An SQL ``IN (...)`` list of constants (our own enum values only)."""
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


#: Every query the broker runs, by name, so that a test can check with
#: EXPLAIN QUERY PLAN that each one is served by an index.
QUERIES: dict[str, str] = {
    "get": "SELECT * FROM leases WHERE id = ?",
    "usage": "SELECT leases, pages FROM usage WHERE qube = ? AND side = ?",
    "usage_summed":
        "SELECT consumer, 'consumer', count(*), sum(pages) FROM leases "
        f"WHERE state IN {_in(_LIVE)} GROUP BY consumer "
        "UNION ALL "
        "SELECT provider, 'provider', count(*), sum(pages) FROM leases "
        f"WHERE state IN {_in(_LIVE)} GROUP BY provider",
    "live_of_qube":
        f"SELECT * FROM leases WHERE consumer = ? AND state IN {_in(_LIVE)} "
        "UNION ALL "  # a lease never has the same qube on both sides
        f"SELECT * FROM leases WHERE provider = ? AND state IN {_in(_LIVE)}",
    "past_deadline":
        f"SELECT * FROM leases WHERE state IN {_in(_EXPIRABLE)} "
        "AND deadline <= ? ORDER BY deadline",
    "in_flight":
        f"SELECT * FROM leases WHERE state IN {_in(_IN_FLIGHT)}",
    "history":
        "SELECT time, old_state, new_state, reason FROM events "
        "WHERE lease_id = ? ORDER BY seq",
    # what a consumer holds of offers and of one provider: its own live
    # leases only (bounded by its quotas), through leases_consumer
    "consumer_share":
        "SELECT coalesce(sum(initiator = 'offer'), 0), "
        "coalesce(sum(CASE WHEN initiator = 'offer' THEN pages END), 0), "
        "coalesce(sum(CASE WHEN provider = ? THEN pages END), 0) "
        f"FROM leases WHERE consumer = ? AND state IN {_in(_LIVE)}",
    "live_on_domid":
        f"SELECT * FROM leases WHERE consumer_domid = ? "
        f"AND state IN {_in(_LIVE)} "
        "UNION ALL "
        f"SELECT * FROM leases WHERE provider_domid = ? "
        f"AND state IN {_in(_LIVE)}",
    "ended_oldest":
        "SELECT id, ended FROM leases WHERE ended IS NOT NULL "
        "ORDER BY ended LIMIT ?",
    "ended_count":
        "SELECT count(*) FROM leases WHERE ended IS NOT NULL",
    # one index probe per expirable state (min over an IN list would scan)
    "next_deadline":
        "SELECT min(d) FROM ("
        + " UNION ALL ".join(
            f"SELECT min(deadline) AS d FROM leases WHERE state = '{state}'"
            for state in _EXPIRABLE) + ")",
}

_INSERT_LEASE = (
    "INSERT INTO leases (id, consumer, provider, consumer_domid, "
    "provider_domid, mode, initiator, pages, width, height, fourcc, modifier, "
    "planes, refs, ttl, created, updated, deadline, state, reason, "
    "consumer_start, provider_start) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
#: refs: set once (active), emptied at the end (the grants are gone)
_UPDATE_LEASE = (
    "UPDATE leases SET state = ?, reason = ?, updated = ?, "
    "refs = coalesce(?, refs), ended = ? "
    "WHERE id = ?")
_DELETE_EVENTS = "DELETE FROM events WHERE lease_id = ?"
_DELETE_LEASE = "DELETE FROM leases WHERE id = ?"
_CHARGE_USAGE = (
    "INSERT INTO usage (qube, side, leases, pages) VALUES (?, ?, 1, ?) "
    "ON CONFLICT (qube, side) DO UPDATE SET "
    "leases = leases + 1, pages = pages + excluded.pages")
# (a separate statement: the CHECKs would refuse a negative row to insert)
_GIVE_BACK_USAGE = (
    "UPDATE usage SET leases = leases - 1, pages = pages - ? "
    "WHERE qube = ? AND side = ?")
_INSERT_EVENT = (
    "INSERT INTO events (lease_id, time, old_state, new_state, reason) "
    "VALUES (?, ?, ?, ?, ?)")


class RegistryError(Exception):
    """The database cannot be used (e.g. written by a newer version)."""


class UnknownLease(KeyError):
    """No lease with this id."""


@dataclasses.dataclass(frozen=True)
class Create:
    """A batch item: record a new lease (in its initial state)."""

    lease: Lease


@dataclasses.dataclass(frozen=True)
class Transition:
    """A batch item: move a lease to ``state`` (``refs`` when it becomes active)."""

    lease_id: str
    state: State
    reason: str
    refs: tuple[int, ...] = ()


#: One item of a batch given to :meth:`Registry.apply`.
Change = Union[Create, Transition]


@dataclasses.dataclass(frozen=True)
class Event:
    """One line of a lease's audit trail."""

    time: float
    old_state: State | None
    new_state: State
    reason: str


def pack_refs(refs: Sequence[int]) -> bytes:
    """Grant refs as little-endian u32, the compact form stored."""
    return struct.pack(f"<{len(refs)}I", *refs)


def unpack_refs(blob: bytes) -> tuple[int, ...]:
    return struct.unpack(f"<{len(blob) // 4}I", blob)


def pack_planes(planes: Iterable[Plane]) -> str:
    """Planes in one canonical text: ``stride:offset`` joined by ``,``."""
    return ",".join(f"{p.stride}:{p.offset}" for p in planes)


def unpack_planes(text: str) -> tuple[Plane, ...]:
    return tuple(Plane(*map(int, item.split(":")))
                 for item in text.split(","))


def _lease_row(lease: Lease) -> tuple:
    meta = lease.meta
    return (lease.id, lease.consumer, lease.provider, lease.consumer_domid,
            lease.provider_domid, lease.mode.value, lease.initiator.value,
            meta.pages, meta.width, meta.height, meta.fourcc, meta.modifier,
            pack_planes(meta.planes), pack_refs(lease.refs), lease.ttl,
            lease.created, lease.updated, lease.deadline, lease.state.value,
            lease.reason, lease.consumer_start, lease.provider_start)


def _lease_from_row(row: sqlite3.Row) -> Lease:
    meta = BufferMeta(pages=row["pages"], width=row["width"],
                      height=row["height"], fourcc=row["fourcc"],
                      modifier=row["modifier"],
                      planes=unpack_planes(row["planes"]))
    return Lease(id=row["id"], consumer=row["consumer"],
                 provider=row["provider"],
                 consumer_domid=row["consumer_domid"],
                 provider_domid=row["provider_domid"],
                 mode=ReceiveMode(row["mode"]), initiator=Initiator(row["initiator"]),
                 meta=meta, ttl=row["ttl"], created=row["created"],
                 updated=row["updated"], deadline=row["deadline"],
                 state=State(row["state"]), refs=unpack_refs(row["refs"]),
                 reason=row["reason"], consumer_start=row["consumer_start"],
                 provider_start=row["provider_start"])


def migrate(conn: sqlite3.Connection,
            migrations: Sequence[str] | None = None) -> None:
    """Bring the schema to the newest version, one transaction per step.

    A step that fails is rolled back with its version bump, so the database
    stays at the last version that was completely applied.
    """
    migrations = MIGRATIONS if migrations is None else migrations
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(migrations):
        raise RegistryError(f"lease database has schema version {version}, "
                            f"newer than this program's {len(migrations)}")
    for number in range(version + 1, len(migrations) + 1):
        with _transaction(conn):
            for statement in _statements(migrations[number - 1]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number:d}")


def _statements(script: str) -> Iterator[str]:
    """Split a migration into statements (executescript would commit)."""
    for statement in script.split(";"):
        if statement.strip():
            yield statement


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE .. COMMIT, rolled back on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class Registry:
    """The lease database.

    One instance per process; the broker is the only writer. ``clock`` gives
    the time recorded with every change (injectable for tests).
    """

    def __init__(self, path: str = DEFAULT_PATH, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a
        # transaction is exactly what _transaction() says, nothing implicit.
        # Two connections: writes (on groupcommit's writer thread) and
        # reads (on the event loop); in WAL a read never waits for a commit.
        self._conn = sqlite3.connect(path, isolation_level=None,
                                     check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise RegistryError(f"cannot use WAL for {path} (got {mode})")
        self._conn.execute("PRAGMA synchronous = FULL")
        self._conn.execute("PRAGMA foreign_keys = ON")
        self._conn.execute("PRAGMA busy_timeout = 5000")
        # The WAL is checkpointed every WAL_CHECKPOINT_PAGES (SQLite's
        # automatic checkpoint) and cut back to WAL_LIMIT_BYTES after each
        # one; without the limit it keeps its largest size forever.
        self._conn.execute(f"PRAGMA wal_autocheckpoint = "
                           f"{WAL_CHECKPOINT_PAGES:d}")
        self._conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES:d}")
        migrate(self._conn)
        self._read = sqlite3.connect(path, isolation_level=None,
                                     check_same_thread=False)
        self._read.row_factory = sqlite3.Row
        self._read.execute("PRAGMA busy_timeout = 5000")

    def close(self) -> None:
        self._read.close()
        self._conn.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- writing ---------------------------------------------------------

    def apply(self, changes: Sequence[Change]) -> list[Lease]:
        """Apply a batch of changes in one transaction, all or nothing.

        Returns the lease as each change left it. Raises (and changes
        nothing) if any change is illegal: unknown lease, duplicate id,
        a transition the state machine refuses.
        """
        now = self._clock()
        with _transaction(self._conn):
            return [self._apply_one(change, now) for change in changes]

    def create(self, lease: Lease) -> Lease:
        """Record a new lease (one transaction)."""
        return self.apply([Create(lease)])[0]

    def transition(self, lease_id: str, state: State, reason: str,
                   refs: Sequence[int] = ()) -> Lease:
        """Move one lease to ``state`` (one transaction)."""
        return self.apply([Transition(lease_id, state, reason,
                                      tuple(refs))])[0]

    def _apply_one(self, change: Change, now: float) -> Lease:
        if isinstance(change, Create):
            return self._insert(change.lease)
        old = self._get(change.lease_id)
        new = lease_mod.advance(old, change.state, reason=change.reason,
                                now=now, refs=change.refs)
        final = new.state in lease_mod.FINAL
        refs = pack_refs(new.refs) if new.state == State.ACTIVE or final \
            else None
        self._conn.execute(_UPDATE_LEASE, (new.state.value, new.reason,
                                           new.updated, refs,
                                           now if final else None, new.id))
        self._event(new.id, now, old.state, new.state, new.reason)
        if old.live != new.live:
            self._charge(new, 1 if new.live else -1)
        return new

    def _insert(self, lease: Lease) -> Lease:
        if lease.state != lease_mod.INITIAL:
            raise lease_mod.IllegalTransition(
                f"a new lease must start as {lease_mod.INITIAL.value}")
        try:
            self._conn.execute(_INSERT_LEASE, _lease_row(lease))
        except sqlite3.IntegrityError:
            raise lease_mod.InvalidLease(
                f"lease {lease.id} already exists") from None
        self._event(lease.id, lease.created, None, lease.state, lease.reason)
        self._charge(lease, 1)
        return lease

    def _charge(self, lease: Lease, sign: int) -> None:
        """Charge (sign 1) or give back (-1) what a lease holds, both sides,
        in the transaction that moves it into or out of a live state."""
        sides = ((lease.consumer, "consumer"), (lease.provider, "provider"))
        if sign > 0:
            self._conn.executemany(_CHARGE_USAGE, (
                (qube, side, lease.pages) for qube, side in sides))
        else:
            self._conn.executemany(_GIVE_BACK_USAGE, (
                (lease.pages, qube, side) for qube, side in sides))

    def _event(self, lease_id: str, now: float, old: State | None,
               new: State, reason: str) -> None:
        self._conn.execute(_INSERT_EVENT, (
            lease_id, now, old.value if old else None, new.value, reason))

    # -- reading ---------------------------------------------------------

    def _get(self, lease_id: str, conn: sqlite3.Connection | None = None
             ) -> Lease:
        row = (conn or self._conn).execute(QUERIES["get"],
                                           (lease_id,)).fetchone()
        if row is None:
            raise UnknownLease(lease_id)
        return _lease_from_row(row)

    def get(self, lease_id: str) -> Lease:
        """The lease with this id; :class:`UnknownLease` if there is none."""
        return self._get(lease_id, self._read)

    def _select(self, sql: str, params: Sequence = ()) -> list[Lease]:
        return [_lease_from_row(row)
                for row in self._read.execute(sql, params)]

    def leases(self, *, consumer: str | None = None,
             provider: str | None = None, state: State | None = None,
             live_only: bool = False) -> list[Lease]:
        """Leases matching every filter given, oldest first."""
        sql, params = leases_query(consumer=consumer, provider=provider,
                                 state=state, live_only=live_only)
        return self._select(sql, params)

    def live_of_qube(self, qube: str) -> list[Lease]:
        """Live leases in which ``qube`` is consumer or provider."""
        return self._select(QUERIES["live_of_qube"], (qube, qube))

    def _usage(self, qube: str, side: str) -> tuple[int, int]:
        row = self._read.execute(QUERIES["usage"], (qube, side)).fetchone()
        return (row[0], row[1]) if row else (0, 0)

    def consumer_usage(self, consumer: str) -> tuple[int, int]:
        """(live leases, pages) charged to a consumer's quota: one row of
        the usage table, whatever the number of live leases."""
        return self._usage(consumer, "consumer")

    def consumer_share(self, consumer: str, provider: str
                       ) -> tuple[int, int, int]:
        """(offered leases, their pages, pages held of ``provider``) of a
        consumer's live leases."""
        row = self._read.execute(QUERIES["consumer_share"],
                                 (provider, consumer)).fetchone()
        return row[0], row[1], row[2]

    def provider_pages(self, provider: str) -> int:
        """Pages charged to a provider's budget (revoking ones included)."""
        return self._usage(provider, "provider")[1]

    def check_usage(self) -> list[str]:
        """Where the usage table disagrees with the sums over live leases
        (one line each; empty when it is right). Reads every live lease:
        for tests, the crash test and diagnosis, not for admission."""
        stored = {(row[0], row[1]): (row[2], row[3]) for row in
                  self._read.execute("SELECT qube, side, leases, pages "
                                     "FROM usage")}
        summed = {(row[0], row[1]): (row[2], row[3]) for row in
                  self._read.execute(QUERIES["usage_summed"])}
        return [f"{side} {qube}: usage table {stored.get((qube, side))}, "
                f"live leases {summed.get((qube, side), (0, 0))}"
                for qube, side in sorted(stored.keys() | summed.keys())
                if stored.get((qube, side), (0, 0))
                != summed.get((qube, side), (0, 0))]

    def live_on_domid(self, domid: int) -> list[Lease]:
        """Live leases with a side bound to domain id ``domid``."""
        return self._select(QUERIES["live_on_domid"], (domid, domid))

    def ended_count(self) -> int:
        """How many ended leases are kept (history, for ``show``)."""
        return self._read.execute(QUERIES["ended_count"]).fetchone()[0]

    def prune(self, now: float, *, keep_seconds: float, keep_leases: int,
              batch: int = 1000) -> int:
        """Forget ended leases with their events: those that ended more
        than ``keep_seconds`` ago, and the oldest beyond the newest
        ``keep_leases``; at most ``batch`` in one transaction (the caller
        calls again while it returns ``batch``). Returns how many.

        The registry must not grow with the number of leases ever made: a
        qube looping lease/release would fill dom0's disk. The journal
        keeps the long-term trail (broker/audit.py)."""
        cutoff = now - keep_seconds
        with _transaction(self._conn):
            excess = self._conn.execute(
                QUERIES["ended_count"]).fetchone()[0] - keep_leases
            ids = []
            for row in self._conn.execute(QUERIES["ended_oldest"], (batch,)):
                if len(ids) >= excess and row[1] >= cutoff:
                    break  # oldest first: the rest are kept too
                ids.append((row[0],))
            self._conn.executemany(_DELETE_EVENTS, ids)
            self._conn.executemany(_DELETE_LEASE, ids)
        return len(ids)

    def next_deadline(self) -> float | None:
        """The nearest deadline of an expirable lease (None: none), from
        the index: the expiry timer never reads the leases themselves."""
        return self._read.execute(QUERIES["next_deadline"]).fetchone()[0]

    def past_deadline(self, now: float) -> list[Lease]:
        """Leases whose TTL ran out and that are not already ending."""
        return self._select(QUERIES["past_deadline"], (now,))

    def in_flight(self) -> list[Lease]:
        """Leases a broker restart must reconcile (see lease.IN_FLIGHT)."""
        return self._select(QUERIES["in_flight"])

    def history(self, lease_id: str) -> list[Event]:
        """The audit trail of one lease, oldest first."""
        return [Event(time=row["time"],
                      old_state=State(row["old_state"])
                      if row["old_state"] else None,
                      new_state=State(row["new_state"]), reason=row["reason"])
                for row in self._read.execute(QUERIES["history"],
                                              (lease_id,))]

    def explain(self, sql: str, params: Sequence = ()) -> list[str]:
        """EXPLAIN QUERY PLAN of ``sql`` (for tests and diagnosis)."""
        return [row["detail"] for row in
                self._read.execute("EXPLAIN QUERY PLAN " + sql, params)]


def leases_query(*, consumer: str | None, provider: str | None,
               state: State | None, live_only: bool) -> tuple[str, list]:
    """The SQL and parameters of :meth:`Registry.leases` (filters are ANDed)."""
    where, params = [], []
    for column, value in (("consumer", consumer), ("provider", provider)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if state is not None:
        where.append("state = ?")
        params.append(State(state).value)
    if live_only:
        where.append(f"state IN {_in(_LIVE)}")
    sql = "SELECT * FROM leases"
    if where:
        sql += " WHERE " + " AND ".join(where)
    return sql + " ORDER BY created, id", params

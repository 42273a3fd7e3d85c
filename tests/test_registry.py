"""The lease registry (qubes_gpu_share.registry) on a real SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from qubes_gpu_share import lease, registry
from qubes_gpu_share.lease import State
from qubes_gpu_share.groupcommit import GroupCommit
from qubes_gpu_share.registry import Create, Transition
from registry_crash_child import sample_lease

S = State


@pytest.fixture
def reg(tmp_path):
    clock = iter(range(2000, 10**9))
    with registry.Registry(str(tmp_path / "leases.db"),
                           clock=lambda: float(next(clock))) as reg:
        yield reg


def _walk(reg, item, *states, refs=None):
    """Move ``item`` through ``states`` one transaction each."""
    for state in states:
        item = reg.transition(item.id, state, f"to {state.value}",
                              refs=(refs or range(8, 8 + item.pages))
                              if state == S.ACTIVE else ())
    return item


def _commits(reg):
    """Count the COMMITs the registry's connection issues."""
    statements = []
    reg._conn.set_trace_callback(statements.append)
    return lambda: sum(s.strip().upper() == "COMMIT" for s in statements)


def test_database_settings(reg, tmp_path):
    conn = reg._conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA user_version").fetchone()[0] == \
        len(registry.MIGRATIONS)


def test_round_trip_of_a_largest_lease(reg, tmp_path):
    item = sample_lease(pages=65535, initiator="offer", mode="dmabuf")
    reg.create(item)
    refs = list(range(100, 100 + 65535))
    active = _walk(reg, item, S.EXPORTING, S.ACTIVE, refs=refs)
    assert reg.get(item.id) == active and active.refs == tuple(refs)
    blob = reg._conn.execute("SELECT refs FROM leases").fetchone()[0]
    assert blob[:8] == bytes([100, 0, 0, 0, 101, 0, 0, 0])
    assert len(blob) == 4 * 65535
    reg.close()
    with registry.Registry(str(tmp_path / "leases.db")) as again:
        assert again.get(item.id) == active


def test_pull_cycle_and_history(reg):
    item = reg.create(sample_lease(now=1000.0))
    _walk(reg, item, S.EXPORTING, S.ACTIVE, S.RELEASING, S.RELEASED)
    final = reg.get(item.id)
    assert final.state == S.RELEASED and final.reason == "to released"
    # the create used the lease's own time; the registry's clock ticks on
    assert final.updated == 2004.0 and final.created == 1000.0
    history = reg.history(item.id)
    assert [(e.old_state, e.new_state) for e in history] == [
        (None, S.REQUESTED), (S.REQUESTED, S.EXPORTING),
        (S.EXPORTING, S.ACTIVE), (S.ACTIVE, S.RELEASING),
        (S.RELEASING, S.RELEASED)]
    assert [e.time for e in history] == [1000.0, 2001.0, 2002.0, 2003.0,
                                         2004.0]


def _snapshot(reg):
    return (reg._conn.execute("SELECT * FROM leases ORDER BY id").fetchall(),
            reg._conn.execute("SELECT * FROM events ORDER BY seq").fetchall())


@pytest.mark.parametrize("bad", [
    Transition("0" * 32, S.EXPORTING, "unknown lease"),
    Transition(None, S.RELEASED, "illegal"),   # id filled in below
    Transition(None, S.ACTIVE, "no refs"),
    Create(None),                              # duplicate id
])
def test_bad_change_in_a_batch_changes_nothing(reg, bad):
    existing = _walk(reg, reg.create(sample_lease()), S.EXPORTING)
    if isinstance(bad, Create):
        bad = Create(existing)
    elif bad.lease_id is None:
        bad = Transition(existing.id, bad.state, bad.reason)
    before = _snapshot(reg)
    fresh = sample_lease()
    with pytest.raises((registry.UnknownLease, lease.IllegalTransition,
                        lease.InvalidLease)):
        reg.apply([Create(fresh), Transition(fresh.id, S.EXPORTING, "x"),
                   bad])
    assert _snapshot(reg) == before
    assert reg.apply([]) == []


def test_create_must_start_in_initial_state(reg):
    item = lease.advance(sample_lease(), S.EXPORTING, reason="x", now=1.0)
    with pytest.raises(lease.IllegalTransition):
        reg.create(item)
    assert reg.leases() == []


def test_batch_of_many_leases_is_one_commit(reg):
    commits = _commits(reg)
    items = [sample_lease(consumer=f"app{i}") for i in range(10)]
    results = reg.apply(
        [Create(item) for item in items]
        + [Transition(item.id, S.EXPORTING, "grant") for item in items]
        + [Transition(item.id, S.ACTIVE, "granted", (8, 9)) for item in items])
    assert commits() == 1
    assert [r.state for r in results] == [S.REQUESTED] * 10 + \
        [S.EXPORTING] * 10 + [S.ACTIVE] * 10
    assert all(reg.get(item.id).state == S.ACTIVE for item in items)


def test_usage_counts_every_state_that_holds_budget(reg):
    def lease_in(consumer, provider, pages, *states):
        return _walk(reg, reg.create(sample_lease(
            consumer=consumer, provider=provider, pages=pages)), *states)

    lease_in("work", "sys-gpu", 1)
    lease_in("work", "sys-gpu", 2, S.EXPORTING, S.ACTIVE)
    lease_in("work", "sys-gpu", 4, S.EXPORTING, S.ACTIVE, S.REVOKING)
    lease_in("work", "sys-gpu", 8, S.EXPORTING, S.ACTIVE, S.RELEASING)
    lease_in("work", "sys-gpu", 16, S.EXPORTING, S.ACTIVE, S.RELEASING,
             S.RELEASED)
    lease_in("work", "sys-gpu", 32, S.FAILED)
    lease_in("work", "sys-gui", 64, S.EXPORTING)
    lease_in("personal", "sys-gpu", 128, S.EXPORTING, S.REVOKING)
    assert reg.consumer_usage("work") == (5, 1 + 2 + 4 + 8 + 64)
    assert reg.consumer_usage("vault") == (0, 0)
    assert reg.provider_pages("sys-gpu") == 1 + 2 + 4 + 8 + 128
    assert reg.provider_pages("sys-gui") == 64
    assert reg.check_usage() == []


def test_usage_table_follows_batches_and_refused_changes(reg):
    """A batch that creates and ends leases charges only what stays live;
    a refused batch leaves the usage as it was (same transaction)."""
    a, b = sample_lease(pages=3), sample_lease(pages=5, consumer="vault")
    reg.apply([Create(a), Create(b), Transition(a.id, S.FAILED, "no")])
    assert reg.consumer_usage("work") == (0, 0)
    assert reg.provider_pages("sys-gpu") == 5
    with pytest.raises(lease.IllegalTransition):
        reg.apply([Transition(b.id, S.FAILED, "x"),
                   Transition(b.id, S.ACTIVE, "x")])
    assert reg.consumer_usage("vault") == (1, 5)
    assert reg.check_usage() == []


def test_check_usage_finds_a_wrong_aggregate(reg):
    reg.create(sample_lease(pages=3))
    reg._conn.execute("UPDATE usage SET pages = 4 WHERE side = 'provider'")
    assert reg.check_usage() == [
        "provider sys-gpu: usage table (1, 4), live leases (1, 3)"]


_V1_COLUMNS = ("id, consumer, provider, consumer_domid, provider_domid, "
               "mode, initiator, pages, width, height, fourcc, modifier, "
               "planes, refs, ttl, created, updated, deadline, state, reason")


def _old_database(path: str, version: int, rows) -> None:
    """A database at schema ``version`` holding ``rows``: (lease, state),
    written with the columns of version 1 as a program of that time did."""
    conn = sqlite3.connect(path, isolation_level=None)
    registry.migrate(conn, registry.MIGRATIONS[:version])
    for item, state in rows:
        values = registry._lease_row(item)[:20]
        values = values[:13] + (registry.pack_refs(range(8, 8 + item.pages))
                                if state != S.REQUESTED else b"",) \
            + values[14:18] + (state.value, "old")
        conn.execute(f"INSERT INTO leases ({_V1_COLUMNS}) VALUES "
                     f"({', '.join('?' * 20)})", values)
    conn.close()


def test_migration_2_charges_the_leases_of_version_1(tmp_path):
    """A version 1 database gets a usage table equal to its sums."""
    path = str(tmp_path / "leases.db")
    items = [sample_lease(pages=n, consumer=f"app{n % 3}")
             for n in range(1, 10)]
    states = [S.FAILED, S.REVOKING] + [S.ACTIVE] * 7
    _old_database(path, 1, zip(items, states))
    with registry.Registry(path) as reg:
        assert reg.provider_pages("sys-gpu") == sum(range(2, 10))
        assert reg.consumer_usage("app2") == (3, 2 + 5 + 8)
        assert reg.check_usage() == []


def test_migration_3_ends_the_refs_of_ended_leases(tmp_path):
    """Ended leases of a version 2 database lose their refs and count as
    ended since their last change; live ones keep theirs."""
    path = str(tmp_path / "leases.db")
    items = [sample_lease(pages=2, consumer=f"app{n}") for n in range(3)]
    _old_database(path, 2, zip(items, (S.RELEASED, S.ACTIVE, S.EXPIRED)))
    with registry.Registry(path) as reg:
        released, active, expired = (reg.get(item.id) for item in items)
        assert released.refs == () and expired.refs == ()
        assert active.refs == (8, 9) and active.consumer_start == ""
        assert reg.ended_count() == 2


def test_migration_2_lists_the_live_states():
    """Migration 2 spells out the live states of its time: still lease.LIVE
    (if LIVE changes, a new migration must rebuild the usage table)."""
    for state in lease.LIVE:
        assert f"'{state.value}'" in registry.MIGRATIONS[1]
    for state in lease.FINAL:
        assert f"'{state.value}'" not in registry.MIGRATIONS[1]


def test_filters_and_queries(reg):
    a = _walk(reg, reg.create(sample_lease(consumer="work",
                                           provider="sys-gpu")),
              S.EXPORTING, S.ACTIVE)
    b = _walk(reg, reg.create(sample_lease(consumer="sys-gpu",
                                           provider="vault")), S.FAILED)
    c = _walk(reg, reg.create(sample_lease(consumer="personal",
                                           provider="sys-gpu")), S.EXPORTING)
    d = reg.create(sample_lease(consumer="personal", provider="vault"))

    def ids(leases):
        return sorted(item.id for item in leases)

    assert ids(reg.leases()) == ids([a, b, c, d])
    assert ids(reg.leases(consumer="personal")) == ids([c, d])
    assert ids(reg.leases(provider="sys-gpu", state=S.ACTIVE)) == ids([a])
    assert ids(reg.leases(provider="vault", live_only=True)) == ids([d])
    assert ids(reg.live_of_qube("sys-gpu")) == ids([a, c])
    assert ids(reg.in_flight()) == ids([c, d])


def test_past_deadline_only_for_leases_not_already_ending(reg):
    late = _walk(reg, reg.create(sample_lease(ttl=10, now=100.0)),
                 S.EXPORTING, S.ACTIVE)
    ending = _walk(reg, reg.create(sample_lease(ttl=10, now=100.0)),
                   S.EXPORTING, S.REVOKING)
    later = reg.create(sample_lease(ttl=50, now=100.0))
    assert reg.past_deadline(109.0) == []
    assert [item.id for item in reg.past_deadline(110.0)] == [late.id]
    assert {item.id for item in reg.past_deadline(200.0)} == {late.id,
                                                              later.id}
    assert ending.id not in {item.id for item in reg.past_deadline(1e9)}


def test_unknown_lease(reg):
    with pytest.raises(registry.UnknownLease):
        reg.get("f" * 32)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "leases.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {len(registry.MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(registry.RegistryError, match="newer"):
        registry.Registry(str(path))


def test_migration_path_keeps_data(tmp_path, monkeypatch):
    path = str(tmp_path / "leases.db")
    with registry.Registry(path) as old:
        item = old.create(sample_lease())
    step = "ALTER TABLE leases ADD COLUMN note TEXT; " \
        "UPDATE leases SET note = 'migrated'"
    monkeypatch.setattr(registry, "MIGRATIONS", registry.MIGRATIONS + [step])
    conn = sqlite3.connect(path, isolation_level=None)
    registry.migrate(conn, registry.MIGRATIONS)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == \
        len(registry.MIGRATIONS)
    assert conn.execute("SELECT note FROM leases").fetchall() == \
        [("migrated",)]
    conn.close()
    with registry.Registry(path) as new:       # reopening migrates no more
        assert new.get(item.id) == item


def test_failed_migration_leaves_version_and_schema(tmp_path):
    conn = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    with pytest.raises(sqlite3.OperationalError):
        registry.migrate(conn, registry.MIGRATIONS + ["CREATE TABLE leases (x)"])
    assert conn.execute("PRAGMA user_version").fetchone()[0] == \
        len(registry.MIGRATIONS)


# -- indexes -------------------------------------------------------------

QUERY_PARAMS = {
    "get": ("0" * 32,), "usage": ("app7", "consumer"), "usage_summed": (),
    "live_of_qube": ("app7", "app7"),
    "past_deadline": (1000.0,), "in_flight": (), "history": ("0" * 32,),
    "live_on_domid": (7, 7), "ended_count": (), "ended_oldest": (1000,),
    "next_deadline": (), "consumer_share": ("sys-gpu3", "app7"),
}
FILTERED_LISTS = [
    dict(consumer="app7", provider=None, state=None, live_only=False),
    dict(consumer=None, provider="sys-gpu", state=None, live_only=True),
    dict(consumer=None, provider=None, state=S.REVOKING, live_only=False),
    # (all live leases unfiltered is the whole table: a scan is right there)
]


@pytest.fixture(scope="module")
def big_registry(tmp_path_factory):
    """10,000 live leases of 100 consumers and 10 providers, mostly active."""
    path = str(tmp_path_factory.mktemp("big") / "leases.db")
    reg = registry.Registry(path)
    items = [sample_lease(consumer=f"app{i % 100}",
                          provider=f"sys-gpu{i % 10}") for i in range(10000)]
    changes = [Create(item) for item in items]
    changes += [Transition(item.id, S.EXPORTING, "x") for item in items]
    changes += [Transition(item.id, S.ACTIVE, "x", (8, 9))
                for item in items[:9000]]
    changes += [Transition(item.id, S.REVOKING, "x") for item in items[:100]]
    reg.apply(changes)
    yield reg
    reg.close()


def _assert_no_scan(plan):
    assert plan and all(not line.startswith("SCAN") for line in plan), plan


@pytest.mark.parametrize("name", sorted(registry.QUERIES))
def test_broker_queries_use_an_index_at_10000_leases(big_registry, name):
    assert set(QUERY_PARAMS) == set(registry.QUERIES)
    _assert_no_scan(big_registry.explain(registry.QUERIES[name],
                                         QUERY_PARAMS[name]))


@pytest.mark.parametrize("filters", FILTERED_LISTS)
def test_filtered_lists_use_an_index(big_registry, filters):
    _assert_no_scan(big_registry.explain(*registry.leases_query(**filters)))


def test_queries_answer_right_at_10000_leases(big_registry):
    assert big_registry.consumer_usage("app7") == (100, 200)
    assert big_registry.provider_pages("sys-gpu3") == 2000
    assert big_registry.check_usage() == []
    assert len(big_registry.in_flight()) == 1100
    assert len(big_registry.leases(state=S.REVOKING)) == 100


# -- group commit ---------------------------------------------------------

def _cycle_steps(item):
    """A whole pull cycle as the broker would make it durable: 4 commits."""
    return [[Create(item), Transition(item.id, S.EXPORTING, "ask provider")],
            [Transition(item.id, S.ACTIVE, "granted", (8, 9))],
            [Transition(item.id, S.RELEASING, "consumer let go")],
            [Transition(item.id, S.RELEASED, "provider released")]]


def test_group_commit_shares_commits_between_concurrent_requests(reg):
    group = GroupCommit(reg)
    items = [sample_lease(consumer=f"app{i}") for i in range(8)]

    async def request(item):
        for step in _cycle_steps(item):
            results = await group.apply(step)
            assert results[-1].state == step[-1].state
            assert reg.get(item.id).state == step[-1].state  # committed

    async def main():
        await asyncio.gather(*(request(item) for item in items))

    asyncio.run(main())
    assert group.commits == 4        # 8 cycles, 2 per commit
    assert {reg.get(i.id).state for i in items} == {S.RELEASED}


def test_group_commit_isolates_a_bad_request(reg):
    group = GroupCommit(reg)
    good, bad = sample_lease(), sample_lease()

    async def main():
        return await asyncio.gather(
            group.apply([Create(good)]),
            group.apply([Create(bad), Transition(bad.id, S.ACTIVE, "skip")]),
            return_exceptions=True)

    ok, refused = asyncio.run(main())
    assert ok[0].state == S.REQUESTED
    assert isinstance(refused, lease.IllegalTransition)
    assert [item.id for item in reg.leases()] == [good.id]


def test_group_commit_settles_before_anyone_else_runs(reg):
    """``settled`` runs right after the commit (or refusal) of its request,
    before any other coroutine could read the registry: a count kept in
    memory until the registry holds it is never seen twice or not at all."""
    group = GroupCommit(reg)
    good, bad = sample_lease(pages=3), sample_lease(pages=5)
    reserved = {good.id: 3, bad.id: 5}
    seen = []

    def settle(item):
        def settled():
            del reserved[item.id]
            seen.append(reg.provider_pages("sys-gpu") + sum(reserved.values()))
        return settled

    async def main():
        return await asyncio.gather(
            group.apply([Create(good)], settled=settle(good)),
            group.apply([Create(bad), Transition(bad.id, S.ACTIVE, "skip")],
                        settled=settle(bad)),
            return_exceptions=True)

    ok, refused = asyncio.run(main())
    assert ok[0].id == good.id and isinstance(refused,
                                              lease.IllegalTransition)
    assert reserved == {} and seen == [3 + 5, 3]


# -- bounded history (issue 12: a qube cycling leases must not fill dom0) --

def _cycles(reg, count: int, pages: int = 2, batch: int = 50) -> None:
    """``count`` lease/release cycles, ``batch`` cycles per transaction."""
    for start in range(0, count, batch):
        items = [sample_lease(pages=pages)
                 for _ in range(min(batch, count - start))]
        changes = [Create(item) for item in items]
        for item in items:
            changes += [Transition(item.id, S.EXPORTING, "x"),
                        Transition(item.id, S.ACTIVE, "x",
                                   tuple(range(8, 8 + pages))),
                        Transition(item.id, S.RELEASING, "x"),
                        Transition(item.id, S.RELEASED, "x")]
        reg.apply(changes)


def test_prune_keeps_the_newest_and_the_recent(reg):
    _cycles(reg, 30, batch=1)  # each cycle its own commit: its own time
    live = reg.create(sample_lease())
    assert reg.ended_count() == 30
    ended = sorted(reg.leases(state=S.RELEASED), key=lambda l: l.updated)
    # by count: the 10 newest stay, with their events
    assert reg.prune(10**9, keep_seconds=10**9, keep_leases=10) == 20
    kept = reg.leases(state=S.RELEASED)
    assert {l.id for l in kept} == {l.id for l in ended[-10:]}
    assert reg.history(ended[0].id) == [] and len(reg.history(kept[0].id)) == 5
    # by age: ended before now - keep_seconds
    newest = max(l.updated for l in kept)
    assert reg.prune(newest + 1, keep_seconds=0.5, keep_leases=100) == 10
    assert reg.ended_count() == 0 and reg.get(live.id).live
    # in batches
    _cycles(reg, 25, batch=1)
    assert reg.prune(10**9, keep_seconds=0, keep_leases=0, batch=10) == 10
    assert reg.ended_count() == 15


def _file_bytes(path: str) -> int:
    import os
    return os.path.getsize(path) if os.path.exists(path) else 0


@pytest.mark.slow
def test_database_stays_flat_under_endless_cycles(tmp_path):
    """8,192-page leases cycled with pruning: after warm-up the database
    stops growing and the WAL stays under its limit plus one transaction
    (docs/registry.md; bench/bench_registry.py measures 100,000 cycles)."""
    path = str(tmp_path / "leases.db")
    clock = iter(range(1, 10**9))
    with registry.Registry(path, clock=lambda: float(next(clock))) as reg:
        sizes, wals = [], []
        for _ in range(12):
            _cycles(reg, 250, pages=8192, batch=25)
            while reg.prune(10**9, keep_seconds=10**9, keep_leases=200) \
                    == 1000:
                pass
            sizes.append(_file_bytes(path))
            wals.append(_file_bytes(path + "-wal"))
        assert reg.ended_count() == 200
    warm = sizes[3:]
    assert max(warm) - min(warm) <= 64 * 1024, sizes
    assert max(wals) <= registry.WAL_LIMIT_BYTES + (4 << 20), wals

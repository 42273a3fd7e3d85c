"""Crash safety of the lease registry, proven by killing its writer.

A child process (registry_crash_child.py) changes lease states on a real
database file and reports each transition only after its commit returned.
The parent SIGKILLs it at random moments, then checks that the database
opens, passes SQLite's integrity check, holds every reported transition,
that every lease's history is a path of the state machine ending in the
lease's current state, and that the usage table (what each qube holds)
equals the sums over the live leases.
"""

from __future__ import annotations

import os
import pathlib
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from qubes_gpu_share import lease, registry
from qubes_gpu_share.lease import State

CHILD = pathlib.Path(__file__).with_name("registry_crash_child.py")
KILLS = 25
MIN_OPERATIONS = 500


def _run_and_kill(path: pathlib.Path, rng: random.Random) -> set[tuple]:
    """Start the child, SIGKILL it at a random point, return what it reported."""
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(path), str(rng.randrange(2**32))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reported = []
    try:
        for _ in range(rng.randint(10, 40)):
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"child died: {proc.stderr.read().decode()[-500:]}")
            reported.append(line)
        time.sleep(rng.uniform(0, 0.003))
        proc.send_signal(signal.SIGKILL)
        reported += proc.stdout.read().splitlines(keepends=True)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    # A line cut by the kill (no newline) was never fully reported.
    return {_parse(line) for line in reported if line.endswith(b"\n")}


def _parse(line: bytes) -> tuple:
    lease_id, old, new = line.decode().split()
    return lease_id, None if old == "-" else old, new


def _check_database(path: pathlib.Path, reported: set[tuple]) -> None:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        events = set(conn.execute(
            "SELECT lease_id, old_state, new_state FROM events"))
    finally:
        conn.close()
    missing = reported - events
    assert not missing, f"{len(missing)} reported transitions lost"
    with registry.Registry(str(path)) as reg:
        for item in reg.leases():
            _check_lease(item, reg.history(item.id))
        # every budget equals the sum of its live leases (issue 7)
        assert reg.check_usage() == []


def _check_lease(item: lease.Lease, history: list[registry.Event]) -> None:
    states = [event.new_state for event in history]
    lease.check_history(states)
    assert [e.old_state for e in history[1:]] == states[:-1]
    assert states[-1] == item.state
    assert item.reason == history[-1].reason
    holds_refs = states[-1] in (State.ACTIVE, State.RELEASING,
                                State.REVOKING) and State.ACTIVE in states
    assert len(item.refs) == (item.pages if holds_refs else 0)


@pytest.mark.slow
def test_sigkill_loses_no_reported_transition(tmp_path):
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    path = tmp_path / "leases.db"
    operations = 0
    started = time.monotonic()
    for _ in range(KILLS):
        reported = _run_and_kill(path, rng)
        _check_database(path, reported)
        operations += len(reported)
    elapsed = time.monotonic() - started
    print(f"\nregistry crash test: {KILLS} kills, {operations} reported "
          f"transitions, {elapsed:.1f} s")
    assert operations >= MIN_OPERATIONS

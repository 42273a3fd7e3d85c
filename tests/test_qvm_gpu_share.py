"""qvm-gpu-share against the broker's admin socket: in-process for the
commands, and once against the real daemon started from its command line."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest

from qubes_gpu_share.broker.admin import AdminApi, AdminServer
from qubes_gpu_share.cli import admin as cli
from qubes_gpu_share.formats import BlobSpec, ReceiveMode
from qubes_gpu_share.protocol import LeaseRequest

from test_broker_support import QUBES, make_broker

REQUEST = LeaseRequest(BlobSpec(8192), ReceiveMode.CPU, 60)


def _with_admin(tmp_path, *commands):
    """Run each qvm-gpu-share command line against a live broker with one
    lease work <- sys-gpu; returns [(status, stdout)] and the broker."""
    broker, _model, agents, _clock = make_broker(tmp_path)
    path = str(tmp_path / "admin.sock")

    async def main():
        lease = await broker.lease("work", "sys-gpu", REQUEST)
        server = AdminServer(path, AdminApi(broker))
        await server.start()
        results = []
        for argv in commands:
            argv = [a.replace("LEASE", lease.lease) for a in argv]
            results.append(await asyncio.to_thread(
                _run, ["--admin-socket", path] + argv))
        await server.close()
        return results, lease.lease
    results, lease_id = asyncio.run(main())
    return results, broker, lease_id


def _run(argv):
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(argv)
    return status, out.getvalue() + err.getvalue()


def test_list_show_budgets_settings(tmp_path):
    results, _broker, lease_id = _with_admin(
        tmp_path, ["list"], ["--json", "list", "--vm", "personal"],
        ["show", "LEASE"], ["--json", "budgets"], ["settings", "sys-gpu"])
    (s1, listing), (s2, empty), (s3, show), (s4, budgets), (s5, settings) \
        = results
    assert (s1, s2, s3, s4, s5) == (0, 0, 0, 0, 0)
    assert lease_id in listing and "sys-gpu" in listing
    assert json.loads(empty) == {"leases": []}
    assert "exporting" in show and "active" in show
    provider = [p for p in json.loads(budgets)["providers"]
                if p["qube"] == "sys-gpu"][0]
    assert provider["pages_used"] == 2
    assert provider["pages_left"] == provider["budget_pages"] - 2
    assert "gpu-share-budget-pages" in settings and "16384" in settings


def test_revoke_by_id_and_errors(tmp_path):
    results, broker, lease_id = _with_admin(
        tmp_path, ["revoke", "LEASE"], ["show", "0" * 32],
        ["list", "--state", "nonsense"])
    (s1, revoked), (s2, missing), (s3, bad) = results
    assert s1 == 0 and "revoked" in revoked
    assert broker.registry.get(lease_id).state.value == "revoked"
    assert s2 == 1 and "no lease" in missing
    assert s3 == 1 and "unknown state" in bad


def test_usage_errors_and_no_broker(tmp_path):
    with pytest.raises(SystemExit) as usage:
        cli.main(["revoke"])
    assert usage.value.code == 2
    status, out = _run(["--admin-socket", str(tmp_path / "none"), "list"])
    assert status == 1 and "cannot reach the broker" in out


def test_daemon_starts_from_its_command_line(tmp_path):
    qubes = tmp_path / "qubes.json"
    qubes.write_text(json.dumps(QUBES))
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "qubes_gpu_share.broker",
         "--registry", str(tmp_path / "leases.db"), "--run-dir",
         str(run_dir), "--qubes", f"memory:{qubes}"],
        stderr=subprocess.PIPE, env=env)
    try:
        for _ in range(100):
            if (run_dir / "admin.sock").exists():
                break
            time.sleep(0.05)
        status, out = _run(["--admin-socket", str(run_dir / "admin.sock"),
                            "--json", "settings", "work"])
        assert status == 0 and json.loads(out)["qube"] == "work"
        assert (run_dir / "broker.sock").exists()
    finally:
        daemon.terminate()
        _, err = daemon.communicate(timeout=10)
    assert daemon.returncode == 0, err.decode()
    assert b"broker ready" in err and b"broker stopped" in err

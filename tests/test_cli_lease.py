"""The application commands (lease, offer, list, release) as a script uses
them: real processes against a running simulated system (simsys), their
exit statuses, their --json output and their one-line refusals. After each
test no lease is left live and the simulator saw no hazard.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest
from simfixtures import clean_after_each, module_system

from qubes_gpu_share import client
from qubes_gpu_share.limits import BUDGET_PAGES, PAIR_PAGES
from qubes_gpu_share.simsys import SimQube
from qubes_gpu_share.simsys.processes import child_env

REPO = pathlib.Path(__file__).resolve().parents[1]
POLICY = [REPO / "policy" / "60-gpu-share.policy",
          REPO / "demo" / "policy" / "30-user-gpu-share.policy"]
QUBES = [
    SimQube("sys-gpu", 2, "hvm", ("gpu-share-provider", "gpu-share"),
            # a share above the budget: the budget is what a test hits
            features={BUDGET_PAGES.feature: "16", PAIR_PAGES.feature: "32"}),
    SimQube("work", 3, "pvh", ("gpu-share", "gpu-share-provider")),
]
CLI = [sys.executable, "-m", "qubes_gpu_share.cli.main"]
TIMEOUT = 20


system = module_system("cli", QUBES, POLICY)
clean = clean_after_each("a lease stayed live after the commands ended")


def env(system, qube: str) -> dict[str, str]:
    """A shell in *qube*: the agent's socket from the environment."""
    return {**child_env(), client.ENV_SOCKET: system.app_socket(qube)}


def cli(system, *args: str, qube: str = "work", **kwargs):
    """Run one command to its end as an application in *qube*."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True,
                          env=env(system, qube), timeout=TIMEOUT, **kwargs)


def start(system, *args: str, qube: str = "work", **kwargs):
    """Start a holding command; its first line is on .stdout."""
    return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=env(system, qube), **kwargs)


def first_json(process) -> dict:
    line = process.stdout.readline()
    assert line, process.communicate(timeout=TIMEOUT)
    return json.loads(line)


def one_line_refusal(result, code: str) -> None:
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("qubes-gpu-share ")
    assert result.stderr.endswith(f"({code})\n")


def test_lease_is_held_listed_and_released_on_interrupt(system):
    holder = start(system, "lease", "--from", "sys-gpu", "--size", "64x64",
                   "--json")
    lease = first_json(holder)
    assert (lease["peer"], lease["role"], lease["mode"]) == \
        ("sys-gpu", "consumer", "cpu")
    assert lease["meta"]["pages"] == 4 and lease["length"] == 4 * 4096

    listed = cli(system, "list", "--json")
    assert listed.returncode == 0, listed
    assert [(e["lease"], e["state"], e["pages"])
            for e in json.loads(listed.stdout)] == \
        [(lease["lease"], "active", 4)]
    provider_view = json.loads(cli(system, "list", "--json",
                                   qube="sys-gpu").stdout)
    assert [e["role"] for e in provider_view] == ["provider"]
    text = cli(system, "list").stdout.splitlines()
    assert text[0].split()[:3] == ["LEASE", "ROLE", "PEER"]
    assert text[1].startswith(lease["lease"])

    # another program cannot pull the lease from under its holder
    one_line_refusal(cli(system, "release", lease["lease"]), "not-yours")
    assert len(system.live_leases()) == 1

    holder.send_signal(signal.SIGINT)
    assert holder.wait(TIMEOUT) == 0
    assert json.loads(cli(system, "list", "--json").stdout) == []


def test_hold_seconds_then_release(system):
    result = cli(system, "lease", "--from", "sys-gpu", "--bytes", "8192",
                 "--hold", "0.2")
    assert result.returncode == 0, result
    assert result.stdout.startswith("lease ")
    assert " from sys-gpu: 8192 bytes, 2 pages, cpu mode" in result.stdout


CHILD = """\
import json, mmap, os, sys
fd = int(os.environ["QUBES_GPU_SHARE_FD"])
info = json.loads(os.environ["QUBES_GPU_SHARE_INFO"])
with mmap.mmap(fd, int(os.environ["QUBES_GPU_SHARE_LENGTH"]),
               offset=int(os.environ["QUBES_GPU_SHARE_OFFSET"])) as pixels:
    pixels[:5] = b"hello"
print(json.dumps([info["lease"], os.environ["QUBES_GPU_SHARE_MODE"],
                  info["length"]]))
sys.exit(7)
"""


def test_exec_passes_the_fd_and_the_status(system):
    result = cli(system, "lease", "--from", "sys-gpu", "--size", "64x64",
                 "--exec", sys.executable, "-c", CHILD)
    assert result.returncode == 7, result
    lease, mode, length = json.loads(result.stdout)
    assert (len(lease), mode, length) == (32, "cpu", 16384)


@pytest.mark.parametrize("qube, args, code", [
    ("sys-gpu", ["--from", "work", "--bytes", "4096"], "policy-denied"),
    ("work", ["--from", "sys-gpu", "--bytes", str(17 * 4096)], "budget"),
    ("work", ["--from", "sys-gpu", "--size", "64x64", "--mode", "dmabuf"],
     "receive-failed"),          # x86 PVH kernel without the fix
])
def test_refused_lease_prints_its_reason(system, qube, args, code):
    one_line_refusal(cli(system, "lease", *args, qube=qube), code)
    assert system.live_leases() == []


def test_revoke_ends_the_hold_and_the_child(system):
    """dom0 revokes at the TTL: the child is stopped, then the lease let go."""
    result = cli(system, "lease", "--from", "sys-gpu", "--bytes", "4096",
                 "--ttl", "1", "--exec", "sleep", "30")
    assert result.returncode == 3, result
    assert "revoked" in result.stderr and result.stderr.count("\n") == 1


def test_offer_a_file_and_a_memfd(system, tmp_path):
    picture = tmp_path / "picture.raw"
    picture.write_bytes(b"pixels" * 100)
    offering = start(system, "offer", "--to", "sys-gpu", "--file",
                     str(picture), "--bytes", "8192", "--json")
    offer = first_json(offering)
    assert (offer["peer"], offer["pages"]) == ("sys-gpu", 2)
    with client.Client(system.app_socket("sys-gpu")) as gpu:
        with gpu.incoming(timeout=10) as buf, buf.mmap(False) as pixels:
            assert buf.lease == offer["lease"]
            assert pixels[:600] == b"pixels" * 100
            assert pixels[600:8192] == bytes(8192 - 600)
    offering.send_signal(signal.SIGTERM)
    assert offering.wait(TIMEOUT) == 0

    memfd = os.memfd_create("app-shm", os.MFD_ALLOW_SEALING)
    os.ftruncate(memfd, 4096)
    try:
        result = cli(system, "offer", "--to", "sys-gpu", "--fd", str(memfd),
                     "--hold", "0", pass_fds=(memfd,))
    finally:
        os.close(memfd)
    assert result.returncode == 0, result
    assert result.stdout.startswith("offered lease ")
    assert "4096 bytes, 1 pages" in result.stdout


@pytest.mark.parametrize("args", [
    ["lease", "--from", "sys-gpu", "--size", "0x5"],
    ["lease", "--from", "sys-gpu"],
    ["lease", "--from", "sys-gpu", "--bytes", "1", "--format", "toolong"],
    ["release", "not-a-lease"],
    ["offer", "--to", "sys-gpu"],
])
def test_wrong_usage_is_status_2(system, args):
    result = cli(system, *args)
    assert result.returncode == 2, result
    assert result.stdout == ""


def test_no_agent_is_one_line(tmp_path):
    result = subprocess.run(
        [*CLI, "list", "--socket", str(tmp_path / "none.sock")],
        capture_output=True, text=True, env=child_env(), timeout=TIMEOUT)
    one_line_refusal(result, "no-agent")

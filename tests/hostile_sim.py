"""Shared by the reliability suites (test_crash_broker, test_load,
test_hostile): a simulated system with many qubes, and the checks that
say "nothing leaked, nothing is inconsistent".

Every check reads a different witness of the same truth and compares:
the registry (the broker's durable state), the broker's admin socket
(what ``qvm-gpu-share budgets`` shows), the grant simulator (the pages a
provider really has granted) and the simulator's hazard list.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import time
from collections.abc import Iterable, Sequence

from qubes_gpu_share import client
from qubes_gpu_share.grant.errors import GrantError
from qubes_gpu_share.lease import FINAL, State
from qubes_gpu_share.limits import BUDGET_PAGES, QUOTA_LEASES
from qubes_gpu_share.simsys import SimQube, SimSystem

REPO = pathlib.Path(__file__).resolve().parents[1]
#: Every qube may call every broker service: the broker, not qrexec
#: policy, is what these suites exercise (the vendor deny file stays in
#: force for the agents' services).
ALLOW_ALL = """\
qubes.GpuLease    *   @anyvm  @adminvm  allow
qubes.GpuOffer    *   @anyvm  @adminvm  allow
qubes.GpuRelease  *   @anyvm  @adminvm  allow
qubes.GpuLeases   *   @anyvm  @adminvm  allow
"""
#: 64x64 XR24: 4 pages, the buffer every suite leases.
SMALL = dict(width=64, height=64, fourcc="XR24")
SMALL_PAGES = 4
PROVIDER_SERVICES = ("gpu-share-provider", "gpu-share")


def provider(name: str, xid: int, budget: int = 32_000) -> SimQube:
    return SimQube(name, xid, "hvm", PROVIDER_SERVICES,
                   features={BUDGET_PAGES.feature: str(budget)})


def consumer(name: str, xid: int, quota: int | None = None) -> SimQube:
    features = {} if quota is None else {QUOTA_LEASES.feature: str(quota)}
    return SimQube(name, xid, "pvh", ("gpu-share",), features=features)


def policy_files(tmp_path: pathlib.Path) -> list[pathlib.Path]:
    allow = tmp_path / "30-reliability.policy"
    allow.write_text(ALLOW_ALL)
    return [allow, REPO / "policy" / "60-gpu-share.policy"]


def system(tmp_path: pathlib.Path, qubes: Sequence[SimQube],
           **kwargs) -> SimSystem:
    return SimSystem(tmp_path / "root", qubes, policy_files(tmp_path),
                     **kwargs)


def app(sim: SimSystem, qube: str) -> client.Client:
    return client.Client(sim.app_socket(qube))


def memfd(pages: int = SMALL_PAGES) -> int:
    fd = os.memfd_create("offered")
    os.ftruncate(fd, pages * 4096)
    return fd


# -- observation -------------------------------------------------------------

def admin(sim: SimSystem, request: dict) -> dict:
    """One request on the broker's admin socket (qvm-gpu-share's wire)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(sim.layout.broker_socket("admin.sock")))
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    answer = json.loads(data)
    assert answer["ok"], answer
    return answer


def admin_pages_used(sim: SimSystem) -> dict[str, int]:
    return {entry["qube"]: entry["pages_used"]
            for entry in admin(sim, {"op": "budgets"})["providers"]
            if "pages_used" in entry}


def budget_witnesses(sim: SimSystem, qube: str) -> dict[str, int]:
    """The pages *qube* has lent, as each witness sees them."""
    return {
        "registry budget": sim.provider_pages(qube),
        "sum of live leases": sum(lease.pages for lease
                                  in sim.live_leases()
                                  if lease.provider == qube),
        "admin socket": admin_pages_used(sim).get(qube, 0),
        "granted (simulator)": granted_pages(sim, qube),
    }


def granted_pages(sim: SimSystem, qube: str) -> int:
    """Entries of *qube*'s grant table in use; 0 for a domain that never
    opened a grant device (a scripted agent grants nothing)."""
    try:
        return sim.grant_stats(qube).table_used
    except GrantError as exc:
        if "no domain" not in str(exc):
            raise
        return 0


def assert_budgets_consistent(sim: SimSystem, providers: Iterable[str],
                              expected: dict[str, int] | None = None) -> None:
    """Every witness agrees on every provider's pages (and on *expected*
    when given); the simulator saw no hazard."""
    for qube in providers:
        seen = budget_witnesses(sim, qube)
        want = (expected or {}).get(qube, seen["registry budget"])
        assert set(seen.values()) == {want}, f"{qube}: {seen}"
    assert sim.hazards() == []


def in_flight(sim: SimSystem) -> list:
    """Live leases that are not simply active (under way to an end)."""
    return [lease for lease in sim.live_leases()
            if lease.state is not State.ACTIVE]


def settle(sim: SimSystem, timeout: float = 60.0) -> None:
    """Wait until no lease is half way (the broker retries with backoff)."""
    sim.wait_until(lambda: not in_flight(sim), timeout,
                   lambda: "leases still in flight: " + ", ".join(
                       f"{lease.id[:8]} {lease.consumer} {lease.state.value}"
                       for lease in in_flight(sim)), interval=0.1)


def final(lease) -> bool:
    return lease.state in FINAL


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_fds(pids: dict[str, int], want: dict[str, int],
             timeout: float = 10.0) -> dict[str, int]:
    """fd counts of *pids* once they are back to *want* (or the time ran
    out: then the counts as they are, for the assertion to show)."""
    deadline = time.monotonic() + timeout
    while True:
        now = {name: fd_count(pid) for name, pid in pids.items()}
        if now == want or time.monotonic() > deadline:
            return now
        time.sleep(0.1)

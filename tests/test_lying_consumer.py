"""A consumer's word is not a release (issue 14), on the simulated system.

``liar`` maps the refs of each lease itself (a grant device of its own
domain, no agent), tells dom0 it released, keeps the mapping, and does it
again, 1,000 times. Its provider ``gpu-a`` runs the project's kernel series
(IMP_TRY_RELEASE: its kernel says how many of a lease's pages the peer
still maps), so its agent answers the broker's revoke "busy, 4 pages still
mapped by liar": the lease stays ``releasing``, charged to the budget and
to the liar's quota, and the liar never gets more than its quota. The
budget never shows less than the pages really held (the simulator counts
them: its deferred ends). When the liar unmaps, or dies, the next try of
the broker ends the leases and the budget comes back.

A provider on a stock kernel cannot tell (the kernel defers the ends
silently): its agent answers released, the broker logs the release as
unverified and gives the budget back while the pages stay held; the last
test measures that gap (docs/native.md has the kernel facts).
"""

from __future__ import annotations

import time

import pytest

from hostile_peers import call_service, dom0_descriptor
from hostile_sim import SMALL_PAGES, admin, provider, system
from qubes_gpu_share import protocol
from qubes_gpu_share.formats import ImageSpec, ReceiveMode
from qubes_gpu_share.grant.sim import SimGrantDevice
from qubes_gpu_share.lease import State
from qubes_gpu_share.limits import QUOTA_LEASES
from qubes_gpu_share.protocol import LeaseAnswer, ReleaseRequest
from qubes_gpu_share.qrexec import reply
from qubes_gpu_share.simsys import SimQube

pytestmark = pytest.mark.slow

LIAR, LIAR_XID = "liar", 10
QUOTA = 16
LEASE_BODY = protocol.encode(protocol.LeaseRequest(
    ImageSpec(64, 64, "XR24"), ReceiveMode.CPU, 600))


def _world(tmp_path, kernel: str):
    gpu = provider("gpu-a", 2)
    gpu = SimQube(gpu.name, gpu.xid, gpu.virt_mode, gpu.services,
                  features=gpu.features, kernel=(kernel,))
    liar = SimQube(LIAR, LIAR_XID, "pvh", ("gpu-share",),
                   features={QUOTA_LEASES.feature: str(QUOTA)}, agent=False)
    return system(tmp_path, [gpu, liar], broker_args=("--retry-max", "1"))


def _lease(sim) -> LeaseAnswer | str:
    answer = reply.parse_reply(call_service(
        sim.layout.broker_socket(),
        dom0_descriptor(LIAR, "qubes.GpuLease+gpu-a"), LEASE_BODY))
    message = protocol.decode(answer, LeaseAnswer, protocol.Error)
    return message.code if isinstance(message, protocol.Error) else message


def _release(sim, lease: str) -> None:
    answer = reply.parse_reply(call_service(
        sim.layout.broker_socket(),
        dom0_descriptor(LIAR, "qubes.GpuRelease"),
        protocol.encode(ReleaseRequest(lease))))
    assert protocol.decode(answer, protocol.Ok, protocol.Error) \
        == protocol.Ok()


def _lie(sim, device, rounds: int, *, charged: bool = True
         ) -> tuple[list, list[str]]:
    """``rounds`` times: lease, map, say released, keep the mapping. With
    ``charged``: after each round, the budget covers every page the liar
    really holds (the simulator's count of gpu-a's deferred ends)."""
    mappings, refusals = [], []
    for _ in range(rounds):
        answer = _lease(sim)
        if isinstance(answer, str):
            refusals.append(answer)
            continue
        mappings.append(device.map_grant(answer.provider_domid, answer.refs))
        _release(sim, answer.lease)  # "released" (it is not)
        assert len(sim.live_leases(LIAR)) <= QUOTA
        if charged:
            really = sim.grant_stats("gpu-a").deferred_pages
            assert sim.provider_pages("gpu-a") >= really
            assert sim.provider_pages("gpu-a") >= len(mappings) * SMALL_PAGES
    return mappings, refusals


def test_a_lying_consumer_never_gets_more_than_its_quota(tmp_path):
    with _world(tmp_path, "fixed") as sim:
        device = SimGrantDevice(str(sim.layout.hv_socket), LIAR_XID)
        mappings, refusals = _lie(sim, device, 1000)
        assert len(mappings) == QUOTA
        assert set(refusals) == {"quota-leases"} and len(refusals) == 984
        sim.wait_until(lambda: all(
            lease.state is State.RELEASING
            for lease in sim.live_leases(LIAR)), 10, "leases releasing")
        held = QUOTA * SMALL_PAGES
        assert sim.provider_pages("gpu-a") == held
        # what the admin sees: each lease still mapped, per consumer
        shown = admin(sim, {"op": "list", "qube": LIAR})["leases"]
        sim.wait_until(lambda: all(
            entry["held_pages"] == SMALL_PAGES for entry in admin(
                sim, {"op": "list", "qube": LIAR})["leases"]), 10,
            "held pages shown")
        budgets = admin(sim, {"op": "budgets"})
        (liar,) = [c for c in budgets["consumers"] if c["qube"] == LIAR]
        assert liar["held_pages"] == held and len(shown) == QUOTA
        # it lets go of half: those end at the broker's next try
        for mapping in mappings[:QUOTA // 2]:
            mapping.close()
        started = time.monotonic()
        sim.wait_until(lambda: len(sim.live_leases(LIAR)) == QUOTA // 2, 30,
                       "the let-go leases did not end")
        after_unmap = time.monotonic() - started
        assert sim.provider_pages("gpu-a") == held // 2
        # it dies with the rest mapped: Xen drops its mappings
        started = time.monotonic()
        sim.set_running(LIAR, False)              # qubesd: halted
        sim.observer().destroy_domain(LIAR_XID)   # Xen: its mappings gone
        sim.wait_until(lambda: not sim.live_leases(LIAR), 30,
                       "the dead liar's leases did not end")
        after_death = time.monotonic() - started
        assert sim.provider_pages("gpu-a") == 0
        assert sim.grant_stats("gpu-a").table_used == 0
        device.close()
    print(f"\nlying consumer: {len(mappings)} leases held, "
          f"{len(refusals)} refused; budget back {after_unmap:.2f} s after "
          f"the unmap, {after_death:.2f} s after its death")


def test_a_stock_provider_cannot_tell_and_the_gap_is_measured(tmp_path):
    """Without IMP_TRY_RELEASE the provider's kernel ends its grants
    silently deferred: the broker is told "released" and gives the budget
    back while the liar still maps the pages (logged as unverified)."""
    with _world(tmp_path, "dmabuf") as sim:
        device = SimGrantDevice(str(sim.layout.hv_socket), LIAR_XID)
        mappings, refusals = _lie(sim, device, 40, charged=False)
        sim.wait_until(lambda: not sim.live_leases(LIAR), 10, "ended")
        gap = sim.grant_stats("gpu-a").deferred_pages
        unverified = sim.logs()["broker"].count("unverified lease=")
        device.close()
    assert not refusals and len(mappings) == 40
    assert gap == 40 * SMALL_PAGES      # held, and not charged
    assert unverified == 40
    print(f"\nstock provider: {gap} pages still mapped, 0 charged")

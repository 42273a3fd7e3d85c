"""The lease state machine (qubes_gpu_share.lease)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import given, strategies as st

from qubes_gpu_share import lease
from qubes_gpu_share.lease import State
from qubes_gpu_share.formats import BufferMeta, InvalidLayout, Plane
from qubes_gpu_share.names import InvalidName
from registry_crash_child import sample_lease

S = State
#: The graph as DESIGN.md describes it, written independently of lease.py.
EXPECTED_EDGES = {
    (S.REQUESTED, S.EXPORTING), (S.REQUESTED, S.FAILED),
    (S.EXPORTING, S.ACTIVE), (S.EXPORTING, S.FAILED),
    (S.EXPORTING, S.REVOKING),
    (S.ACTIVE, S.RELEASING), (S.ACTIVE, S.REVOKING),
    (S.RELEASING, S.RELEASED),
    (S.REVOKING, S.REVOKED), (S.REVOKING, S.EXPIRED), (S.REVOKING, S.FAILED),
}


@pytest.mark.parametrize("old,new", list(itertools.product(State, State)))
def test_check_transition_allows_exactly_the_graph(old, new):
    if (old, new) in EXPECTED_EDGES:
        lease.check_transition(old, new)
    else:
        with pytest.raises(lease.IllegalTransition, match="illegal"):
            lease.check_transition(old, new)


def test_final_and_live_states():
    assert lease.FINAL == {S.RELEASED, S.REVOKED, S.EXPIRED, S.FAILED}
    # revoking holds the budget until the provider confirmed its release
    assert lease.LIVE == {S.REQUESTED, S.EXPORTING, S.ACTIVE, S.RELEASING,
                          S.REVOKING}
    assert lease.IN_FLIGHT <= lease.LIVE and lease.EXPIRABLE <= lease.LIVE
    assert S.ACTIVE not in lease.IN_FLIGHT


def _reachable(start: State) -> set[State]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in lease.TRANSITIONS[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_every_state_reachable_and_every_live_state_can_end():
    assert _reachable(lease.INITIAL) == set(State)
    for state in lease.LIVE:
        assert _reachable(state) & lease.FINAL, state


def test_release_order_provider_never_ends_an_active_lease_directly():
    # The consumer lets go first: from active, only the two ordered paths.
    assert lease.TRANSITIONS[S.ACTIVE] == {S.RELEASING, S.REVOKING}


def test_advance_to_active_needs_one_ref_per_page():
    item = lease.advance(sample_lease(pages=3), S.EXPORTING, reason="x",
                         now=1.0)
    with pytest.raises(lease.InvalidLease, match="2 refs for a buffer of 3"):
        lease.advance(item, S.ACTIVE, reason="ok", now=2.0, refs=(8, 9))
    for bad in (2**32, -1, 9.0, "9", None):
        with pytest.raises(lease.InvalidLease, match="u32"):
            lease.advance(item, S.ACTIVE, reason="ok", now=2.0,
                          refs=(8, 9, bad))
    active = lease.advance(item, S.ACTIVE, reason="ok", now=2.0,
                           refs=[8, 9, 10])
    assert active.refs == (8, 9, 10) and active.updated == 2.0
    assert item.state == S.EXPORTING and item.refs == ()
    released = lease.advance(
        lease.advance(active, S.RELEASING, reason="consumer", now=3.0),
        S.RELEASED, reason="provider released", now=4.0)
    # the end drops the refs: they name grants that no longer exist
    assert released.refs == () and not released.live


def test_advance_refuses_refs_outside_activation_and_empty_reason():
    item = sample_lease()
    with pytest.raises(lease.InvalidLease, match="refs given"):
        lease.advance(item, S.EXPORTING, reason="x", now=1.0, refs=(1, 2))
    with pytest.raises(lease.InvalidLease, match="reason"):
        lease.advance(item, S.EXPORTING, reason="", now=1.0)


@pytest.mark.parametrize("change,error", [
    ({"provider": "work"}, lease.InvalidLease),
    ({"consumer_domid": -1}, lease.InvalidLease),
    ({"provider_domid": 0x7FF0}, lease.InvalidLease),
    ({"ttl": 0}, lease.InvalidLease),
    ({"lease_id": "ABC"}, InvalidName),
    ({"consumer": "bad name"}, InvalidName),
    ({"mode": "gpu"}, ValueError),
    ({"meta": BufferMeta(pages=1, width=64, height=64, fourcc="XR24",
                         modifier=0, planes=(Plane(256, 4096),))},
     InvalidLayout),
])
def test_new_lease_refuses_impossible_fields(change, error):
    base = sample_lease()
    fields = dict(lease_id=base.id, consumer="work", provider="sys-gpu",
                  consumer_domid=3, provider_domid=2, mode="cpu",
                  initiator="lease", meta=base.meta, ttl=60, now=5.0)
    fields.update(change)
    with pytest.raises(error):
        lease.new_lease(**fields)


def test_new_lease_starts_requested_with_deadline():
    item = sample_lease(ttl=30, now=100.0)
    assert item.state == S.REQUESTED and item.live
    assert (item.created, item.updated, item.deadline) == (100.0, 100.0, 130.0)


def test_check_history():
    lease.check_history([S.REQUESTED, S.EXPORTING, S.REVOKING, S.FAILED])
    with pytest.raises(lease.IllegalTransition):
        lease.check_history([S.EXPORTING, S.ACTIVE])
    with pytest.raises(lease.IllegalTransition):
        lease.check_history([S.REQUESTED, S.ACTIVE])
    with pytest.raises(lease.IllegalTransition):
        lease.check_history([])


@given(st.lists(st.sampled_from(list(State)), max_size=30))
def test_random_moves_follow_the_graph_or_change_nothing(moves):
    item = sample_lease(pages=1)
    for new in moves:
        before = item
        try:
            item = lease.advance(item, new, reason="r", now=1.0,
                                 refs=(8,) if new == S.ACTIVE else ())
        except lease.IllegalTransition:
            assert (before.state, new) not in EXPECTED_EDGES
            assert item is before
        else:
            assert (before.state, new) in EXPECTED_EDGES
            # nothing but the state and its bookkeeping changed
            assert dataclasses.replace(
                item, state=before.state, reason=before.reason,
                updated=before.updated, refs=before.refs) == before

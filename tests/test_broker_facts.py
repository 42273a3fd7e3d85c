"""Never act on a guess (issue 13): the broker against qubesd failures and
qubes that come and go, in-process, through the Qubes-facts seam (the
in-memory model's lost events, power states, failing queries), with the
event follower and expiry timer of the daemon (broker/follow.py).

The same rules through qubesadmin's own EventsDispatcher are in
tests/test_qubes_admin.py (where Qubes' library is present)."""

from __future__ import annotations

import asyncio
import time

import pytest

from qubes_gpu_share.broker.refusal import Refused
from qubes_gpu_share.broker.follow import Follower, Stopped
from qubes_gpu_share.formats import BlobSpec, ReceiveMode
from qubes_gpu_share.lease import State
from qubes_gpu_share.protocol import LeaseRequest
from qubes_gpu_share.qubeinfo import PowerState

from test_broker_support import make_broker

PAGE = 4096
REQUEST = LeaseRequest(BlobSpec(3 * PAGE), ReceiveMode.CPU, 60)
QUBES = {"qubes": [
    {"name": "sys-gpu", "running": True, "virt_mode": "hvm",
     "services": ["gpu-share-provider"]},
    {"name": "work", "running": True, "services": ["gpu-share"]},
    {"name": "visitor", "running": False, "services": ["gpu-share"]},
]}


def scenario(tmp_path, body, **kwargs):
    """Run ``body(broker, model, agents)`` with the follower running."""
    broker, model, agents, clock = make_broker(tmp_path, qubes=QUBES,
                                               **kwargs)

    async def main():
        follower = Follower(broker)
        runner = asyncio.create_task(follower.run())
        await asyncio.wait_for(follower.ready.wait(), 5)
        try:
            return await body(broker, model, agents)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            broker.close()
            await asyncio.gather(*broker._tasks, return_exceptions=True)
    return asyncio.run(main())


async def until(condition, what: str, timeout: float = 5.0) -> float:
    """Poll until true; the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} within {timeout} s")
        await asyncio.sleep(0.002)
    return time.monotonic() - started


def state(broker, lease_id):
    return broker.registry.get(lease_id).state


# -- 1. events --------------------------------------------------------------

def test_lost_events_refuse_leases_and_reconcile_when_back(tmp_path):
    """work shuts down while nobody hears it; once the connection is back,
    its lease ends before anything new is granted."""
    async def body(broker, model, agents):
        held = await broker.lease("work", "sys-gpu", REQUEST)
        model.break_events("connection reset by peer")
        await until(lambda: not broker.trusted(), "untrusted")
        with pytest.raises(Refused) as refused:
            await broker.lease("work", "sys-gpu", REQUEST)
        assert refused.value.code == "qubes-unavailable"
        assert "events unavailable" in refused.value.message
        model.stop("work")  # lost
        await asyncio.sleep(0.05)
        assert state(broker, held.lease) == State.ACTIVE  # nobody knows
        model.restore_events()
        took = await until(lambda: state(broker, held.lease)
                           == State.REVOKED, "work's lease ended")
        model.start("work")
        await until(broker.trusted, "trusted again")
        await broker.lease("work", "sys-gpu", REQUEST)
        return took, agents.revokes(held.lease)

    took, revokes = scenario(tmp_path, body)
    # work is gone: only the provider is told, the consumer maps nothing
    assert revokes == [("sys-gpu", "provider")]
    assert took < 1.0


def test_qubesd_failing_during_the_recheck_keeps_trust_off(tmp_path):
    async def body(broker, model, agents):
        held = await broker.lease("work", "sys-gpu", REQUEST)
        model.break_events()
        model.query_error = "qubesd is restarting"
        model.restore_events()
        await asyncio.sleep(0.2)
        assert not broker.trusted()
        assert state(broker, held.lease) == State.ACTIVE
        model.query_error = None
        await until(broker.trusted, "trusted after qubesd answered")
        return state(broker, held.lease)

    assert scenario(tmp_path, body) == State.ACTIVE


# -- 2. domain ids ---------------------------------------------------------

def test_another_qube_on_the_same_domain_id_ends_the_old_lease(tmp_path):
    """visitor, a different qube, starts with domain id 3 after work's
    shutdown went unheard: work's lease ends at once (its domain is gone:
    Xen gives an id to one domain at a time), before visitor gets
    anything new."""
    async def body(broker, model, agents):
        held = await broker.lease("work", "sys-gpu", REQUEST)
        xid = model.peek("work").xid
        model.set_power("work", PowerState.HALTED)  # no event heard
        model.start("visitor", xid=xid)
        with pytest.raises(Refused) as refused:  # before the event is read
            await broker.lease("visitor", "sys-gpu", REQUEST)
        # the window: from the start until the provider is told to end
        # its grant to that domain id (docs/broker.md)
        window = await until(lambda: agents.revokes(held.lease),
                             "provider told")
        await until(lambda: state(broker, held.lease) == State.REVOKED,
                    "work's lease ended")
        granted = await broker.lease("visitor", "sys-gpu", REQUEST)
        return refused.value, window, agents.revokes(held.lease), granted

    refused, window, revokes, granted = scenario(tmp_path, body)
    assert refused.code == "domain-reused" and "domain id" in refused.message
    assert revokes == [("sys-gpu", "provider")]
    assert granted.provider == "sys-gpu"
    print(f"\nreused domain id: provider told after {1000 * window:.1f} ms")
    assert window < 0.5


def test_a_restart_under_the_same_id_is_another_run(tmp_path):
    """Even the same qube with the same domain id is a new domain after a
    restart (qubesd's start_time): the old lease ends."""
    async def body(broker, model, agents):
        held = await broker.lease("work", "sys-gpu", REQUEST)
        xid = model.peek("work").xid
        model.set_power("work", PowerState.HALTED)
        model.start("work", xid=xid)
        await until(lambda: state(broker, held.lease) == State.REVOKED,
                    "old run's lease ended")
        return agents.revokes(held.lease)

    assert scenario(tmp_path, body) == [("sys-gpu", "provider")]


# -- 3. uncertain is not halted ----------------------------------------------

@pytest.mark.parametrize("power", [PowerState.UNKNOWN, PowerState.DYING,
                                   PowerState.CRASHED, PowerState.PAUSED])
def test_a_consumer_in_doubt_is_waited_for(tmp_path, power):
    """A revocation never tells the provider to release first while the
    consumer's domain may exist; only Halted (or its confirmation) ends
    its part."""
    async def body(broker, model, agents):
        held = await broker.lease("work", "sys-gpu", REQUEST)
        model.set_power("work", power)
        with pytest.raises(Refused) as refused:
            await broker.lease("work", "sys-gpu", REQUEST)
        lease = await broker.revoke(held.lease, "revoked by admin")
        await asyncio.sleep(0.1)  # retries meanwhile
        waiting = broker.retries.waiting(held.lease)
        kept = (state(broker, held.lease),
                broker.registry.provider_pages("sys-gpu"),
                agents.revokes(held.lease))
        model.set_power("work", PowerState.HALTED)
        await until(lambda: state(broker, held.lease) == State.REVOKED,
                    "ended once halted")
        return refused.value.code, lease.state, waiting, kept

    code, first, waiting, kept = scenario(tmp_path, body)
    assert code == ("qubes-unavailable" if power is PowerState.UNKNOWN
                    else "not-running")
    assert first == State.REVOKING
    assert power.value in waiting
    assert kept == (State.REVOKING, 3, [])  # nobody told to release


def test_crashed_consumer_found_at_recheck_starts_the_revocation(tmp_path):
    async def body(broker, model, agents):
        held = await broker.lease("work", "sys-gpu", REQUEST)
        model.break_events()
        model.set_power("work", PowerState.CRASHED)
        model.restore_events()
        await until(lambda: state(broker, held.lease) == State.REVOKING,
                    "revocation started")
        await asyncio.sleep(0.05)
        # a crashed domain keeps its mappings: nobody is told to release
        return state(broker, held.lease), agents.revokes(held.lease)

    assert scenario(tmp_path, body) == (State.REVOKING, [])


def test_an_unknown_state_starts_nothing_at_recheck(tmp_path):
    async def body(broker, model, agents):
        held = await broker.lease("work", "sys-gpu", REQUEST)
        model.break_events()
        model.set_power("work", PowerState.UNKNOWN)
        model.restore_events()
        await until(broker.trusted, "re-checked")
        await asyncio.sleep(0.05)
        return state(broker, held.lease), agents.revokes(held.lease)

    assert scenario(tmp_path, body) == (State.ACTIVE, [])


# -- 4. timeouts are not releases ----------------------------------------

def test_a_provider_hung_in_revoke_keeps_its_budget(tmp_path):
    async def body(broker, model, agents):
        held = await broker.lease("work", "sys-gpu", REQUEST)
        scripted = model._service_handler

        async def hang(qube, service, payload):
            if qube == "sys-gpu" and service.startswith("qubes.GpuRevoke"):
                await asyncio.sleep(3600)
            return await scripted(qube, service, payload)
        model._service_handler = hang
        await broker.release("work", held.lease)
        lease = broker.registry.get(held.lease)
        return (lease.state, broker.registry.provider_pages("sys-gpu"),
                broker.retries.waiting(held.lease))

    lease_state, pages, waiting = scenario(tmp_path, body)
    assert lease_state == State.RELEASING and pages == 3
    assert "timeout" in waiting and "sys-gpu" in waiting


# -- 5. supervision -------------------------------------------------------

@pytest.mark.parametrize("which", ["events", "expiry"])
def test_a_dead_task_stops_the_broker(tmp_path, which):
    broker, model, _agents, _clock = make_broker(tmp_path, qubes=QUBES)

    def broken(*_args):
        raise RuntimeError(f"{which} broke")
    if which == "expiry":
        broker.registry.next_deadline = broken
    else:
        broker.domain_started = None  # the follower's next event fails

    async def main():
        follower = Follower(broker)
        runner = asyncio.create_task(follower.run())
        if which == "events":
            await follower.ready.wait()
            model.start("visitor")
        with pytest.raises(Stopped) as stopped:
            await asyncio.wait_for(runner, 5)
        broker.close()
        return str(stopped.value)

    message = asyncio.run(main())
    assert ("event follower" if which == "events" else "expiry timer") \
        in message


@pytest.mark.parametrize("turns", [0, 1, 2])
def test_the_expiry_timer_stops_when_woken_as_it_is_cancelled(tmp_path,
                                                               turns):
    """A new deadline (a grant) in the turn the daemon stops: the expiry
    timer still ends at once (Python 3.11's wait_for returned the wake-up
    and dropped the cancellation, and the daemon's stop waited for the
    next deadline)."""
    broker, _model, _agents, _clock = make_broker(tmp_path, qubes=QUBES)

    async def main():
        follower = Follower(broker)
        runner = asyncio.create_task(follower.run())
        await asyncio.wait_for(follower.ready.wait(), 5)
        await asyncio.sleep(0.05)  # the timer waits for its next deadline
        broker.deadline_changed.set()
        for _ in range(turns):
            await asyncio.sleep(0)
        runner.cancel()
        done, _pending = await asyncio.wait({runner}, timeout=2)
        broker.close()
        return bool(done)

    assert asyncio.run(main())

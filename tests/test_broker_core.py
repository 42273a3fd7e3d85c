"""The broker's flows, in-process: a real registry file, the in-memory Qubes
model, scripted agents answering with real protocol messages."""

from __future__ import annotations

import asyncio

import pytest

from qubes_gpu_share import protocol
from qubes_gpu_share.broker.admin import AdminApi, AdminError
from qubes_gpu_share.broker.agents import Timeouts
from qubes_gpu_share.broker.refusal import Refused
from qubes_gpu_share.broker.follow import Follower
from qubes_gpu_share.formats import BlobSpec, ImageSpec, ReceiveMode
from qubes_gpu_share.lease import State
from qubes_gpu_share.protocol import (Error, GrantRefs, LeaseRequest,
                                      OfferRequest)
from qubes_gpu_share.qrexec import reply
from qubes_gpu_share.qubes.facts import ServiceCallError

from test_broker_support import make_broker

PAGE = 4096
REQUEST = LeaseRequest(BlobSpec(3 * PAGE), ReceiveMode.CPU, 60)


def run(coro):
    """Run a flow, then let the broker's background work finish (the
    commits of changes that did not wait for one included)."""
    async def main(broker=None):
        try:
            return await coro
        finally:
            while tasks := asyncio.all_tasks() - {asyncio.current_task()}:
                await asyncio.gather(*tasks, return_exceptions=True)
    return asyncio.run(main())


def test_pull_cycle_records_every_step_and_returns_the_budget(tmp_path):
    broker, _model, agents, _clock = make_broker(tmp_path)

    async def main():
        answer = await broker.lease("work", "sys-gpu", REQUEST)
        assert answer.provider == "sys-gpu" and len(answer.refs) == 3
        assert answer.provider_domid == broker.facts.qube("sys-gpu").xid
        assert broker.registry.provider_pages("sys-gpu") == 3
        await broker.release("work", answer.lease)
        return answer.lease, broker.commits.commits

    lease_id, commits = run(main())
    states = [e.new_state for e in broker.registry.history(lease_id)]
    assert states == [State.REQUESTED, State.EXPORTING, State.ACTIVE,
                      State.RELEASING, State.RELEASED]
    # two commits waited for (requested+exporting; active+releasing), the
    # end rode on a later one (docs/registry.md, durable points)
    assert commits == 2
    assert broker.registry.provider_pages("sys-gpu") == 0
    export = [m for q, n, m in agents.calls if n == "qubes.GpuExport"][0]
    assert export.consumer == "work"
    assert export.consumer_domid == broker.facts.qube("work").xid
    # the provider only, and only after the consumer said it let go
    assert agents.revokes(lease_id) == [("sys-gpu", "provider")]


@pytest.mark.parametrize("provider, code", [
    ("work", "same-qube"), ("nosuch", "no-such-qube"),
    ("personal", "service-disabled"), ("-bad", "malformed")])
def test_refusals_change_nothing(tmp_path, provider, code):
    broker, _model, agents, _clock = make_broker(tmp_path)
    with pytest.raises(Refused) as refused:
        run(broker.lease("work", provider, REQUEST))
    assert refused.value.code == code
    assert broker.registry.leases() == [] and agents.calls == []


def test_budget_refusal_names_the_reason(tmp_path):
    broker, model, _agents, _clock = make_broker(tmp_path)
    model.set_feature("sys-gpu", "gpu-share-budget-pages", "4")
    model.set_feature("sys-gpu", "gpu-share-pair-pages", "8")

    async def main():
        await broker.lease("work", "sys-gpu", REQUEST)
        with pytest.raises(Refused) as refused:
            await broker.lease("work", "sys-gpu", REQUEST)
        return refused.value

    refused = run(main())
    assert refused.code == "budget" and "sys-gpu" in refused.message
    assert len(broker.registry.leases()) == 1


def test_concurrent_requests_never_overshoot_the_budget(tmp_path):
    broker, model, _agents, _clock = make_broker(tmp_path)
    model.set_feature("sys-gpu", "gpu-share-budget-pages", "9")
    model.set_feature("sys-gpu", "gpu-share-pair-pages", "9")

    async def one():
        try:
            await broker.lease("work", "sys-gpu", REQUEST)
            return True
        except Refused:
            return False

    async def main():
        return await asyncio.gather(*(one() for _ in range(6)))

    assert sum(run(main())) == 3
    assert broker.registry.provider_pages("sys-gpu") == 9


def test_one_consumer_takes_half_a_budget_so_a_second_fits(tmp_path):
    """Fair share by default (issue 12): concurrent requests of one
    consumer never pass half the provider's budget; another consumer's
    lease still fits; offers to it count against its own offer quota."""
    broker, model, _agents, _clock = make_broker(tmp_path)
    model.set_feature("sys-gpu", "gpu-share-budget-pages", "12")
    model.set_feature("work", "gpu-share-quota-leases", "1")

    async def one(consumer):
        try:
            await broker.lease(consumer, "sys-gpu", REQUEST)
            return consumer
        except Refused as refused:
            return refused.code

    async def export(request):
        return GrantRefs.from_ints(range(request.meta.pages))

    async def main():
        first = await asyncio.gather(*(one("personal") for _ in range(4)))
        second = await one("work")
        # work's own quota is full (1 lease), offers to it still fit
        offered = await broker.offer("sys-gpu", "work",
                                     OfferRequest(BlobSpec(PAGE), 60), export)
        return first, second, offered

    first, second, offered = run(main())
    assert sorted(first) == ["pair-share", "pair-share", "personal",
                             "personal"]
    assert second == "work" and offered.provider == "sys-gpu"
    assert broker.registry.consumer_share("work", "sys-gpu") == (1, 1, 4)


def test_provider_refusing_fails_the_lease_without_revoke(tmp_path):
    broker, _model, agents, _clock = make_broker(tmp_path)
    agents.export_answer = lambda q, r: reply.ok_reply(
        protocol.encode(Error("no-memory", "out of memory")))
    with pytest.raises(Refused) as refused:
        run(broker.lease("work", "sys-gpu", REQUEST))
    assert refused.value.code == "export-failed"
    (lease,) = broker.registry.leases()
    assert lease.state == State.FAILED and agents.revokes(lease.id) == []


@pytest.mark.parametrize("count", [2, 4])
def test_wrong_ref_count_is_revoked_at_the_provider(tmp_path, count):
    broker, _model, agents, _clock = make_broker(tmp_path)
    agents.export_answer = lambda q, r: reply.ok_reply(protocol.encode(
        protocol.ExportAnswer(GrantRefs.from_ints(range(count)))))
    with pytest.raises(Refused):
        run(broker.lease("work", "sys-gpu", REQUEST))
    (lease,) = broker.registry.leases()
    assert lease.state == State.FAILED and lease.refs == ()
    # the consumer never got refs: only the provider is told
    assert agents.revokes(lease.id) == [("sys-gpu", "provider")]


def test_release_of_another_qubes_lease_is_refused(tmp_path):
    broker, _model, _agents, _clock = make_broker(tmp_path)

    async def main():
        answer = await broker.lease("work", "sys-gpu", REQUEST)
        for caller, lease_id in (("personal", answer.lease),
                                 ("work", "0" * 32), ("work", "zz")):
            with pytest.raises(Refused) as refused:
                await broker.release(caller, lease_id)
            assert refused.value.code == "unknown-lease"
        return answer.lease

    lease_id = run(main())
    assert broker.registry.get(lease_id).state == State.ACTIVE
    assert broker.leases_of("personal").leases == ()
    (entry,) = broker.leases_of("work").leases
    assert (entry.role.value, entry.peer) == ("consumer", "sys-gpu")


def test_revocation_order_and_busy_consumer_keeps_the_budget(tmp_path):
    broker, _model, agents, _clock = make_broker(tmp_path)
    agents.busy.add(("work", "consumer"))

    async def main():
        answer = await broker.lease("work", "sys-gpu", REQUEST)
        lease = await broker.revoke(answer.lease, "revoked by admin")
        assert lease.state == State.REVOKING
        assert broker.registry.provider_pages("sys-gpu") == 3
        await asyncio.sleep(0.05)  # retried with backoff, still busy
        assert agents.revokes(lease.id).count(("work", "consumer")) >= 2
        assert ("sys-gpu", "provider") not in agents.revokes(lease.id)
        agents.busy.clear()
        for _ in range(50):
            await asyncio.sleep(0.01)
            if broker.registry.get(lease.id).state == State.REVOKED:
                break
        return lease.id

    lease_id = run(main())
    assert broker.registry.get(lease_id).state == State.REVOKED
    order = agents.revokes(lease_id)
    assert order[-2:] == [("work", "consumer"), ("sys-gpu", "provider")]
    assert broker.registry.provider_pages("sys-gpu") == 0


def test_consumer_release_during_a_revocation_finishes_it(tmp_path):
    """The consumer lets go after answering busy: its GpuRelease is the
    let-go the revocation waits for (not a not-active refusal), the lease
    ends at once, not at the next retry; a release after the end is Ok."""
    broker, _model, agents, _clock = make_broker(tmp_path)
    broker._retry_base = 60.0  # no retry could end it inside this test
    agents.busy.add(("work", "consumer"))

    async def main():
        answer = await broker.lease("work", "sys-gpu", REQUEST)
        lease = await broker.revoke(answer.lease, "revoked by admin")
        assert lease.state == State.REVOKING
        agents.busy.clear()
        lease = await broker.release("work", answer.lease)
        assert lease.state == State.REVOKED
        assert (await broker.release("work", answer.lease)).state \
            == State.REVOKED
        return lease.id

    lease_id = run(main())
    assert agents.revokes(lease_id)[-2:] == [("work", "consumer"),
                                             ("sys-gpu", "provider")]
    assert broker.registry.provider_pages("sys-gpu") == 0


@pytest.mark.parametrize("dead", ["provider", "consumer"])
def test_an_agent_that_is_not_there_is_no_release(tmp_path, dead):
    """No answer is no release (issue 13): the lease stays revoking with
    its budget held and the reason visible, retried with backoff, until
    the side confirms or qubesd says its qube halted."""
    broker, model, _agents, _clock = make_broker(tmp_path)
    qube = {"provider": "sys-gpu", "consumer": "work"}[dead]
    answer = run(broker.lease("work", "sys-gpu", REQUEST))
    scripted = broker.facts._service_handler

    async def handler(target, service, payload):
        if target == qube:
            raise ServiceCallError(f"no agent in {qube}")
        return await scripted(target, service, payload)
    broker.facts._service_handler = handler

    async def main():
        lease = await broker.revoke(answer.lease, "revoked by admin")
        assert lease.state == State.REVOKING
        assert broker.registry.provider_pages("sys-gpu") == 3
        assert f"no agent in {qube}" in broker.retries.waiting(lease.id)
        await asyncio.sleep(0.1)  # retried meanwhile, still nobody there
        assert broker.registry.get(lease.id).state == State.REVOKING
        model.stop(qube)  # the next retry hears from qubesd it is halted
        for _ in range(300):
            await asyncio.sleep(0.01)
            if not broker.registry.get(lease.id).live:
                break
        return broker.registry.get(lease.id)

    lease = run(main())
    assert lease.state == State.REVOKED
    assert broker.registry.provider_pages("sys-gpu") == 0
    assert broker.retries.waiting(lease.id) is None


def test_shutdown_of_the_consumer_skips_it(tmp_path):
    broker, model, agents, _clock = make_broker(tmp_path)

    async def main():
        follower = Follower(broker)
        runner = asyncio.create_task(follower.run())
        await follower.ready.wait()
        answer = await broker.lease("work", "sys-gpu", REQUEST)
        model.stop("work")
        for _ in range(100):
            await asyncio.sleep(0.01)
            if not broker.registry.get(answer.lease).live:
                break
        runner.cancel()
        return answer.lease

    lease_id = run(main())
    assert broker.registry.get(lease_id).state == State.REVOKED
    assert agents.revokes(lease_id) == [("sys-gpu", "provider")]


def test_ttl_expiry(tmp_path):
    broker, _model, agents, clock = make_broker(tmp_path)

    async def main():
        answer = await broker.lease("work", "sys-gpu", REQUEST)
        assert await broker.expire_due() == []
        clock.now += 61
        (lease,) = await broker.expire_due()
        return lease, answer.lease

    lease, lease_id = run(main())
    assert lease.state == State.EXPIRED
    assert agents.revokes(lease_id) == [("work", "consumer"),
                                        ("sys-gpu", "provider")]


def test_offer_exports_on_the_connection_and_delivers(tmp_path):
    broker, _model, agents, _clock = make_broker(tmp_path)
    asked = []

    async def export(request):
        asked.append(request)
        return GrantRefs.from_ints(range(request.meta.pages))

    spec = ImageSpec(64, 64, "XR24", 0)
    answer = run(broker.offer("work", "personal", OfferRequest(spec, 60),
                              export))
    assert asked[0].consumer == "personal"
    (delivered,) = [m for q, n, m in agents.calls if n == "qubes.GpuDeliver"]
    assert delivered == answer and answer.mode == ReceiveMode.CPU
    lease = broker.registry.get(answer.lease)
    assert (lease.consumer, lease.provider, lease.state) == (
        "personal", "work", State.ACTIVE)


def test_refused_delivery_revokes_the_provider_side(tmp_path):
    broker, _model, agents, _clock = make_broker(tmp_path)
    agents.deliver_answer = lambda q, a: reply.error_reply("full")

    async def export(request):
        return GrantRefs.from_ints(range(request.meta.pages))

    with pytest.raises(Refused) as refused:
        run(broker.offer("work", "personal",
                         OfferRequest(BlobSpec(PAGE), 60), export))
    assert refused.value.code == "delivery-failed"
    (lease,) = broker.registry.leases()
    assert lease.state == State.FAILED
    assert agents.revokes(lease.id) == [("work", "provider")]


async def _reconciled(broker):
    """What the follower does at start (broker/follow.py)."""
    await broker.finish_in_flight()
    await broker.recheck("reconciled at broker start")
    await broker.idle()


def test_reconcile_after_a_crash(tmp_path):
    broker, model, agents, _clock = make_broker(tmp_path)

    async def setup():
        ids = [(await broker.lease("work", "sys-gpu", REQUEST)).lease
               for _ in range(3)]
        registry = broker.registry
        registry.transition(ids[0], State.RELEASING, "released by consumer")
        # a lease left exporting: recorded but never answered
        return ids

    ids = run(setup())
    stuck = broker.registry.leases(state=State.ACTIVE)[-1]
    broker.registry.close()
    model.stop("personal")  # irrelevant qube
    # restart: a new broker over the same file; work restarted meanwhile
    broker2, _m, agents2, _c = make_broker(tmp_path)
    broker2.facts.stop("work")
    broker2.facts.start("work")
    run(_reconciled(broker2))
    states = {i: broker2.registry.get(i).state for i in ids}
    assert states[ids[0]] == State.RELEASED
    assert states[stuck.id] == State.REVOKED
    assert broker2.registry.provider_pages("sys-gpu") == 0
    # the restarted consumer is a new domain: only providers were asked
    assert {role for _q, role in agents2.revokes(stuck.id)} == {"provider"}


def test_an_admin_revoke_answers_while_an_agent_hangs(tmp_path):
    """``qvm-gpu-share revoke`` waits for a hung agent no longer than its
    wait: it answers with the lease as it is (revoking, asking whom) and
    the broker goes on ending it (found by the hostile-consumer suite: the
    admin's answer came after the agent's 30 s deadline)."""
    broker, _model, _agents, _clock = make_broker(
        tmp_path, timeouts=Timeouts(1, 1, 30))
    answer = run(broker.lease("work", "sys-gpu", REQUEST))
    scripted = broker.facts._service_handler

    async def handler(target, service, payload):
        if target == "work":
            await asyncio.sleep(3600)  # never answers
        return await scripted(target, service, payload)
    broker.facts._service_handler = handler

    async def main():
        api = AdminApi(broker)
        start = asyncio.get_running_loop().time()
        reply_ = await api.handle({"op": "revoke", "qube": "work",
                                   "wait": 0.2})
        took = asyncio.get_running_loop().time() - start
        with pytest.raises(AdminError, match="wait is 0 to 60"):
            await api.handle({"op": "revoke", "qube": "work", "wait": 61})
        broker.close()
        return reply_, took

    reply_, took = run(main())
    (lease,) = reply_["leases"]
    assert took < 1.0
    assert lease["id"] == answer.lease and lease["state"] == "revoking"
    assert lease["waiting"] == "asking consumer work to let go"
    assert broker.registry.provider_pages("sys-gpu") == 3

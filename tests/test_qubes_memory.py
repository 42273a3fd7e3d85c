"""The in-memory Qubes model: loading, life cycle, events, service calls."""

import asyncio
import json

import pytest

from qubes_gpu_share.qubes.facts import QubesFacts, ServiceCallError
from qubes_gpu_share.qubes.facts import QubesFactsError
from qubes_gpu_share.qubeinfo import (EventKind, PowerState, QubeEvent,
                                        ServiceResult)
from qubes_gpu_share.qubes.memory import MemoryQubes

MODEL = {"qubes": [
    {"name": "sys-gpu", "running": True, "virt_mode": "hvm",
     "services": ["gpu-share-provider"]},
    {"name": "work", "running": True, "xid": 7, "virt_mode": "pv",
     "services": ["gpu-share"], "features": {"gpu-share-quota-leases": "4"},
     "tags": ["gpu"]},
    {"name": "vault", "klass": "AppVM"},
    {"name": "dom0", "features": {"gpu-share-dom0": "1"}},
]}


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "qubes.json"
    path.write_text(json.dumps(MODEL))
    return MemoryQubes.from_file(str(path))


def test_is_a_qubes_facts(model):
    assert isinstance(model, QubesFacts)


def test_loaded_facts(model):
    work = model.qube("work")
    assert (work.running, work.xid, work.virt_mode, work.klass) == \
        (True, 7, "pv", "AppVM")
    assert work.services == {"gpu-share"}
    assert work.features["gpu-share-quota-leases"] == "4"
    assert work.tags == {"gpu"}
    gpu = model.qube("sys-gpu")
    assert gpu.xid > 0 and gpu.xid != 7 and gpu.services == \
        {"gpu-share-provider"}
    vault = model.qube("vault")
    assert (vault.running, vault.xid) == (False, -1)


def test_dom0_always_present(model):
    dom0 = model.qube("dom0")
    assert (dom0.klass, dom0.xid, dom0.is_pv, dom0.running) == \
        ("AdminVM", 0, True, True)
    assert dom0.features["gpu-share-dom0"] == "1"
    assert MemoryQubes().qube("dom0").is_dom0
    assert MemoryQubes.from_dict({"qubes": []}).qube("dom0").running


def test_unknown_qube(model):
    assert model.qube("nope") is None


@pytest.mark.parametrize("bad", [
    [],
    {"qubes": [{"running": True}]},
    {"qubes": [{"name": "a", "colour": "red"}]},
    {"qubes": [{"name": "a", "running": "yes"}]},
    {"qubes": [{"name": "a", "xid": True, "running": True}]},
    {"qubes": [{"name": "a", "running": False, "xid": 3}]},
    {"qubes": [{"name": "a", "running": True, "xid": -1}]},
    {"qubes": [{"name": "a", "features": {"x": 1}}]},
    {"qubes": [{"name": "a", "services": [1]}]},
    {"qubes": [{"name": "a", "virt_mode": "kvm"}]},
    {"qubes": [{"name": "-bad"}]}])
def test_strict_loader(bad):
    with pytest.raises(ValueError):
        MemoryQubes.from_dict(bad)


def test_start_stop_emit_events_and_change_xid(model):
    async def scenario():
        stream = model.events()
        model.start("vault")
        first_xid = model.qube("vault").xid
        model.stop("vault")
        model.start("vault")
        seen = [await stream.__anext__() for _ in range(5)]
        await stream.aclose()
        return first_xid, seen, [e async for e in stream]

    first_xid, seen, after_close = asyncio.run(scenario())
    assert first_xid > 0 and model.qube("vault").xid not in (-1, first_xid)
    assert seen == [QubeEvent(EventKind.CONNECTED),
                    QubeEvent(EventKind.START, "vault"),
                    QubeEvent(EventKind.PRE_SHUTDOWN, "vault"),
                    QubeEvent(EventKind.SHUTDOWN, "vault"),
                    QubeEvent(EventKind.START, "vault")]
    assert after_close == []


def test_two_streams_both_see_events_closed_one_does_not(model):
    async def scenario():
        one, two = model.events(), model.events()
        await one.aclose()
        model.stop("work")
        assert (await two.__anext__()).kind is EventKind.CONNECTED
        return await two.__anext__(), [e async for e in one]

    event, rest = asyncio.run(scenario())
    assert event == QubeEvent(EventKind.PRE_SHUTDOWN, "work")
    assert rest == []


def test_start_running_or_stop_halted_is_an_error(model):
    with pytest.raises(ValueError):
        model.start("work")
    with pytest.raises(ValueError):
        model.stop("vault")
    with pytest.raises(ValueError):
        model.stop("dom0")


def test_set_feature(model):
    model.set_feature("vault", "service.gpu-share", "1")
    assert model.qube("vault").services == {"gpu-share"}
    model.set_feature("vault", "service.gpu-share", None)
    assert model.qube("vault").services == frozenset()


def _model_with(handler):
    return MemoryQubes.from_dict(MODEL, service_handler=handler)


def test_call_service_delegates():
    calls = []

    async def handler(qube, service, payload):
        calls.append((qube, service, payload))
        return 3, b"answer"

    model = _model_with(handler)
    result = asyncio.run(model.call_service(
        "work", "qubes.GpuDeliver+x", b"in", max_output=10, timeout=1))
    assert result == ServiceResult(3, b"answer")
    assert calls == [("work", "qubes.GpuDeliver+x", b"in")]


def test_call_service_bounds_and_errors():
    async def chatty(qube, service, payload):
        return 0, b"x" * 11

    async def slow(qube, service, payload):
        await asyncio.sleep(10)

    async def call(model, qube="work", service="qubes.GpuExport", **kw):
        return await model.call_service(qube, service, b"", **kw)

    model = _model_with(chatty)
    assert asyncio.run(call(model, max_output=11, timeout=1)).output == \
        b"x" * 11
    with pytest.raises(ServiceCallError, match="more than 10 bytes"):
        asyncio.run(call(model, max_output=10, timeout=1))
    with pytest.raises(ServiceCallError, match="not running"):
        asyncio.run(call(model, qube="vault", max_output=10, timeout=1))
    with pytest.raises(ServiceCallError, match="did not answer"):
        asyncio.run(call(_model_with(slow), max_output=10, timeout=0.05))
    with pytest.raises(ValueError):
        asyncio.run(call(model, service="bad service", max_output=10,
                         timeout=1))
    with pytest.raises(ServiceCallError, match="no qrexec router"):
        asyncio.run(call(MemoryQubes.from_dict(MODEL), max_output=10,
                         timeout=1))


def test_every_start_is_a_new_run_and_xids_are_not_shared(model):
    model.start("vault")
    first = model.qube("vault").domain
    model.stop("vault")
    assert model.qube("vault").domain is None
    assert model.qube("vault").gone_from(first)
    model.start("vault", xid=first.xid)  # the same id again: another run
    second = model.qube("vault").domain
    assert second.xid == first.xid and second.start != first.start
    assert not second.same_run(first) and model.qube("vault").gone_from(first)
    with pytest.raises(ValueError, match="in use"):
        model.stop("vault")
        model.start("vault", xid=model.qube("work").xid)


@pytest.mark.parametrize("power", [PowerState.PAUSED, PowerState.CRASHED,
                                   PowerState.DYING, PowerState.UNKNOWN])
def test_a_state_with_a_domain_is_not_gone(model, power):
    run = model.qube("work").domain
    model.set_power("work", power)
    info = model.qube("work")
    assert info.domain == run and not info.gone_from(run)
    assert not info.running
    model.set_power("work", PowerState.HALTED)
    assert model.qube("work").gone_from(run)


def test_events_lost_while_broken_then_connected_again(model):
    async def scenario():
        stream = model.events()
        assert (await stream.__anext__()).kind is EventKind.CONNECTED
        model.break_events("reset by peer")
        model.stop("work")             # nobody hears this
        model.restore_events()
        model.start("vault")
        return [await stream.__anext__() for _ in range(3)]

    lost, back, start = asyncio.run(scenario())
    assert lost == QubeEvent(EventKind.LOST, detail="reset by peer")
    assert back == QubeEvent(EventKind.CONNECTED)
    assert start == QubeEvent(EventKind.START, "vault")


def test_queries_can_fail_like_qubesd(model):
    model.query_error = "qubesd is restarting"
    with pytest.raises(QubesFactsError, match="restarting"):
        model.qube("work")
    assert model.peek("work").running

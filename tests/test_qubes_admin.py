"""AdminQubes through Qubes' own qubesadmin (no hand-made fakes of it).

Two ways: qubesadmin's MockQubes answers Admin API calls exactly as its
authors recorded qubesd's answers (the formats), and qubesadmin's real
client (QubesLocal, EventsDispatcher) talks over a Unix socket to the
project's stand-in qubesd (simsys/qubesd.py), where connections can break,
in the middle of an event too, and the broker runs on top (issue 13:
events lost and back, through qubesadmin's own dispatcher).

Skipped without qubesadmin (see tests/conftest.py for how to get it).
"""

import asyncio
import importlib
import time

import pytest

from qubes_gpu_share.broker.refusal import Refused
from qubes_gpu_share.broker.follow import Follower
from qubes_gpu_share.formats import BlobSpec, ReceiveMode
from qubes_gpu_share.lease import State
from qubes_gpu_share.protocol import LeaseRequest
from qubes_gpu_share.qubes.facts import QubesFactsError, ServiceCallError
from qubes_gpu_share.qubeinfo import EventKind, PowerState, ServiceResult
from qubes_gpu_share.qubes.memory import MemoryQubes
from qubes_gpu_share.simsys.qubesd import served

from test_broker_support import ScriptedAgents, make_broker

pytestmark = pytest.mark.qubes

NOT_FOUND = b"2\x00QubesFeatureNotFoundError\x00\x00%s\x00"


@pytest.fixture
def mock_app(qubesadmin):
    return importlib.import_module("qubesadmin.tests.mock_app")


@pytest.fixture
def app(mock_app):
    app = mock_app.MockQubes()
    mock_app.MockQube(
        "work", app, running=True, xid=7, virt_mode="pv", tags=["gpu"],
        start_time="1718034567.12",
        features={"service.gpu-share": "1", "service.gpu-share-provider": "",
                  "gpu-share-quota-pages": "100", "gui": "1"})
    # halted; the mock's xid would say '2' unless told, qubesd says -1
    mock_app.MockQube("vault", app, running=False, xid=-1,
                      virt_mode="hvm")
    app.update_vm_calls()
    return app


@pytest.fixture
def facts(app):
    from qubes_gpu_share.qubes.admin import AdminQubes
    return AdminQubes(app)


# -- qubesd's answer formats, as qubesadmin's mock records them -------------

def test_running_qube(facts):
    work = facts.qube("work")
    assert (work.klass, work.power, work.xid, work.virt_mode, work.start) \
        == ("AppVM", PowerState.RUNNING, 7, "pv", "1718034567.12")
    assert isinstance(work.xid, int)


def test_services_from_features(facts):
    work = facts.qube("work")
    assert work.services == {"gpu-share"}  # '' means off
    # only the features this service reads are fetched
    assert dict(work.features) == {"service.gpu-share": "1",
                                   "service.gpu-share-provider": "",
                                   "gpu-share-quota-pages": "100"}


def test_tags(facts):
    assert facts.qube("work").tags == {"gpu"}
    assert facts.qube("vault").tags == frozenset()


def test_halted_qube_has_no_domain(facts):
    vault = facts.qube("vault")
    assert (vault.running, vault.xid, vault.virt_mode, vault.domain) == \
        (False, -1, "hvm", None)


def test_halted_qube_xid_not_trusted_from_property(mock_app):
    from qubes_gpu_share.qubes.admin import AdminQubes
    app = mock_app.MockQubes()
    mock_app.MockQube("old", app, running=False)  # xid property '2'
    app.update_vm_calls()
    assert AdminQubes(app).qube("old").xid == -1


def test_dom0(facts, app):
    dom0 = facts.qube("dom0")
    assert (dom0.klass, dom0.xid, dom0.virt_mode, dom0.running) == \
        ("AdminVM", 0, "pv", True)
    assert dom0.is_dom0 and dom0.is_pv
    # no List (to dom0 it lists every qube) and no properties asked
    assert not [c for c in app.actual_calls if c[0] == "dom0"
                and c[1] in ("admin.vm.List", "admin.vm.property.GetAll")]


def test_unknown_qube(facts, app):
    # what qubesd answers for a qube it does not have
    app.expected_calls[("nope", "admin.vm.List", None, None)] = \
        b"2\x00QubesVMNotFoundError\x00\x00No such domain: %s\x00nope\x00"
    assert facts.qube("nope") is None


def test_feature_missing_when_read(facts, app):
    # listed, then deleted before the Get: qubesd answers "not found"
    app.expected_calls[("work", "admin.vm.feature.List", None, None)] = \
        b"0\x00gpu-share-max-ttl\nservice.gpu-share\n"
    app.expected_calls[("work", "admin.vm.feature.Get",
                        "gpu-share-max-ttl", None)] = \
        NOT_FOUND % b"gpu-share-max-ttl"
    assert dict(facts.qube("work").features) == {"service.gpu-share": "1"}


def test_qubesd_error_is_one_clean_error(facts, app):
    # e.g. the broker's Admin API policy does not allow feature.List
    app.expected_calls[("work", "admin.vm.feature.List", None, None)] = \
        b"2\x00QubesDaemonAccessError\x00\x00Got empty response\nfrom\x00"
    with pytest.raises(QubesFactsError) as err:
        facts.qube("work")
    assert "QubesDaemonAccessError" in str(err.value)
    assert "work" in str(err.value) and "\n" not in str(err.value)


# -- qubesadmin's real client over a socket ---------------------------------

MODEL = {"qubes": [
    {"name": "sys-gpu", "running": True, "virt_mode": "hvm",
     "services": ["gpu-share-provider"]},
    {"name": "work", "running": True, "services": ["gpu-share"],
     "features": {"gpu-share-quota-pages": "100"}},
]}


@pytest.fixture
def local_app(qubesadmin, tmp_path, monkeypatch):
    """qubesadmin's QubesLocal, connecting to the stand-in's socket."""
    import qubesadmin.app
    import qubesadmin.config
    path = str(tmp_path / "qubesd.sock")
    monkeypatch.setattr(qubesadmin.config, "QUBESD_SOCKET", path)
    monkeypatch.setattr(qubesadmin.config, "QUBESD_RECONNECT_DELAY", 0.05)
    return path, qubesadmin.app.QubesLocal()


def test_reads_and_snapshots_through_the_real_client(local_app):
    from qubes_gpu_share.qubes.admin import AdminQubes
    path, app = local_app
    model = MemoryQubes.from_dict(MODEL)

    async def main():
        async with served(model, path) as standin:
            facts = AdminQubes(app)
            stream = facts.events()
            assert (await asyncio.wait_for(stream.__anext__(), 5)).kind \
                is EventKind.CONNECTED
            work = await facts.describe("work")
            before = sum(standin.calls.values())
            await facts.describe("work")
            cached = sum(standin.calls.values()) - before
            model.set_feature("work", "gpu-share-quota-pages", "5")
            await asyncio.sleep(0.1)
            again = await facts.describe("work")
            domain = await facts.current_domain("work")
            await stream.aclose()
            facts.close()
            return work, cached, again, domain

    work, cached, again, domain = asyncio.run(main())
    assert work.xid == model.peek("work").xid and work.start
    assert cached == 0
    assert again.features["gpu-share-quota-pages"] == "5"
    assert domain == work.domain


@pytest.mark.parametrize("mid_event", [False, True])
def test_a_broken_events_connection_is_noticed_and_reconnected(local_app,
                                                               mid_event):
    """Through qubesadmin's own EventsDispatcher; a break in the middle
    of an event (IncompleteReadError, which its own loop lets out)
    included."""
    from qubes_gpu_share.qubes.admin import AdminQubes
    path, app = local_app
    model = MemoryQubes.from_dict(MODEL)

    async def main():
        async with served(model, path) as standin:
            standin.cut_mid_event = mid_event
            stream = AdminQubes(app).events()
            seen = [await asyncio.wait_for(stream.__anext__(), 5)]
            model.break_events("qubesd restarting")
            seen.append(await asyncio.wait_for(stream.__anext__(), 5))
            model.restore_events()
            seen.append(await asyncio.wait_for(stream.__anext__(), 10))
            model.stop("work")
            seen += [await asyncio.wait_for(stream.__anext__(), 5)
                     for _ in range(2)]
            await stream.aclose()
            return seen

    seen = asyncio.run(main())
    assert [e.kind for e in seen] == [
        EventKind.CONNECTED, EventKind.LOST, EventKind.CONNECTED,
        EventKind.PRE_SHUTDOWN, EventKind.SHUTDOWN]
    if mid_event:
        assert "IncompleteRead" in seen[1].detail


def test_the_broker_over_qubesadmin_reconciles_after_lost_events(local_app):
    """Issue 13 through qubesadmin: work shuts down while the events
    connection is down (in the middle of an event); no lease is granted
    meanwhile; when it is back, work's lease ends."""
    from qubes_gpu_share.qubes.admin import AdminQubes
    path, app = local_app
    model = MemoryQubes.from_dict(MODEL)
    broker, _m, agents, _c = make_broker(path and __import__("pathlib").Path(
        path).parent)
    request = LeaseRequest(BlobSpec(4096), ReceiveMode.CPU, 60)

    async def main():
        async with served(model, path) as standin:
            standin.cut_mid_event = True
            facts = AdminQubes(app)
            facts._service_handler = agents
            facts._call_service = lambda q, s, p, m: _scripted(agents, q, s,
                                                               p)
            broker.facts = broker.admission.facts = facts
            broker.agents._facts = facts
            follower = Follower(broker)
            runner = asyncio.create_task(follower.run())
            await asyncio.wait_for(follower.ready.wait(), 5)
            held = await broker.lease("work", "sys-gpu", request)
            model.break_events("reset")
            while broker.trusted():
                await asyncio.sleep(0.01)
            with pytest.raises(Refused) as refused:
                await broker.lease("work", "sys-gpu", request)
            model.stop("work")
            model.restore_events()
            started = time.monotonic()
            while broker.registry.get(held.lease).state != State.REVOKED:
                assert time.monotonic() - started < 10
                await asyncio.sleep(0.01)
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            broker.close()
            facts.close()
            return refused.value.code, agents.revokes(held.lease)

    code, revokes = asyncio.run(main())
    assert code == "qubes-unavailable"
    assert revokes == [("sys-gpu", "provider")]


async def _scripted(agents: ScriptedAgents, qube, service, payload):
    status, output = await agents(qube, service, payload)
    return ServiceResult(status, output)


# -- calls into qubes ----------------------------------------------------

def test_call_service_runs_qrexec_client(tmp_path, app):
    from qubes_gpu_share.qubes.admin import AdminQubes
    fake = tmp_path / "qrexec-client"
    fake.write_text('#!/bin/sh\n[ "$1 $2" = "-d work" ] || exit 99\n'
                    'printf "0\\0"; cat\n')
    fake.chmod(0o755)
    facts = AdminQubes(app, qrexec_client=str(fake))
    result = asyncio.run(facts.call_service(
        "work", "qubes.GpuDeliver+", b"refs", max_output=64, timeout=5))
    assert result == ServiceResult(0, b"0\0refs")
    with pytest.raises(ServiceCallError, match="more than 3 bytes"):
        asyncio.run(facts.call_service("work", "qubes.GpuDeliver+", b"refs",
                                       max_output=3, timeout=5))

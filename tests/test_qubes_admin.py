"""AdminQubes against Qubes' own qubesadmin test app (no hand-made fakes).

MockQubes answers every Admin API call exactly as qubesd would, errors
included; see ../shared/vendor/README.md for its documented quirks.
"""

import asyncio
import importlib

import pytest

from qubes_gpu_share.qubes.facts import QubesFactsError, ServiceCallError
from qubes_gpu_share.qubes.info import EventKind, QubeEvent, ServiceResult

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


def test_running_qube(facts):
    work = facts.qube("work")
    assert (work.klass, work.running, work.xid, work.virt_mode) == \
        ("AppVM", True, 7, "pv")
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


def test_halted_qube_has_xid_minus_one(facts):
    vault = facts.qube("vault")
    assert (vault.running, vault.xid, vault.virt_mode) == (False, -1, "hvm")


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
    # the AdminVM has no virt_mode: asking qubesd would fail, we did not
    assert ("dom0", "admin.vm.property.Get", "virt_mode", None) \
        not in app.actual_calls


def test_unknown_qube(facts):
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
    assert "work" in str(err.value) and "\n" not in str(err.value)


def test_events_dispatched_to_stream(mock_app, app):
    from qubes_gpu_share.qubes.admin import AdminQubes
    made = []

    def factory(qapp, **kwargs):
        dispatcher = mock_app.MockAsyncDispatcher(qapp, **kwargs)
        for subject, event in (("work", "domain-pre-shutdown"),
                               ("work", "domain-shutdown"),
                               ("work", "domain-feature-set:x"),
                               ("vault", "domain-start")):
            dispatcher.add_expected_event(mock_app.MockEvent(subject, event))
        made.append(dispatcher)
        return dispatcher

    async def scenario():
        stream = AdminQubes(app, dispatcher_factory=factory).events()
        seen = [await asyncio.wait_for(stream.__anext__(), 5)
                for _ in range(3)]
        await stream.aclose()
        return seen

    assert asyncio.run(scenario()) == [
        QubeEvent(EventKind.PRE_SHUTDOWN, "work"),
        QubeEvent(EventKind.SHUTDOWN, "work"),
        QubeEvent(EventKind.START, "vault")]
    assert made[0].app.cache_enabled is False  # facts stay fresh


def call(facts, qube="work", service="qubes.GpuDeliver+abc", payload=b"",
         max_output=64):
    return asyncio.run(facts.call_service(qube, service, payload,
                                          max_output=max_output, timeout=5))


def test_call_service_feeds_input_and_reads_output(facts, app):
    app.expected_service_calls[("work", "qubes.GpuDeliver+abc")] = b"ok\n"
    assert call(facts, payload=b"refs") == ServiceResult(0, b"ok\n")
    dest, service, kwargs = app.service_calls[0]
    assert (dest, service, kwargs["autostart"]) == \
        ("work", "qubes.GpuDeliver+abc", False)  # never starts a qube
    assert app.service_calls[1] == ("work", "qubes.GpuDeliver+abc", b"refs")


def test_call_service_output_bounded(facts, app):
    app.expected_service_calls[("work", "qubes.GpuDeliver+abc")] = b"x" * 65
    with pytest.raises(ServiceCallError, match="more than 64 bytes"):
        call(facts)


def test_call_service_unknown_qube(facts):
    with pytest.raises(ServiceCallError, match="no qube nope"):
        call(facts, qube="nope")


def test_only_admin_module_imports_qubesadmin():
    import ast
    import pathlib

    import qubes_gpu_share
    root = pathlib.Path(qubes_gpu_share.__file__).parent
    importers = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names]
                     if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom)
                     and node.level == 0 else [])
            if any(n.split(".")[0] == "qubesadmin" for n in names):
                importers.add(path.relative_to(root).as_posix())
    assert importers == {"qubes/admin.py"}

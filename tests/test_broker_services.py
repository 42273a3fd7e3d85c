"""The broker's qrexec socket services over real Unix sockets, with the
descriptors qrexec writes: answers, refusals, and no state change on bad
input."""

from __future__ import annotations

import asyncio

import pytest

from qubes_gpu_share import protocol
from qubes_gpu_share.broker import audit
from qubes_gpu_share.broker.services import BrokerServices
from qubes_gpu_share.formats import BlobSpec, ReceiveMode
from qubes_gpu_share.protocol import (
    ExportAnswer, ExportRequest, GrantRefs, LeaseAnswer, LeaseList,
    LeaseRequest, ListRequest, OfferRequest, Ok, ReleaseRequest)
from qubes_gpu_share.qrexec import reply
from qubes_gpu_share.qrexec.descriptor import ServiceDescriptor
from qubes_gpu_share.qrexec.service import SocketServiceServer

from test_broker_support import make_broker

REQUEST = protocol.encode(LeaseRequest(BlobSpec(8192), ReceiveMode.CPU, 60))


async def _call(path, source, service, arg, *chunks, eof=True):
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(ServiceDescriptor(service, arg, source, "keyword",
                                   "adminvm").encode())
    for chunk in chunks:
        writer.write(chunk)
    if eof:
        writer.write_eof()
    out = await reader.read()
    writer.close()
    return out


def _serve(tmp_path, scenario, *, dom0=False):
    broker, model, agents, clock = make_broker(tmp_path)
    services = BrokerServices(broker)
    path = str(tmp_path / "broker.sock")

    async def main():
        handlers = services.dom0_handlers() if dom0 else services.handlers()
        async with SocketServiceServer(path, handlers):
            result = await scenario(path, broker, model)
            await broker.idle()
            return result
    return asyncio.run(main()), broker


def _answer(out, *expected):
    return protocol.decode(reply.parse_reply(out), *expected)


def _error(out):
    """A refusal: status 0 and an error message with its code."""
    return _answer(out, protocol.Error)


def test_lease_list_release_over_the_socket(tmp_path):
    async def scenario(path, broker, model):
        answer = _answer(await _call(path, "work", "qubes.GpuLease",
                                     "sys-gpu", REQUEST), LeaseAnswer)
        listed = _answer(await _call(path, "work", "qubes.GpuLeases", "",
                                     protocol.encode(ListRequest())),
                         LeaseList)
        assert [e.lease for e in listed.leases] == [answer.lease]
        done = _answer(await _call(path, "work", "qubes.GpuRelease", "",
                                   protocol.encode(ReleaseRequest(
                                       answer.lease))), Ok)
        return answer, done

    (answer, _done), broker = _serve(tmp_path, scenario)
    assert answer.provider == "sys-gpu" and len(answer.refs) == 2
    assert broker.registry.get(answer.lease).state.value == "released"


BAD_LEASE_CALLS = [
    ("garbage", "sys-gpu", b"hello"),
    ("oversized", "sys-gpu", REQUEST + b"x" * 2000),
    ("trailing", "sys-gpu", REQUEST + b"x"),
    ("wrong type", "sys-gpu", protocol.encode(ListRequest())),
    ("bad argument", "sys+gpu", REQUEST),
    ("no argument", "", REQUEST),
    ("self", "work", REQUEST),
    ("truncated", "sys-gpu", REQUEST[:-3]),
]


@pytest.mark.parametrize("what, arg, body", BAD_LEASE_CALLS,
                         ids=[c[0] for c in BAD_LEASE_CALLS])
def test_bad_lease_calls_get_one_refusal_and_change_nothing(
        tmp_path, caplog, what, arg, body):
    async def scenario(path, broker, model):
        return await _call(path, "work", "qubes.GpuLease", arg, body)

    with caplog.at_level("INFO", logger="qubes_gpu_share.audit"):
        out, broker = _serve(tmp_path, scenario)
    code = _error(out).code
    assert code in ("malformed", "same-qube")
    assert broker.registry.leases() == []
    reason = audit.quote(f"{code}: {_error(out).message} "
                         f"(qubes.GpuLease+{arg} from work)")
    assert _audit_lines(caplog) == [
        f"refused lease=- consumer=work provider={arg or '-'} "
        f"pages={2 if code == 'same-qube' else 0} reason={reason}"]


def _audit_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "qubes_gpu_share.audit"]


def test_every_refusal_has_one_audit_line(tmp_path, caplog):
    """Admission (the budget), a release of another qube's lease and a
    refused offer each leave one ``refused`` line naming what was known."""
    async def scenario(path, broker, model):
        model.set_feature("sys-gpu", "gpu-share-budget-pages", "1")
        model.set_feature("sys-gpu", "gpu-share-pair-pages", "2")
        budget = await _call(path, "work", "qubes.GpuLease", "sys-gpu",
                             REQUEST)
        release = await _call(path, "personal", "qubes.GpuRelease", "",
                              protocol.encode(ReleaseRequest("ab" * 16)))
        return budget, release

    with caplog.at_level("INFO", logger="qubes_gpu_share.audit"):
        (budget, release), _broker = _serve(tmp_path, scenario)
    lines = _audit_lines(caplog)
    assert len(lines) == 2 and all(l.startswith("refused ") for l in lines)
    assert _error(budget).code in lines[0]
    assert 'consumer=work provider=sys-gpu pages=2 reason="budget' in lines[0]
    assert lines[1].endswith('(qubes.GpuRelease+ from personal)"')
    assert "unknown-lease" in lines[1] and _error(release).code \
        == "unknown-lease"


def test_release_and_list_refuse_other_qubes_leases(tmp_path):
    async def scenario(path, broker, model):
        answer = _answer(await _call(path, "work", "qubes.GpuLease",
                                     "sys-gpu", REQUEST), LeaseAnswer)
        out = await _call(path, "personal", "qubes.GpuRelease", "",
                          protocol.encode(ReleaseRequest(answer.lease)))
        listed = _answer(await _call(path, "personal", "qubes.GpuLeases",
                                     "", protocol.encode(ListRequest())),
                         LeaseList)
        arg = await _call(path, "work", "qubes.GpuRelease", "x",
                          protocol.encode(ReleaseRequest(answer.lease)))
        return answer, out, listed, arg

    (answer, out, listed, arg), broker = _serve(tmp_path, scenario)
    assert _error(out).code == "unknown-lease"
    assert _error(arg).code == "malformed"
    assert listed.leases == ()
    assert broker.registry.get(answer.lease).state.value == "active"


async def _offer(path, source, consumer, answer_export):
    """The offering qube's side of the conversation."""
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(ServiceDescriptor("qubes.GpuOffer", consumer, source,
                                   "keyword", "adminvm").encode())
    writer.write(protocol.encode(OfferRequest(BlobSpec(8192), 60)))
    status = await reader.readexactly(2)
    assert status == reply.OK_PREFIX
    header = await reader.readuntil(b"\n\n")
    request = protocol.decode(header, ExportRequest, protocol.Error)
    if isinstance(request, protocol.Error):
        return header, None
    writer.write(answer_export(request))
    out = await reader.read()
    writer.close()
    return out, request


def test_offer_conversation(tmp_path):
    async def scenario(path, broker, model):
        return await _offer(path, "work", "personal", lambda r: protocol.encode(
            ExportAnswer(GrantRefs.from_ints(range(r.meta.pages)))))

    (out, request), broker = _serve(tmp_path, scenario)
    answer = protocol.decode(out, LeaseAnswer)
    assert answer.lease == request.lease and request.consumer == "personal"
    assert broker.registry.get(answer.lease).state.value == "active"


def test_offer_with_a_bad_export_answer_fails_cleanly(tmp_path):
    async def scenario(path, broker, model):
        return await _offer(path, "work", "personal",
                            lambda r: protocol.encode(ExportAnswer(
                                GrantRefs.from_ints(range(5)))))

    (out, _request), broker = _serve(tmp_path, scenario)
    error = protocol.decode(out, protocol.Error)
    assert error.code == "export-failed"
    (lease,) = broker.registry.leases()
    assert lease.state.value == "failed"


def test_offer_refused_before_export(tmp_path):
    async def scenario(path, broker, model):
        return await _offer(path, "personal", "work", None)

    (out, request), broker = _serve(tmp_path, scenario)
    assert request is None
    assert protocol.decode(out, protocol.Error).code == "service-disabled"
    assert broker.registry.leases() == []


def test_dom0_socket_refuses_unless_opted_in(tmp_path):
    async def scenario(path, broker, model):
        first = await _call(path, "work", "qubes.GpuLeases", "",
                            protocol.encode(ListRequest()))
        model.set_feature("dom0", "gpu-share-dom0", "1")
        second = await _call(path, "work", "qubes.GpuLeases", "",
                             protocol.encode(ListRequest()))
        return first, second

    (first, second), _broker = _serve(tmp_path, scenario, dom0=True)
    assert _error(first).code == "dom0-not-allowed"
    assert _answer(second, LeaseList).leases == ()

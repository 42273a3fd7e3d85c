"""The simulated qrexec: policy first, then the same bytes qrexec writes."""

import asyncio
import contextlib

import pytest

from qubes_gpu_share.qrexec import call, reply, stream
from qubes_gpu_share.qrexec.policy_eval import SubsetPolicy
from qubes_gpu_share.qrexec.router import Router
from qubes_gpu_share.qrexec.service import SocketServiceServer

POLICY = """\
qubes.GpuLease  +sys-gpu  @tag:gpu-share  @adminvm  allow
qubes.GpuOffer  +sys-gpu  work            @adminvm  allow
qubes.GpuLeases *         work            @adminvm  ask default_target=@adminvm
qubes.GpuLease  *         @anyvm          *         deny
"""


async def _describe(descriptor, reader, writer):
    """Answers with the descriptor it got and the body it read."""
    body = await stream.read_to_eof(reader, 1 << 20)
    writer.write(reply.ok_reply(descriptor.encode() + body))


async def _offer(descriptor, reader, writer):
    request = await stream.read_message(reader, 64)
    writer.write(b"export-request " + request + b"\n")
    await writer.drain()
    answer = await stream.read_message(reader, 64)
    writer.write(reply.ok_reply(b"lease for " + answer))


@pytest.fixture
def system(tmp_path):
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "50-test.policy").write_text(POLICY)
    dirs = {q: tmp_path / q for q in ("dom0", "work", "sys-gpu", "other")}
    for d in dirs.values():
        d.mkdir()
    return tmp_path, dirs


@contextlib.asynccontextmanager
async def _serving(dirs):
    servers = [
        SocketServiceServer(dirs["dom0"] / "qubes.GpuLease",
                            {"qubes.GpuLease": _describe}),
        SocketServiceServer(dirs["dom0"] / "qubes.GpuOffer",
                            {"qubes.GpuOffer": _offer}),
        SocketServiceServer(dirs["dom0"] / "qubes.GpuLeases",
                            {"qubes.GpuLeases": _describe}),
        # NAME+ARG wins over NAME, as in qrexec's lookup
        SocketServiceServer(dirs["sys-gpu"] / "qubes.GpuExport",
                            {"qubes.GpuExport": _describe}),
        SocketServiceServer(dirs["sys-gpu"] / "qubes.GpuRevoke+special",
                            {"qubes.GpuRevoke": _offer}),
    ]
    async with contextlib.AsyncExitStack() as stack:
        for server in servers:
            await stack.enter_async_context(server)
        yield


def _router(system, **kwargs):
    tmp_path, dirs = system
    return Router(tmp_path / "policy", dirs,
                  tags={"work": ["gpu-share"]}, **kwargs)


def _call(router, source, target, service, payload=b"", max_output=4096):
    async def main():
        async with _serving(router.service_dirs):
            return await router.caller(source).call_service(
                target, service, payload, max_output)
    return asyncio.run(main())


@pytest.mark.parametrize("target, tail", [
    ("@adminvm", b" work keyword adminvm\0"),
    ("dom0", b" work name dom0\0"),
])
def test_allowed_call_gets_the_dom0_descriptor(system, target, tail):
    status, out = _call(_router(system), "work", target,
                        "qubes.GpuLease+sys-gpu", b"payload")
    assert status == 0
    assert reply.parse_reply(out) == b"qubes.GpuLease+sys-gpu" + tail + b"payload"


@pytest.mark.parametrize("source, service", [
    ("other", "qubes.GpuLease+sys-gpu"),      # not tagged
    ("work", "qubes.GpuLease+other"),         # another provider
    ("work", "qubes.GpuRelease+"),            # no rule at all
    ("work", "qubes.GpuLeases"),              # ask, and nobody answers
])
def test_denied_call_is_126_and_reaches_nothing(system, source, service):
    assert _call(_router(system), source, "@adminvm", service) == (126, b"")


def test_ask_with_assume_yes_goes_to_default_target(system):
    status, out = _call(_router(system, assume_yes_for_ask=True), "work",
                        "@adminvm", "qubes.GpuLeases")
    assert status == 0
    assert reply.parse_reply(out) == b"qubes.GpuLeases+ work keyword adminvm\0"


def test_dom0_calls_qubes_without_policy_and_qube_descriptor(system):
    status, out = _call(_router(system), "dom0", "sys-gpu",
                        "qubes.GpuExport", b"x")
    assert status == 0
    assert reply.parse_reply(out) == b"qubes.GpuExport+ dom0\0x"


def test_name_plus_arg_socket_is_preferred(system):
    router = _router(system)
    async def main():
        async with _serving(router.service_dirs):
            conv = await router.caller("dom0").open_service(
                "sys-gpu", "qubes.GpuRevoke+special")
            async with conv:
                await conv.send(b"one\n")
                assert await conv.read_message(64) == b"export-request one"
    asyncio.run(main())


def test_missing_service_is_127(system):
    assert _call(_router(system), "dom0", "work", "qubes.GpuExport") == (127, b"")
    with pytest.raises(call.ServiceNotFound):
        asyncio.run(call.call(_router(system).caller("dom0"), "work",
                              "qubes.GpuDeliver+", b"", 100))


def test_call_helper_maps_denial(system):
    with pytest.raises(call.PolicyDenied, match="refused by qrexec policy"):
        asyncio.run(call.call(_router(system).caller("other"), "@adminvm",
                              "qubes.GpuLease+sys-gpu", b"", 100))


def test_output_bound(system):
    with pytest.raises(call.OutputTooLong):
        _call(_router(system), "work", "@adminvm", "qubes.GpuLease+sys-gpu",
              b"y" * 5000, max_output=100)


def test_offer_conversation_over_the_router(system):
    router = _router(system)
    async def main():
        async with _serving(router.service_dirs):
            conv = await router.caller("work").open_service(
                "@adminvm", "qubes.GpuOffer+sys-gpu")
            async with conv:
                await conv.send(b"offer\n")
                question = await conv.read_message(64)
                await conv.send(b"refs\n")
                await conv.end_input()
                result = await conv.read_to_eof(64)
            return question, result, await conv.wait()
    question, result, status = asyncio.run(main())
    assert question == b"export-request offer"
    assert reply.parse_reply(result) == b"lease for refs"
    assert status == 0


def test_denied_conversation_raises_on_read(system):
    router = _router(system)
    async def main():
        conv = await router.caller("other").open_service(
            "@adminvm", "qubes.GpuOffer+sys-gpu")
        await conv.send(b"offer\n")
        await conv.read_message(64)
    with pytest.raises(call.PolicyDenied):
        asyncio.run(main())


def test_subset_evaluator_routes_the_same(system):
    tmp_path, _dirs = system
    router = _router(system, policy=SubsetPolicy.from_dir(tmp_path / "policy"))
    assert _call(router, "other", "@adminvm", "qubes.GpuLease+sys-gpu") == (126, b"")
    status, _out = _call(router, "work", "@adminvm", "qubes.GpuLease+sys-gpu")
    assert status == 0


@pytest.mark.parametrize("status, exc", [(126, call.PolicyDenied),
                                         (125, call.QrexecProblem),
                                         (127, call.ServiceNotFound)])
def test_client_vm_caller_maps_exit_statuses(tmp_path, status, exc):
    # stands in for qrexec-client-vm: checks its arguments, echoes stdin
    fake = tmp_path / "qrexec-client-vm"
    fake.write_text('#!/bin/sh\n[ "$1 $2 $3" = "-- @adminvm qubes.GpuLeases+" ] '
                    f'|| exit 99\nprintf "0\\0"; cat; exit {status}\n')
    fake.chmod(0o755)
    caller = call.ClientVmCaller(str(fake))
    assert asyncio.run(caller.call_service(
        "@adminvm", "qubes.GpuLeases+", b"in", 100)) == (status, b"0\0in")
    with pytest.raises(exc):
        asyncio.run(call.call(caller, "@adminvm", "qubes.GpuLeases+", b"", 100))

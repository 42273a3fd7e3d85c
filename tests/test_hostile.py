"""Hostile qubes against the real broker and agents (simulated system).

A qube writes straight to the broker's services (broker.sock, after the
descriptor qrexec writes for that qube), to an agent's app socket, or
serves a provider's agent.sock itself and lies in its answers. Each
attempt gets its one-line refusal and changes nothing: the registry is
the same before and after (or holds only the failed lease it caused), the
lease another qube holds stays active and granted, every budget equals
its live leases and grants, and the grant simulator saw no hazard.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os

import pytest

from hostile_peers import (ScriptedProvider, app_exchange, call_service,
                           dom0_descriptor, export_answer, qube_descriptor,
                           refusal_of)
from hostile_sim import (SMALL, SMALL_PAGES, app, assert_budgets_consistent,
                         consumer, final, provider, settle, system)
from qubes_gpu_share import client, protocol
from qubes_gpu_share import appproto
from qubes_gpu_share.formats import ImageSpec, ReceiveMode
from qubes_gpu_share.lease import State
from qubes_gpu_share.protocol import (LeaseRequest, ListRequest,
                                      ReleaseRequest, RevokeRequest, Role)
from qubes_gpu_share.qrexec import reply
from qubes_gpu_share.simsys import SimQube

HOSTILE = "work"            # the qube that misbehaves (quota: 2 leases)
VICTIM = "mail"             # holds a lease from gpu-a the whole time
EVIL = "evil-gpu"           # a provider whose agent.sock a script serves
QUOTA = 2
QUBES = [provider("gpu-a", 2),
         SimQube(EVIL, 3, "hvm", ("gpu-share-provider",), agent=False),
         consumer(HOSTILE, 10, quota=QUOTA), consumer(VICTIM, 11)]
PROVIDERS = ["gpu-a", EVIL]
LEASE_BODY = protocol.encode(LeaseRequest(ImageSpec(64, 64, "XR24"),
                                          ReceiveMode.CPU, 60))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One system for the module; VICTIM holds one lease throughout."""
    with system(tmp_path_factory.mktemp("hostile"), QUBES) as sim, \
            app(sim, VICTIM) as victim:
        held = victim.lease("gpu-a", **SMALL)
        yield sim, held.lease
        held.close()


@pytest.fixture
def sim(world):
    """The system, checked after each test: VICTIM's lease untouched,
    nothing else live, budgets and grants agree, no hazard."""
    system_, held = world
    yield system_
    settle(system_)
    [lease] = system_.live_leases()
    assert (lease.id, lease.state) == (held, State.ACTIVE)
    assert_budgets_consistent(system_, PROVIDERS,
                              {"gpu-a": SMALL_PAGES, EVIL: 0})


@pytest.fixture
def victim_lease(world):
    return world[1]


@contextlib.contextmanager
def unchanged(sim):
    """The registry is the same before and after the block."""
    before = sim.leases()
    yield
    assert sim.leases() == before


def to_broker(sim, service_with_arg: str, body: bytes,
              source: str = HOSTILE) -> bytes:
    return call_service(sim.layout.broker_socket(),
                        dom0_descriptor(source, service_with_arg), body)


def one_line_refusal(answer: bytes, code: str | None = None) -> str:
    """The refusal's message; asserts its code (when given)."""
    got, message = refusal_of(answer)
    if code is not None:
        assert got == code, message
    return message


# -- malformed bytes to the broker's services ---------------------------------

@pytest.mark.parametrize("body", [
    b"A" * (protocol.max_size_for(LeaseRequest) + 1),           # oversized
    LEASE_BODY[:len(LEASE_BODY) // 2],                          # truncated
    LEASE_BODY[:-1],                                            # truncated
    b"",                                                        # empty
    b"\xff\xfe" * 40,                                           # not ASCII
    LEASE_BODY.replace(b"qubes-gpu-share/1", b"qubes-gpu-share/9"),
    LEASE_BODY.replace(b"ttl=60", b"ttl=60\nttl=61"),           # duplicate
    LEASE_BODY.replace(b"ttl=60", b"ttl=-1"),                   # range
    LEASE_BODY.replace(b"ttl=60", b"ttl=60\nowner=dom0"),       # unknown key
    protocol.encode(ReleaseRequest("0" * 32)),                  # wrong type
], ids=["oversized", "half", "last-byte-cut", "empty", "non-ascii",
        "bad-magic", "duplicate-key", "negative", "unknown-key",
        "wrong-type"])
def test_malformed_lease_request_is_refused(sim, body):
    with unchanged(sim):
        one_line_refusal(to_broker(sim, "qubes.GpuLease+gpu-a", body),
                         "malformed")


@pytest.mark.parametrize("argument", ["..", "-rf", "gpu-a+x", "", "a" * 40,
                                      "9lives"])
def test_argument_that_is_not_a_qube_name_is_refused(sim, argument):
    with unchanged(sim):
        one_line_refusal(to_broker(sim, f"qubes.GpuLease+{argument}",
                                   LEASE_BODY), "malformed")


@pytest.mark.parametrize("argument", ["../etc/passwd", "a;reboot", "$(id)",
                                      "gpu-a b", "`id`", "a/b"])
def test_argument_with_path_or_shell_characters_is_dropped(sim, argument):
    """qrexec itself refuses these arguments (its charset); a caller that
    reaches the socket anyway gets the connection closed, nothing else."""
    descriptor = (f"qubes.GpuLease+{argument} {HOSTILE} keyword adminvm"
                  .encode() + b"\0")
    with unchanged(sim):
        assert call_service(sim.layout.broker_socket(), descriptor,
                            LEASE_BODY) == b""
    with unchanged(sim):   # and the broker still serves
        one_line_refusal(to_broker(sim, "qubes.GpuLeases", protocol.encode(
            ListRequest()) + b"x"), "malformed")


@pytest.mark.parametrize("provider_name", ["../gpu-a", "gpu-a;id", "$(id)",
                                           "gpu a"])
def test_application_naming_a_path_or_command_is_refused(sim, provider_name):
    with unchanged(sim), app(sim, HOSTILE) as hostile, \
            pytest.raises(client.ClientError) as refused:
        hostile.lease(provider_name, **SMALL)
    assert refused.value.code == "malformed"
    assert "\n" not in str(refused.value)


# -- lying about whose lease it is --------------------------------------------

def test_release_of_another_qubes_lease_is_refused(sim, victim_lease):
    with unchanged(sim):
        message = one_line_refusal(to_broker(
            sim, "qubes.GpuRelease", protocol.encode(
                ReleaseRequest(victim_lease))), "unknown-lease")
    assert HOSTILE in message


def test_list_shows_only_the_callers_own_leases(sim, victim_lease):
    with unchanged(sim):
        answer = to_broker(sim, "qubes.GpuLeases",
                           protocol.encode(ListRequest()))
        listed = protocol.decode(reply.parse_reply(answer),
                                 protocol.LeaseList)
    assert listed.leases == ()


def test_application_releasing_another_qubes_lease_is_refused(sim,
                                                              victim_lease):
    with unchanged(sim), app(sim, HOSTILE) as hostile, \
            pytest.raises(client.ClientError) as refused:
        hostile.release(victim_lease)
    # its agent refuses (held elsewhere) or asks dom0, which refuses
    assert refused.value.code in ("not-yours", "unknown-lease")


def test_qube_claiming_to_be_dom0_on_an_agent_socket_is_refused(
        sim, victim_lease):
    """A qube that reaches gpu-a's agent.sock (qrexec would never route
    it there) and asks it to revoke VICTIM's grant."""
    body = protocol.encode(RevokeRequest(victim_lease, Role.PROVIDER))
    with unchanged(sim):
        answer = call_service(sim.layout.agent_socket("gpu-a"),
                              qube_descriptor(HOSTILE, "qubes.GpuRevoke"),
                              body)
        assert one_line_refusal(answer).startswith("only dom0 may call")


# -- floods --------------------------------------------------------------------

def test_flood_over_quota_gets_exactly_the_quota(sim):
    """30 lease requests at once from a qube allowed 2: two leases, 28
    refusals, and the two end when released."""
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(
            lambda _: to_broker(sim, "qubes.GpuLease+gpu-a", LEASE_BODY),
            range(30)))
    granted = [protocol.decode(reply.parse_reply(a), protocol.LeaseAnswer,
                               protocol.Error) for a in answers]
    leases = [g.lease for g in granted if isinstance(g, protocol.LeaseAnswer)]
    refusals = [g for g in granted if isinstance(g, protocol.Error)]
    assert len(leases) == QUOTA
    assert [error.code for error in refusals] == ["quota-leases"] * 28
    for lease in leases:
        answer = to_broker(sim, "qubes.GpuRelease",
                           protocol.encode(ReleaseRequest(lease)))
        protocol.decode(reply.parse_reply(answer), protocol.Ok)
    settle(sim)
    assert {lease.state for lease in sim.leases() if lease.id in leases} \
        == {State.RELEASED}


# -- a provider that lies --------------------------------------------------------

WRONG_ANSWERS = {
    "one-ref-short": lambda r: export_answer(range(r.meta.pages - 1)),
    "one-ref-extra": lambda r: export_answer(range(r.meta.pages + 1)),
    "garbage": lambda r: reply.ok_reply(b"qubes-gpu-share/1\nrefs\n\n"),
    "no-status": lambda r: b"refs please",
    "oversized": lambda r: export_answer(range(r.meta.pages + 4096)),
}


@pytest.mark.parametrize("script", WRONG_ANSWERS.values(),
                         ids=WRONG_ANSWERS.keys())
def test_provider_answering_wrong_refs_fails_the_lease(sim, script):
    before = {lease.id for lease in sim.leases()}
    with ScriptedProvider(sim.layout.agent_socket(EVIL), script) as evil, \
            app(sim, HOSTILE) as hostile:
        with pytest.raises(client.ClientError) as refused:
            hostile.lease(EVIL, **SMALL)
        assert refused.value.code == "export-failed"
        assert "\n" not in str(refused.value)
        settle(sim)
    [failed] = [lease for lease in sim.leases() if lease.id not in before]
    assert failed.id == evil.requests[0].lease
    assert final(failed) and failed.state is not State.RELEASED
    assert sim.grant_stats(HOSTILE).mapped_pages == 0


def test_provider_answering_refs_it_does_not_own_is_not_mapped(
        sim, victim_lease):
    """Right count, but the refs are gpu-a's grant to VICTIM (and so not
    EVIL's): the consumer's agent cannot map them, refuses, releases."""
    [victim] = [lease for lease in sim.leases() if lease.id == victim_lease]
    before = {lease.id for lease in sim.leases()}
    with ScriptedProvider(sim.layout.agent_socket(EVIL),
                          lambda r: export_answer(victim.refs)), \
            app(sim, HOSTILE) as hostile:
        with pytest.raises(client.ClientError) as refused:
            hostile.lease(EVIL, **SMALL)
        assert refused.value.code == "receive-failed"
        settle(sim)
    [ended] = [lease for lease in sim.leases() if lease.id not in before]
    assert final(ended)
    assert sim.grant_stats(HOSTILE).mapped_pages == 0


# -- the application socket ------------------------------------------------------

@pytest.mark.parametrize("packet, code", [
    (b"{" + b" " * appproto.MAX_REQUEST + b"}", "malformed"),   # oversized
    (b'{"op": "lease", "provider": "gpu-a"', "malformed"),      # truncated
    (b"\x00\x01garbage", "malformed"),
    (b'{"op": "list", "op": "release"}', "malformed"),          # duplicate
    (b'{"op": "lease", "provider": "gpu-a", "fourcc": "XR24", "width": -1,'
     b' "height": 64, "mode": "cpu", "ttl": 60}', "malformed"),
    (b'{"op": "lease", "provider": "gpu-a", "fourcc": "XR24", '
     b'"width": NaN, "height": 64, "mode": "cpu", "ttl": 60}', "malformed"),
], ids=["oversized", "truncated", "garbage", "duplicate-key",
        "negative-width", "nan"])
def test_bad_application_packet_is_refused(sim, packet, code):
    with unchanged(sim):
        answer = app_exchange(sim.app_socket(HOSTILE), packet)
    assert (answer["reply"], answer["code"]) == ("error", code)
    assert "\n" not in answer["message"]


def test_application_lying_about_an_offered_buffer_size_is_refused(sim):
    """An offer whose fd is smaller than the layout it describes."""
    fd = os.memfd_create("short")
    os.ftruncate(fd, 4096)
    try:
        with unchanged(sim), app(sim, "gpu-a") as gpu, \
                pytest.raises(client.ClientError) as refused:
            gpu.offer(VICTIM, fd, **SMALL)
    finally:
        os.close(fd)
    assert refused.value.code == "size"
    assert "\n" not in str(refused.value)

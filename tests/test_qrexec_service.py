"""The socket-service server and the bounded readers, driven like qrexec."""

import asyncio
import os
import stat

import pytest
from hypothesis import given, settings, strategies as st

from qubes_gpu_share import protocol
from qubes_gpu_share.qrexec import reply, stream
from qubes_gpu_share.qrexec.service import SocketServiceServer


async def _echo(descriptor, reader, writer):
    body = await stream.read_to_eof(reader, 16)
    writer.write(reply.ok_reply(
        f"{descriptor.source} {descriptor.argument} ".encode() + body))


async def _offer(descriptor, reader, writer):
    # the offer flow's shape: request, question, answer, result
    request = await stream.read_message(reader, 64)
    writer.write(b"export " + request + b"\n")
    await writer.drain()
    answer = await stream.read_message(reader, 64)
    writer.write(reply.ok_reply(b"done " + answer))


async def _crash(descriptor, reader, writer):
    raise RuntimeError("bug")


HANDLERS = {"qubes.GpuLease": _echo, "qubes.GpuOffer": _offer,
            "qubes.GpuLeases": _crash}


async def _talk(path, *chunks, eof=True):
    reader, writer = await asyncio.open_unix_connection(path)
    for chunk in chunks:
        writer.write(chunk)
    if eof:
        writer.write_eof()
    out = await reader.read()
    writer.close()
    return out


def _run(tmp_path, coro_fn, **kwargs):
    async def main():
        path = tmp_path / "broker.sock"
        async with SocketServiceServer(path, HANDLERS, **kwargs) as server:
            return await coro_fn(server.path)
    return asyncio.run(main())


def test_dispatches_with_the_source_from_the_descriptor(tmp_path):
    out = _run(tmp_path, lambda p: _talk(
        p, b"qubes.GpuLease+sys-gpu work keyword adminvm\0", b"hello"))
    assert reply.parse_reply(out) == b"work sys-gpu hello"


def test_unknown_service_is_refused(tmp_path):
    out = _run(tmp_path, lambda p: _talk(p, b"qubes.VMShell+ work name dom0\0"))
    with pytest.raises(reply.ServiceRefused, match="not served here"):
        reply.parse_reply(out)


def test_only_source(tmp_path):
    out = _run(tmp_path, lambda p: _talk(p, b"qubes.GpuLease+ work\0"),
               only_source="dom0")
    with pytest.raises(reply.ServiceRefused, match="only dom0"):
        reply.parse_reply(out)
    out = _run(tmp_path, lambda p: _talk(p, b"qubes.GpuLease+ dom0\0"),
               only_source="dom0")
    assert reply.parse_reply(out) == b"dom0  "


@pytest.mark.parametrize("data", [
    b"qubes.GpuLease+x work keyword adminvm",          # no NUL before EOF
    b"qubes.GpuLease+x 9work\0",                        # bad source
    b"x" * 70000,                                       # over any bound
])
def test_bad_descriptor_gets_no_answer(tmp_path, data):
    assert _run(tmp_path, lambda p: _talk(p, data)) == b""


def test_silent_peer_times_out(tmp_path):
    out = _run(tmp_path, lambda p: _talk(p, b"qubes.Gpu", eof=False),
               input_seconds=0.05)
    assert out == b""


def test_body_over_bound_is_refused(tmp_path):
    out = _run(tmp_path, lambda p: _talk(
        p, b"qubes.GpuLease+ work name dom0\0", b"x" * 17))
    with pytest.raises(reply.ServiceRefused, match="more than 16 bytes"):
        reply.parse_reply(out)


def test_handler_bug_answers_internal_error(tmp_path):
    out = _run(tmp_path, lambda p: _talk(p, b"qubes.GpuLeases+ work name dom0\0"))
    with pytest.raises(reply.ServiceRefused, match="internal error"):
        reply.parse_reply(out)


def test_multi_turn_conversation(tmp_path):
    async def converse(path):
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"qubes.GpuOffer+work sys-gpu keyword adminvm\0offer-1\n")
        question = await stream.read_message(reader, 64)
        writer.write(b"refs-1\n")
        writer.write_eof()
        result = await reader.read()
        writer.close()
        return question, result
    question, result = _run(tmp_path, converse)
    assert question == b"export offer-1"
    assert reply.parse_reply(result) == b"done refs-1"


def test_socket_mode_and_stale_socket(tmp_path):
    async def mode(path):
        return stat.S_IMODE(os.stat(path).st_mode)
    assert _run(tmp_path, mode, mode=0o600) == 0o600
    assert _run(tmp_path, mode, mode=0o666) == 0o666   # stale one replaced


def test_refuses_to_replace_a_regular_file(tmp_path):
    (tmp_path / "broker.sock").write_text("not a socket")
    with pytest.raises(FileExistsError):
        _run(tmp_path, lambda p: _talk(p))


def _feed(chunks):
    reader = asyncio.StreamReader(limit=64)
    for chunk in chunks:
        reader.feed_data(chunk)
    reader.feed_eof()
    return reader


@settings(max_examples=2000)
@given(st.lists(st.binary(max_size=40), max_size=6), st.integers(0, 80))
def test_fuzz_read_to_eof(chunks, bound):
    async def main():
        return await stream.read_to_eof(_feed(chunks), bound)
    data = b"".join(chunks)
    try:
        assert asyncio.run(main()) == data and len(data) <= bound
    except stream.StreamError:
        assert len(data) > bound


@settings(max_examples=2000)
@given(st.lists(st.binary(max_size=40), max_size=6), st.integers(0, 64))
def test_fuzz_read_message(chunks, bound):
    async def main():
        return await stream.read_message(_feed(chunks), bound)
    data = b"".join(chunks)
    try:
        message = asyncio.run(main())
    except stream.StreamError:
        first = data.split(b"\n", 1)[0]
        assert b"\n" not in data or len(first) > bound
        return
    assert data.startswith(message + b"\n") and len(message) <= bound


def _length_prefixed(untrusted_prefix):
    """A framing for the tests: one length byte, then that many bytes."""
    if not untrusted_prefix:
        return None
    end = 1 + untrusted_prefix[0]
    return end if len(untrusted_prefix) >= end else None


@settings(max_examples=2000)
@given(st.lists(st.binary(max_size=40), max_size=6), st.integers(0, 80))
def test_fuzz_read_frame(chunks, bound):
    async def main():
        return await stream.read_frame(_feed(chunks), bound, _length_prefixed)
    data = b"".join(chunks)
    try:
        frame = asyncio.run(main())
    except stream.StreamError:
        end = _length_prefixed(data)
        assert end is None or end != len(data) or end > bound
        return
    assert data.startswith(frame) and len(frame) <= bound
    assert _length_prefixed(frame) == len(frame)


def test_read_frame_reads_a_dribble_in_one_buffer():
    """A message that arrives a byte at a time: the framing is asked about
    the one growing buffer each time, never a copy of it (no cost
    quadratic in the message)."""
    message = protocol.encode(protocol.ExportAnswer(
        protocol.GrantRefs.from_ints(range(1000))))
    seen = []

    def frame_length(untrusted_prefix):
        seen.append(untrusted_prefix)
        return protocol.frame_length(untrusted_prefix)

    class Dribble:
        def __init__(self):
            self.left = message

        async def read(self, n):
            byte, self.left = self.left[:1], self.left[1:]
            return byte

    async def main():
        return await stream.read_frame(Dribble(), len(message), frame_length)
    assert asyncio.run(main()) == message
    assert len(seen) == len(message) + 1  # before each byte, and after
    assert all(prefix is seen[0] for prefix in seen)


@pytest.mark.parametrize("chunks, why", [
    ([b"\x03ab"], "end of input inside a message"),
    ([b"\x02ab", b"c"], "data after the message"),
    ([b"\x09abcd"], "message over 4 bytes"),
])
def test_read_frame_refuses(chunks, why):
    async def main():
        return await stream.read_frame(_feed(chunks), 4, _length_prefixed)
    with pytest.raises(stream.StreamError, match=why):
        asyncio.run(main())


@settings(max_examples=2000)
@given(st.binary(max_size=300))
def test_fuzz_parse_reply(untrusted):
    try:
        reply.parse_reply(untrusted)
    except reply.ServiceRefused as exc:
        assert len(str(exc)) <= reply.MAX_REASON_LEN
        assert str(exc).isprintable() and str(exc).isascii()
    except reply.BadReply:
        pass


def test_error_reply_is_one_line():
    out = reply.error_reply("over budget\nsecond line\x1b[31m")
    assert out.count(b"\n") == 1
    with pytest.raises(reply.ServiceRefused, match="over budget_second line_"):
        reply.parse_reply(out)


async def _write_after_the_answer(path, payload):
    """Descriptor first; the rest only once the answer is there (the server
    decided without reading it), as a slow qrexec caller would."""
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(b"qubes.NoSuchService+ work keyword adminvm\0")
    await writer.drain()
    first = await reader.read(1)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    out = first + await reader.read()
    writer.close()
    return out


def test_an_early_answer_survives_the_callers_later_writes(tmp_path):
    out = _run(tmp_path, lambda p: _write_after_the_answer(
        p, b"x" * (512 * 1024)))
    with pytest.raises(reply.ServiceRefused, match="not served here"):
        reply.parse_reply(out)


def test_lingering_for_the_callers_input_is_bounded(tmp_path, monkeypatch):
    """A caller that never ends its input holds the connection for
    LINGER_SECONDS at most (the server's connection task is gone then)."""
    from qubes_gpu_share.qrexec import service
    monkeypatch.setattr(service, "LINGER_SECONDS", 0.2)

    async def main():
        server = SocketServiceServer(tmp_path / "broker.sock", HANDLERS)
        async with server:
            reader, writer = await asyncio.open_unix_connection(server.path)
            writer.write(b"qubes.NoSuchService+ work keyword adminvm\0more")
            answer = await asyncio.wait_for(reader.read(), 5)  # EOF after it
            lingering = len(server._connections)
            await asyncio.sleep(0.6)
            left = len(server._connections)
            writer.close()
            return answer, lingering, left
    answer, lingering, left = asyncio.run(main())
    with pytest.raises(reply.ServiceRefused, match="not served here"):
        reply.parse_reply(answer)
    assert (lingering, left) == (1, 0)


# -- bounds on what a caller can make the server hold (issue 12) -----------

def test_a_dribbled_body_is_cut_at_the_input_deadline(tmp_path):
    """One byte at a time keeps every read short; the whole input still has
    one deadline."""
    async def dribble(path):
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"qubes.GpuLease+ work name dom0\0")
        started = asyncio.get_running_loop().time()
        answer = asyncio.create_task(reader.read())
        for _ in range(100):
            if answer.done():
                break
            writer.write(b"x")
            await asyncio.sleep(0.01)
        out = await answer
        writer.close()
        return out, asyncio.get_running_loop().time() - started

    out, took = _run(tmp_path, dribble, input_seconds=0.15)
    with pytest.raises(reply.ServiceRefused, match="did not arrive in time"):
        reply.parse_reply(out)
    assert took < 0.35


async def _hold(path, source: bytes, held: list):
    """An unfinished call: descriptor sent, body never ends."""
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(b"qubes.GpuLease+ " + source + b" name dom0\0x")
    held.append((reader, writer))


def test_calls_per_source_and_in_all_are_capped(tmp_path):
    refusals = []

    async def scenario(path):
        held = []
        for _ in range(3):
            await _hold(path, b"work", held)
        await asyncio.sleep(0.05)
        # a fourth from work: refused at once, with one line
        started = asyncio.get_running_loop().time()
        fourth = await _talk(path, b"qubes.GpuLease+ work name dom0\0")
        quick = asyncio.get_running_loop().time() - started
        # another qube still gets through (in all: 3 held + 1 < 5)
        other = await _talk(path, b"qubes.GpuLease+ mail name dom0\0", b"hi")
        for _ in range(2):
            await _hold(path, b"mail", held)
        await asyncio.sleep(0.05)
        # 5 in flight now: the next one is refused, whoever calls
        full = await _talk(path, b"qubes.GpuLease+ bank name dom0\0")
        for _reader, writer in held:
            writer.close()
        return fourth, quick, other, full

    fourth, quick, other, full = _run(
        tmp_path, scenario, max_per_source=3, max_calls=5,
        on_refused=lambda d, why: refusals.append(
            (d.source if d else None, why)))
    with pytest.raises(reply.ServiceRefused, match="too many calls from work"):
        reply.parse_reply(fourth)
    assert quick < 0.5
    assert reply.parse_reply(other) == b"mail  hi"
    with pytest.raises(reply.ServiceRefused, match="too many calls at once"):
        reply.parse_reply(full)
    assert [source for source, _why in refusals] == ["work", "bank"]


def test_an_answer_nobody_reads_does_not_hold_the_call(tmp_path, monkeypatch):
    from qubes_gpu_share.qrexec import service
    monkeypatch.setattr(service, "OUTPUT_SECONDS", 0.1)

    async def big(descriptor, reader, writer):
        writer.write(reply.ok_reply(b"x" * (8 << 20)))

    async def main():
        path = tmp_path / "s.sock"
        async with SocketServiceServer(path, {"qubes.GpuLease": big}) \
                as server:
            reader, writer = await asyncio.open_unix_connection(server.path)
            writer.write(b"qubes.GpuLease+ work name dom0\0")
            writer.write_eof()
            for _ in range(100):  # never reads the answer
                await asyncio.sleep(0.01)
                if server.calls == 0:
                    break
            calls = server.calls
            writer.close()
            return calls

    assert asyncio.run(main()) == 0

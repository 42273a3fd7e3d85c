"""Hostile input: mutations of valid messages fed to every decoder.

Whatever the bytes, decode and frame_length either return a message or raise
ProtocolError with a one-line reason; nothing else may escape. A mutation
that happens to stay valid must still decode to a message that re-encodes
to something equal (no half-parsed state).
"""

import random

from hypothesis import given, settings, strategies as st

from qubes_gpu_share import protocol as p
from test_protocol import messages

MESSAGES_SEEDED = 250
MUTATIONS_PER_MESSAGE = 50


def _replace_number(data: bytes, rnd: random.Random) -> bytes:
    trick = rnd.choice([b"+1", b"01", b" 1", b"1 ", b"-0", b"0x1", b"1e9",
                        b"9" * 25, b"\xd9\xa1", b"", b"4294967296"])
    at = data.find(b"=", rnd.randrange(len(data)))
    end = data.find(b"\n", at)
    return data if at < 0 or end < 0 else data[:at + 1] + trick + data[end:]


def _header_lines(data: bytes) -> tuple[list[bytes], bytes]:
    head, sep, payload = data.partition(b"\n\n")
    return head.split(b"\n"), payload


def _edit_lines(data: bytes, rnd: random.Random) -> bytes:
    lines, payload = _header_lines(data)
    index = rnd.randrange(len(lines))
    action = rnd.randrange(5)
    if action == 0:
        lines.insert(index, lines[index])                # duplicate key
    elif action == 1:
        lines.insert(index, b"colour=blue")             # unknown key
    elif action == 2:
        del lines[index]                                 # missing key/magic
    elif action == 3:
        lines[index] = lines[index].replace(b"=", b" = ")
    else:
        rnd.shuffle(lines)
    return b"\n".join(lines) + b"\n\n" + payload


def _change_count(data: bytes, rnd: random.Random) -> bytes:
    for key in (b"refs=", b"leases=", b"pages="):
        at = data.find(b"\n" + key)
        if at >= 0:
            end = data.index(b"\n", at + 1)
            count = int(data[at + 1 + len(key):end])
            new = max(0, count + rnd.choice([-1, 1, 2**16, -count]))
            return data[:at + 1] + key + b"%d" % new + data[end:]
    return data + b"\0"


def mutate(data: bytes, rnd: random.Random) -> bytes:
    """One hostile variant of a valid message."""
    kind = rnd.randrange(12)
    at = rnd.randrange(len(data))
    if kind == 0:
        return data[:at]                                 # truncation
    if kind == 1:
        flipped = bytearray(data)
        for _ in range(rnd.randint(1, 4)):
            flipped[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
        return bytes(flipped)
    if kind == 2:
        return data[:at] + bytes([rnd.randrange(0x80, 0x100)]) + data[at + 1:]
    if kind == 3:
        return data + rnd.randbytes(rnd.randint(1, 8))   # trailing bytes
    if kind == 4:
        return data + b"A" * rnd.choice(
            [p.MAX_HEADER, max(p.MAX_SIZE.values())])   # oversize
    if kind == 5:
        return _replace_number(data, rnd)
    if kind == 6:
        return _edit_lines(data, rnd)
    if kind == 7:
        return _change_count(data, rnd)
    if kind == 8:
        return data.replace(b"\n", b"\r\n", rnd.randint(1, 3))
    if kind == 9:
        return data[:at] + data[at + 1:]                 # a byte lost
    if kind == 10:
        return data[:at] + rnd.choice([b"\0", b" ", b"\n", b"=", b"\t"]) \
            + data[at:]
    return data[:at] + data[at:at + 1] * rnd.randint(2, 300) + data[at + 1:]


def feed(untrusted_data: bytes, expected: type) -> bool:
    """True when every decoder refused the input, with a one-line reason."""
    refused = 0
    for attempt in (lambda: p.decode(untrusted_data),
                    lambda: p.decode(untrusted_data, expected, p.Error),
                    lambda: p.frame_length(untrusted_data)):
        try:
            result = attempt()
        except p.ProtocolError as exc:
            reason = str(exc)
            assert reason and "\n" not in reason and "\r" not in reason, reason
            refused += 1
            continue
        if isinstance(result, p._Message):
            assert p.decode(p.encode(result)) == result
    return refused >= 2


def test_ten_thousand_malformed_messages():
    counts = {"fed": 0, "refused": 0}

    @settings(max_examples=MESSAGES_SEEDED, derandomize=True, deadline=None,
              database=None)
    @given(messages(), st.randoms(use_true_random=False))
    def run(message, rnd):
        data = p.encode(message)
        for _ in range(MUTATIONS_PER_MESSAGE):
            untrusted = mutate(data, rnd)
            if untrusted == data:
                continue
            counts["fed"] += 1
            counts["refused"] += feed(untrusted, type(message))

    run()
    assert counts["fed"] >= 10_000, counts
    # the mutations are hostile: nearly all of them must be refused
    assert counts["refused"] >= 0.9 * counts["fed"], counts


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes(untrusted):
    feed(untrusted, p.Ok)
    feed(b"qubes-gpu-share/1\nlease-answer\n" + untrusted, p.LeaseAnswer)

"""The application protocol against hostile input (appproto.py).

An application is untrusted: whatever bytes one packet holds, decoding
either returns a request or raises AppProtocolError with a one-line
reason; nothing else escapes. Valid requests survive an encode/decode
round trip unchanged.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from qubes_gpu_share import appproto as ap
from qubes_gpu_share.formats import (BlobSpec, ImageSpec, ReceiveMode,
                                     layout_for)
from qubes_gpu_share.protocol import Role

LEASE_ID = "0123456789abcdef0123456789abcdef"
VALID = [
    {"op": "lease", "provider": "sys-gpu", "mode": "cpu", "ttl": 60,
     "fourcc": "XR24", "width": 64, "height": 64, "modifier": 0},
    {"op": "lease", "provider": "sys-gpu", "mode": "dmabuf",
     "fourcc": "BLOB", "bytes": 4096},
    {"op": "offer", "consumer": "work", "ttl": 5, "fourcc": "NV12",
     "width": 32, "height": 32},
    {"op": "next", "role": "consumer", "timeout": 3},
    {"op": "next", "role": "provider"},
    {"op": "list"},
    {"op": "release", "lease": LEASE_ID},
]


def decodes_or_refuses(data: bytes):
    """The contract: a request, or one AppProtocolError of one line."""
    try:
        return ap.decode_request(data)
    except ap.AppProtocolError as exc:
        message = str(exc)
        assert message and "\n" not in message and len(message) < 300
        return None


@pytest.mark.parametrize("obj", VALID)
def test_valid_requests_decode(obj):
    assert decodes_or_refuses(ap.encode(obj)) is not None


JSON_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40), st.sampled_from(["XR24", "BLOB", "cpu", "dmabuf",
                                           "consumer", "sys-gpu", LEASE_ID]))
JSON_VALUES = st.one_of(
    JSON_LEAVES, st.lists(JSON_LEAVES, max_size=3),
    st.dictionaries(st.text(max_size=8), JSON_LEAVES, max_size=2))
KEYS = st.sampled_from(sorted({"op", *set().union(*ap._KEYS.values()),
                               "colour", "OP", ""}))


@settings(max_examples=1500)
@given(st.dictionaries(KEYS, JSON_VALUES, max_size=8),
       st.sampled_from(sorted(ap._KEYS) + ["nope", None]))
def test_hostile_objects(obj, op):
    """Right shape, wrong values: every key of every op, any JSON value."""
    if op is not None:
        obj["op"] = op
    decodes_or_refuses(json.dumps(obj).encode())


@settings(max_examples=1500)
@given(st.sampled_from(VALID), st.data())
def test_mutated_packets(obj, data):
    """Valid packets with bytes flipped, cut, inserted or repeated."""
    packet = bytearray(ap.encode(obj))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(packet)))
        action = data.draw(st.integers(0, 3))
        if action == 0 and at < len(packet):
            packet[at] = data.draw(st.integers(0, 255))
        elif action == 1:
            del packet[at:at + data.draw(st.integers(1, 8))]
        elif action == 2:
            packet[at:at] = data.draw(st.sampled_from(
                [b'"', b",", b"{", b"}", b"[", b"1e999", b"NaN", b"\\u0000",
                 b' "op":"list"', b"\xff", b"-0", b"true"]))
        else:
            packet[at:at] = packet[at:at + 16]
    decodes_or_refuses(bytes(packet))


@settings(max_examples=500)
@given(st.binary(max_size=ap.MAX_REQUEST + 8))
def test_arbitrary_bytes(data):
    decodes_or_refuses(data)


@pytest.mark.parametrize("data, reason", [
    (b'{"op":"list","op":"list"}', "duplicate key"),
    (b'{"op":"list","x":1}', "unknown key"),
    (b'{"op":"release","lease":"' + LEASE_ID.upper().encode() + b'"}',
     "lease id"),
    (b'{"op":"lease","provider":"sys-gpu","mode":"cpu","fourcc":"XR24",'
     b'"width":true,"height":1}', "integer"),
    (b'{"op":"lease","provider":"sys-gpu","mode":"cpu","fourcc":"BLOB",'
     b'"bytes":4096,"width":1}', "does not go with"),
    (b'{"op":"lease","provider":"-x","mode":"cpu","fourcc":"BLOB",'
     b'"bytes":1}', "qube name"),
    (b'{"op":"next","role":"consumer","timeout":NaN}', "not a number"),
    (b'[' * 5000 + b']' * 5000, "over the limit"),
    (b'[' * 500 + b']' * 500, "not a JSON object"),
    (b'{"op":"list"}\n', "printable ASCII"),
    (b'{"op":"list","s":"\xc3\xa9"}', "printable ASCII"),
    (b'"list"', "not a JSON object"),
])
def test_rejections_name_the_reason(data, reason):
    with pytest.raises(ap.AppProtocolError, match=reason):
        ap.decode_request(data)


SPECS = st.one_of(
    st.builds(BlobSpec, st.integers(1, 65535 * 4096)),
    st.builds(ImageSpec, st.integers(1, 4096), st.integers(1, 4096),
              st.sampled_from(["XR24", "AR24", "NV12", "RG16"]),
              st.just(0)))


@settings(max_examples=300)
@given(SPECS, st.sampled_from(list(ReceiveMode)), st.integers(1, 3600))
def test_round_trip(spec, mode, ttl):
    """What the client encodes is what the agent decodes."""
    try:
        layout_for(spec)
    except ValueError:
        return                      # a spec the layout refuses: not valid
    request = ap.decode_request(ap.encode(
        {"op": "lease", "provider": "sys-gpu", "mode": mode.value,
         "ttl": ttl, **ap.spec_fields(spec)}))
    assert request == ap.LeaseReq("sys-gpu", spec, mode, ttl)
    offer = ap.decode_request(ap.encode(
        {"op": "offer", "consumer": "work", "ttl": ttl,
         **ap.spec_fields(spec)}))
    assert offer == ap.OfferReq("work", spec, ttl)


def test_lease_reply_round_trip_and_hostile_replies():
    info = ap.LeaseInfo(LEASE_ID, Role.CONSUMER, "sys-gpu", ReceiveMode.CPU,
                        layout_for(ImageSpec(64, 64, "XR24")), 1700000000,
                        0, 16384)
    reply = ap.load_object(ap.encode(info.to_reply()), ap.MAX_REPLY)
    assert ap.LeaseInfo.from_reply(reply) == info
    for key in ("meta", "lease", "peer", "length"):
        broken = {**reply, key: {"x": 1}}
        with pytest.raises(ap.AppProtocolError, match="bad lease reply"):
            ap.LeaseInfo.from_reply(broken)


def test_error_replies_are_one_line():
    reply = ap.error_reply("refused", "first\nsecond\x00third" + "x" * 1000)
    assert "\n" not in reply["message"] and "\x00" not in reply["message"]
    assert ap.load_object(ap.encode(reply), ap.MAX_REPLY) == reply

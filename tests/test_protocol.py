"""The wire protocol: encode/decode are inverses, and each parsing rule
refuses what it must with one ProtocolError of one line.

The strategies here (``messages()``) also seed tests/test_protocol_fuzz.py.
"""

import dataclasses

import pytest
from hypothesis import given, settings, strategies as st

from qubes_gpu_share import formats, names, protocol as p
from qubes_gpu_share.lease import State
from qubes_gpu_share.formats import (
    BLOB, MAX_LEASE_PAGES, MOD_INVALID, BlobSpec, ImageSpec, ReceiveMode,
    layout_for, linear_layout)

IMAGE_FORMATS = sorted(set(formats.FORMATS) - {BLOB})
LEASE = "0123456789abcdef0123456789abcdef"

# --- strategies ---------------------------------------------------------

lease_ids = st.binary(min_size=16, max_size=16).map(bytes.hex)
qube_names = st.from_regex(r"[a-zA-Z][a-zA-Z0-9_.-]{0,30}", fullmatch=True) \
    .filter(lambda n: n not in ("none", "default") and not n.endswith("."))
domids = st.integers(0, p.MAX_DOMID)
modes = st.sampled_from(ReceiveMode)
u32 = st.integers(0, 2**32 - 1)
texts = st.from_regex(r"[!-~]([ -~]{0,60}[!-~])?", fullmatch=True)
tokens = st.from_regex(r"[a-z][a-z0-9-]{0,39}", fullmatch=True)
modifiers = st.one_of(st.just(0), st.integers(1, 2**64 - 1)
                      .filter(lambda m: m != MOD_INVALID))


@st.composite
def image_specs(draw, max_side=4096):
    fourcc = draw(st.sampled_from(IMAGE_FORMATS))
    sub = max(plane.hsub for plane in formats.FORMATS[fourcc])
    return ImageSpec(draw(st.integers(1, max_side // sub)) * sub,
                     draw(st.integers(1, max_side // sub)) * sub,
                     fourcc, draw(modifiers))


specs = st.one_of(image_specs(),
                  st.builds(BlobSpec, st.integers(1, formats.MAX_LEASE_BYTES)))


@st.composite
def metas(draw, small=False):
    """Broker layouts, sometimes with spare pages at the end."""
    spec = draw(st.one_of(image_specs(max_side=128),
                          st.builds(BlobSpec, st.integers(1, 65536)))
                if small else specs)
    meta = layout_for(spec)
    spare = draw(st.integers(0, 3 if small else 100))
    return dataclasses.replace(
        meta, pages=min(meta.pages + spare, MAX_LEASE_PAGES))


@st.composite
def refs_for(draw, pages):
    return p.GrantRefs.from_ints(draw(st.lists(u32, min_size=pages,
                                               max_size=pages)))


@st.composite
def lease_answers(draw):
    meta = draw(metas(small=True))
    return p.LeaseAnswer(draw(lease_ids), draw(qube_names), draw(domids),
                         draw(modes), meta, draw(st.integers(0, 2**40)),
                         draw(refs_for(meta.pages)))


lease_entries = st.builds(
    p.LeaseEntry, lease_ids, st.sampled_from(p.Role), qube_names,
    st.sampled_from(State),
    st.integers(1, MAX_LEASE_PAGES), modes, st.integers(0, 2**40))


def messages():
    """Every kind of valid message."""
    return st.one_of(
        st.builds(p.LeaseRequest, specs, modes, st.integers(1, p.MAX_TTL)),
        st.builds(p.OfferRequest, specs, st.integers(1, p.MAX_TTL)),
        st.builds(p.ExportRequest, lease_ids, qube_names, domids, metas()),
        st.integers(1, 200).flatmap(refs_for).map(p.ExportAnswer),
        lease_answers(),
        st.builds(p.ReleaseRequest, lease_ids),
        st.builds(p.RevokeRequest, lease_ids, st.sampled_from(p.Role)),
        st.just(p.RevokeAnswer(p.RevokeStatus.RELEASED)),
        st.builds(p.RevokeAnswer, st.just(p.RevokeStatus.BUSY), texts),
        st.just(p.ListRequest()),
        st.lists(lease_entries, max_size=20).map(tuple).map(p.LeaseList),
        st.just(p.Ok()),
        st.builds(p.Error, tokens, texts),
    )


# --- properties ------------------------------------------------------------

@settings(max_examples=400)
@given(messages())
def test_decode_inverts_encode(message):
    data = p.encode(message)
    assert p.decode(data) == message
    assert p.decode(data, type(message)) == message
    assert p.encode(p.decode(data)) == data
    assert len(data) <= p.MAX_SIZE[message.TYPE]
    assert data.isascii() or message.COUNT_KEY == "refs"


@given(st.lists(messages(), min_size=1, max_size=4))
def test_frame_length_splits_a_stream(batch):
    stream = b"".join(map(p.encode, batch))
    for message in batch:
        length = p.frame_length(stream)
        assert p.frame_length(stream[:length - 1]) is None
        assert p.decode(stream[:length]) == message
        # a reader's growing buffer is read in place (qrexec/stream.py)
        assert p.frame_length(bytearray(stream)) == length
        assert p.decode(bytearray(stream[:length])) == message
        stream = stream[length:]
    assert p.frame_length(stream) is None


# --- the largest messages and the size bounds ------------------------------

def _largest_meta():
    meta = linear_layout(2048, 2048, "NV12")
    return dataclasses.replace(meta, pages=MAX_LEASE_PAGES,
                               modifier=2**64 - 2)


def largest_messages():
    meta = _largest_meta()
    refs = p.GrantRefs.from_ints([2**32 - 1] * MAX_LEASE_PAGES)
    name = "q" * 31
    entry = p.LeaseEntry(LEASE, p.Role.CONSUMER, name, State.RELEASING,
                         MAX_LEASE_PAGES, ReceiveMode.DMABUF, p.MAX_DEADLINE)
    spec = ImageSpec(16384, 8, "NV12", 2**64 - 2)
    return [
        p.LeaseRequest(spec, ReceiveMode.DMABUF, p.MAX_TTL),
        p.OfferRequest(spec, p.MAX_TTL),
        p.ExportRequest(LEASE, name, p.MAX_DOMID, meta),
        p.ExportAnswer(refs),
        p.LeaseAnswer(LEASE, name, p.MAX_DOMID, ReceiveMode.DMABUF, meta,
                      p.MAX_DEADLINE, refs),
        p.ReleaseRequest(LEASE),
        p.RevokeRequest(LEASE, p.Role.CONSUMER),
        p.RevokeAnswer(p.RevokeStatus.BUSY, "x" * p.MAX_TEXT),
        p.ListRequest(),
        p.LeaseList((entry,) * p.MAX_LIST_LEASES),
        p.Ok(),
        p.Error("e" * 40, "x" * p.MAX_TEXT),
    ]


def test_largest_legal_messages_fit_their_bound():
    largest = largest_messages()
    assert {m.TYPE for m in largest} == set(p.MessageType)
    for message in largest:
        data = p.encode(message)
        assert len(data) <= p.MAX_SIZE[message.TYPE], message.TYPE
        assert p.decode(data, type(message)) == message
    assert p.max_size_for(p.ExportAnswer, refs=10) == p.MAX_HEADER + 40
    assert p.max_size_for(p.Ok, p.Error) == p.MAX_HEADER


def test_oversize_is_refused_before_parsing():
    with pytest.raises(p.ProtocolError, match="over the limit"):
        p.decode(b"x" * (p.MAX_HEADER + 1), p.Ok, p.Error)
    big = p.encode(p.Ok()) + b"\0" * p.MAX_SIZE[p.MessageType.LEASE_LIST]
    with pytest.raises(p.ProtocolError, match="over the limit"):
        p.decode(big)
    # a small type may not borrow the bound of a big one
    with pytest.raises(p.ProtocolError, match="size limit"):
        p.decode(p.encode(p.Ok()) + b"\0" * p.MAX_HEADER, p.Ok, p.LeaseList)


# --- targeted rules --------------------------------------------------------

REQUEST = p.encode(p.LeaseRequest(ImageSpec(64, 64, "XR24"),
                                  ReceiveMode.CPU, 60))


def _refuse(data, *expected, match=None):
    with pytest.raises(p.ProtocolError, match=match) as info:
        p.decode(data, *expected)
    assert "\n" not in str(info.value) and str(info.value)
    return str(info.value)


@pytest.mark.parametrize("bad", [
    b"+60", b"060", b" 60", b"60 ", b"6 0", b"-0", b"0x3c", b"6e1", b"60.0",
    "\u0666\u0660".encode(), b"1" * 21, b"",
])
def test_integer_tricks(bad):
    _refuse(REQUEST.replace(b"ttl=60", b"ttl=" + bad))


@pytest.mark.parametrize("old, new, match", [
    (b"ttl=60", b"ttl=0", "ttl"),
    (b"ttl=60", b"ttl=%d" % (p.MAX_TTL + 1), "ttl"),
    (b"width=64", b"width=16385", "width"),
    (b"fourcc=XR24", b"fourcc=YUYV", "not allowed"),
    (b"fourcc=XR24", b"fourcc=BLOB", "missing key 'bytes'"),
    (b"modifier=0", b"modifier=%d" % MOD_INVALID, "INVALID"),
    (b"modifier=0", b"modifier=%d" % 2**64, "modifier"),
    (b"mode=cpu", b"mode=CPU", "ReceiveMode"),
    (b"mode=cpu\n", b"", "missing key 'mode'"),
    (b"mode=cpu", b"mode=cpu\nmode=cpu", "duplicate key 'mode'"),
    (b"mode=cpu", b"mode=cpu\nprovider=sys-gpu", "unknown key 'provider'"),
    (b"mode=cpu", b"mode =cpu", "malformed"),
    (b"mode=cpu", b"mode=cpu\r", "malformed"),
    (b"mode=cpu", b"Mode=cpu", "malformed"),
    (b"mode=cpu", b"mode=\xc3\xa9", "malformed"),
    (b"mode=cpu", b"mode=cpu\x00", "malformed"),
    (b"qubes-gpu-share/1", b"qubes-gpu-share/2", "not a qubes-gpu-share/1"),
    (b"lease-request", b"lease-requests", "unknown message type"),
    (b"\n\n", b"\n", "no complete header"),
])
def test_header_rules(old, new, match):
    assert old in REQUEST
    _refuse(REQUEST.replace(old, new, 1), match=match)


def test_trailing_bytes_and_unexpected_type():
    _refuse(REQUEST + b"x", match="after the end")
    _refuse(REQUEST, p.LeaseAnswer, p.Error, match="unexpected")


@pytest.mark.parametrize("field, value", [
    ("consumer", "../etc"), ("consumer", "dom0;"), ("consumer", "x" * 32),
    ("consumer", "default"), ("lease", LEASE.upper()), ("lease", LEASE[:-1]),
    ("consumer_domid", 0x7FF0),
])
def test_names_and_domids_are_validated(field, value):
    good = p.ExportRequest(LEASE, "work", 3, linear_layout(8, 8, "XR24"))
    with pytest.raises(p.ProtocolError):
        dataclasses.replace(good, **{field: value})
    key = field.replace("_", "-").encode()
    data = p.encode(good)
    old = b"%s=%s\n" % (key, str(getattr(good, field)).encode())
    _refuse(data.replace(old, b"%s=%s\n" % (key, str(value).encode())))


def _answer(pages=4):
    meta = layout_for(BlobSpec(pages * 4096))
    return p.LeaseAnswer(LEASE, "sys-gpu", 2, ReceiveMode.CPU, meta, 99,
                         p.GrantRefs.from_ints(range(pages)))


def test_ref_count_is_exact():
    data = p.encode(_answer())
    _refuse(data[:-1], match="truncated")
    _refuse(data + b"\0" * 4, match="after the end")
    _refuse(data.replace(b"refs=4", b"refs=5"), match="truncated")
    _refuse(data.replace(b"refs=4", b"refs=3"), match="after the end")
    _refuse(data.replace(b"refs=4", b"refs=0"), match="refs")
    _refuse(data.replace(b"refs=4", b"refs=65536"), match="refs")
    # header and payload agree, but not with the buffer's pages
    shorter = data.replace(b"refs=4", b"refs=3")[:-4]
    _refuse(shorter, match="3 refs for 4 pages")


def test_export_answer_check_pages():
    answer = p.ExportAnswer(p.GrantRefs.from_ints([7, 8, 9]))
    assert answer.check_pages(3) is answer
    with pytest.raises(p.ProtocolError, match="3 refs for 4 pages"):
        answer.check_pages(4)


def test_grant_refs_sequence():
    refs = p.GrantRefs.from_ints([1, 2**32 - 1, 0])
    assert list(refs) == [1, 2**32 - 1, 0] and refs[1] == 2**32 - 1
    assert refs[:2] == [1, 2**32 - 1] and len(refs) == 3
    assert refs.to_bytes() == b"\1\0\0\0\xff\xff\xff\xff\0\0\0\0"
    for bad in ([-1], [2**32], ["1"], [1.0]):
        with pytest.raises(p.ProtocolError):
            p.GrantRefs.from_ints(bad)
    with pytest.raises(p.ProtocolError):
        p.GrantRefs(b"\0" * 5)


@pytest.mark.parametrize("line, match", [
    (LEASE + " consumer work active 3 cpu 17", None),  # the valid one
    (LEASE + " consumer work active 3 cpu", "7 fields"),
    (LEASE + " consumer  work active 3 cpu 17", "7 fields"),
    (LEASE + " owner work active 3 cpu 17", "Role"),
    (LEASE + " consumer work Active 3 cpu 17", "state"),
    (LEASE + " consumer work active 03 cpu 17", "pages"),
    (LEASE + " consumer work active 0 cpu 17", "pages"),
    (LEASE + " consumer work\tx active 3 cpu 17", "7 fields|qube name"),
])
def test_lease_list_lines(line, match):
    data = b"qubes-gpu-share/1\nlease-list\nleases=1\n\n%s\n" % line.encode()
    if match is None:
        assert p.decode(data).leases[0].peer == "work"
    else:
        _refuse(data, match=match)
    _refuse(data + b"x", match="after the end")
    _refuse(data.replace(b"leases=1", b"leases=2"), match="truncated")


def test_revoke_answer_reason_goes_with_busy():
    with pytest.raises(p.ProtocolError):
        p.RevokeAnswer(p.RevokeStatus.RELEASED, "why")
    with pytest.raises(p.ProtocolError):
        p.RevokeAnswer(p.RevokeStatus.BUSY)
    _refuse(b"qubes-gpu-share/1\nrevoke-answer\nstatus=busy\n\n",
            match="reason")


def test_error_messages_are_one_line():
    error = p.Error.of("bad-request", "first line\nsecond\tline \u00e9" + "x" * 500)
    assert "\n" not in error.message and len(error.message) == p.MAX_TEXT
    assert p.decode(p.encode(error)) == error
    with pytest.raises(p.ProtocolError):
        p.Error("bad-request", "two\nlines")
    with pytest.raises(p.ProtocolError):
        p.Error("Bad Code", "text")
    assert p.ProtocolError.code == "malformed"


def test_enum_fields_accept_their_values():
    a = p.LeaseRequest(BlobSpec(10), "dmabuf", 5)
    assert a == p.LeaseRequest(BlobSpec(10), ReceiveMode.DMABUF, 5)
    assert a.mode is ReceiveMode.DMABUF


def test_frame_length_refuses_garbage_early():
    assert p.frame_length(b"qubes-gpu") is None
    with pytest.raises(p.ProtocolError):
        p.frame_length(b"GET / HTTP/1.0\n\n")
    with pytest.raises(p.ProtocolError):
        p.frame_length(b"y" * p.MAX_HEADER)


def test_lease_ids_from_names_module_are_accepted():
    lease = names.new_lease_id()
    assert p.decode(p.encode(p.ReleaseRequest(lease))).lease == lease

"""The service descriptor: what qrexec writes is accepted, nothing else."""

import pytest
from hypothesis import given, settings, strategies as st

from qubes_gpu_share.qrexec.descriptor import (
    MAX_DESCRIPTOR_LEN, DescriptorError, ServiceDescriptor, is_service_call,
    parse_descriptor)


@pytest.mark.parametrize("line, expected", [
    # qube -> dom0 with @adminvm, as qrexec-daemon.c builds it
    (b"qubes.GpuLease+sys-gpu work keyword adminvm\0",
     ServiceDescriptor("qubes.GpuLease", "sys-gpu", "work", "keyword", "adminvm")),
    (b"qubes.GpuLeases+ work name dom0\0",
     ServiceDescriptor("qubes.GpuLeases", "", "work", "name", "dom0")),
    # dom0 -> qube, as qubesadmin's run_service makes qrexec-client write it
    (b"qubes.GpuExport+ dom0\0", ServiceDescriptor("qubes.GpuExport", "", "dom0")),
    # no '+' at all (a legacy caller): empty argument
    (b"qubes.GpuRevoke dom0", ServiceDescriptor("qubes.GpuRevoke", "", "dom0")),
])
def test_accepts_what_qrexec_writes(line, expected):
    assert parse_descriptor(line) == expected


def test_encode_writes_the_qrexec_bytes():
    d = ServiceDescriptor("qubes.GpuOffer", "work", "sys-gpu", "keyword", "adminvm")
    assert d.encode() == b"qubes.GpuOffer+work sys-gpu keyword adminvm\0"
    assert d.to_dom0 and d.service_with_arg == "qubes.GpuOffer+work"
    assert not ServiceDescriptor("qubes.GpuRevoke", "", "dom0").to_dom0


@pytest.mark.parametrize("line", [
    b"", b"\0", b"qubes.GpuLease+x\0",                      # too few fields
    b"qubes.GpuLease+x work keyword\0",                     # 3 fields
    b"qubes.GpuLease+x  work\0",                            # double space
    b"qubes.GpuLease+x work \0",                            # trailing space
    b"qubes.GpuLease+a/b work\0",                           # argument charset
    b"qubes.Gpu Lease work\0", b"+arg work\0",              # empty service
    b"qubes.GpuLease+x 0work\0",                            # bad qube name
    b"qubes.GpuLease+x Domain-0\0",                         # reserved name
    b"qubes.GpuLease+x work keyword dispvm\0",              # not a dom0 keyword
    b"qubes.GpuLease+x work name sys-gpu\0",                # dom0 form, not dom0
    b"qubes.GpuLease+x work type dom0\0",                   # bad target type
    b"qubes.GpuLease+x wo\0rk\0",                           # inner NUL
    "qubes.GpuLease+\u00e9 work\0".encode(),                # not ASCII
    b"q" * MAX_DESCRIPTOR_LEN + b" work\0",                 # too long
])
def test_rejects(line):
    with pytest.raises(DescriptorError):
        parse_descriptor(line)


def test_construction_uses_the_same_rules():
    with pytest.raises(DescriptorError):
        ServiceDescriptor("qubes.GpuLease", "a b", "work")


@settings(max_examples=3000)
@given(st.binary(max_size=MAX_DESCRIPTOR_LEN + 20))
def test_fuzz_only_descriptor_error_escapes(untrusted):
    try:
        parse_descriptor(untrusted)
    except DescriptorError:
        pass


_token = st.text(alphabet="abcdefgkmqrsuwxyGL0123456789+-._ \0", max_size=40)


@settings(max_examples=3000)
@given(st.lists(_token, min_size=1, max_size=5))
def test_fuzz_near_misses(fields):
    # mostly well-formed field counts with hostile fields
    untrusted = " ".join(fields).encode() + b"\0"
    try:
        d = parse_descriptor(untrusted)
    except DescriptorError:
        return
    # anything accepted re-encodes to exactly what was read
    assert d.encode() == untrusted or d.encode() == untrusted.replace(
        b" ", b"+ ", 1)


_names = st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True).filter(
    lambda n: n not in ("none", "default"))


@given(service=st.from_regex(r"[A-Za-z0-9._-]{1,40}", fullmatch=True),
       argument=st.from_regex(r"[A-Za-z0-9+._-]{0,40}", fullmatch=True),
       source=_names, dom0_form=st.booleans())
def test_round_trip(service, argument, source, dom0_form):
    target = ("keyword", "adminvm") if dom0_form else (None, None)
    d = ServiceDescriptor(service, argument, source, *target)
    assert parse_descriptor(d.encode()) == d


@pytest.mark.parametrize("name, ok", [
    ("qubes.GpuExport", True), ("qubes.GpuExport+", True),
    ("qubes.GpuLease+sys-gpu", True), ("qubes.GpuDeliver+a+b", True),
    ("x" * 64 + "+arg", True), ("x" * 65, False), ("", False),
    ("+arg", False), ("bad service", False), ("qubes.Gpu/x", False),
    ("qubes.GpuLease+sys gpu", False), ("qubes.GpuLease+\u00e9", False),
])
def test_is_service_call(name, ok):
    """The rule a caller's ``SERVICE+ARG`` is checked by (qubes/facts.py)
    is the descriptor's."""
    assert is_service_call(name) is ok
    if ok:
        parse_descriptor(f"{name} dom0".encode())

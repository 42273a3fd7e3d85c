import pytest

from qubes_gpu_share.names import (InvalidName, new_lease_id, parse_lease_id,
                                   parse_qube_name)


@pytest.mark.parametrize("name", ["work", "sys-gpu", "dom0", "a", "A_b.c-1",
                                  "x" * 31])
def test_valid_qube_names(name):
    assert parse_qube_name(name) == name
    assert parse_qube_name(name.encode()) == name


@pytest.mark.parametrize("name", ["", "1work", "-x", "x" * 32, "a/b", "a b",
                                  "../etc", "none", "default", "work.",
                                  "wörk", "a\0", "a\n", "$(id)", "@adminvm"])
def test_invalid_qube_names(name):
    with pytest.raises(InvalidName):
        parse_qube_name(name)


def test_non_ascii_bytes():
    with pytest.raises(InvalidName):
        parse_qube_name(b"w\xffork")


def test_lease_ids():
    lid = new_lease_id()
    assert parse_lease_id(lid) == lid and len(lid) == 32
    assert new_lease_id() != lid
    for bad in [lid.upper(), lid[:-1], lid + "0", "g" * 32, " " + lid[1:]]:
        with pytest.raises(InvalidName):
            parse_lease_id(bad)

"""This domain's id (grant/domid.py): dom0 from /proc/xen/capabilities,
a domU's from xenstore, validated; what to install when xenstore-read is
missing."""

from __future__ import annotations

import subprocess

import pytest

from qubes_gpu_share.grant import errors
from qubes_gpu_share.grant.domid import own_domid


def test_dom0_is_recognised_from_capabilities(tmp_path):
    (tmp_path / "xen").mkdir()
    (tmp_path / "xen" / "capabilities").write_text("control_d\n")
    assert own_domid(str(tmp_path), run=None) == 0


@pytest.mark.parametrize("stdout, code, expect", [
    ("5\n", 0, 5), ("32751", 0, 32751), ("32752", 0, None),
    ("-1", 0, None), ("x", 0, None), ("", 1, None), ("٣", 0, None),
])
def test_domu_domid_from_xenstore(tmp_path, stdout, code, expect):
    def run(argv, **kwargs):
        assert argv == ["xenstore-read", "domid"]
        return subprocess.CompletedProcess(argv, code, stdout, "")
    absent = str(tmp_path / "absent")
    if expect is None:
        with pytest.raises(errors.NoGrantDevice, match="domain's id"):
            own_domid(absent, run=run)
    else:
        assert own_domid(absent, run=run) == expect


def test_missing_xenstore_read_says_what_to_install(tmp_path):
    def run(argv, **kwargs):
        raise FileNotFoundError(2, "No such file", argv[0])
    with pytest.raises(errors.NoGrantDevice, match="xenstore-utils"):
        own_domid(str(tmp_path / "absent"), run=run)

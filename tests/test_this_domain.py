"""Reading this domain's facts (grant/this_domain.py) from a tmp tree."""

from __future__ import annotations

import pathlib

import pytest

from qubes_gpu_share.grant import this_domain
from qubes_gpu_share.grant.expected import VirtMode


def fake_domain(root: pathlib.Path, guest_type: str | None = None,
                capabilities: str | None = None,
                pci: tuple[str, ...] = ()) -> tuple[str, str]:
    """A /sys and /proc of a domain, under ``root``: (sys_root, proc_root).
    Also used by test_gntdev.py."""
    sys_root, proc_root = root / "sys", root / "proc"
    (sys_root / "bus/pci/devices").mkdir(parents=True)
    (proc_root / "self/fdinfo").mkdir(parents=True)
    if guest_type is not None:
        (sys_root / "hypervisor").mkdir()
        (sys_root / "hypervisor/guest_type").write_text(guest_type + "\n")
    if capabilities is not None:
        (proc_root / "xen").mkdir()
        (proc_root / "xen/capabilities").write_text(capabilities + "\n")
    for device in pci:
        (sys_root / "bus/pci/devices" / device).symlink_to("/nonexistent")
    return str(sys_root), str(proc_root)


# --- virt mode and swiotlb-xen -----------------------------------------------

@pytest.mark.parametrize("text, mode", [
    ("PV", VirtMode.PV), ("PVH", VirtMode.PVH), ("HVM", VirtMode.HVM),
    ("pvh", VirtMode.PVH), ("", None), ("PV2", None), ("\xff", None),
])
def test_virt_mode(tmp_path, text, mode):
    sys_root, _ = fake_domain(tmp_path, guest_type=text)
    assert this_domain.virt_mode(sys_root) is mode


def test_not_in_xen_is_no_virt_mode(tmp_path):
    sys_root, proc_root = fake_domain(tmp_path)
    assert this_domain.virt_mode(sys_root) is None
    assert not this_domain.is_dom0(proc_root)
    assert not this_domain.xen_swiotlb(sys_root, proc_root)


def test_guest_type_is_read_bounded(tmp_path):
    sys_root, _ = fake_domain(tmp_path, guest_type="PV" + " " * 10**6)
    assert this_domain.virt_mode(sys_root) is VirtMode.PV
    (tmp_path / "sys/hypervisor/guest_type").write_text("x" * 10**6 + "PV")
    assert this_domain.virt_mode(sys_root) is None


@pytest.mark.parametrize("guest_type, capabilities, pci, swiotlb", [
    ("PV", "control_d", (), True),               # dom0
    ("PV", "", (), False),                       # a plain PV domU
    ("PV", None, (), False),
    ("PV", None, ("0000:00:00.0",), True),       # PV domU with pcifront
    ("PVH", "control_d", (), False),             # PVH dom0: not swiotlb-xen
    ("PVH", None, ("0000:00:00.0",), False),     # PCI in PVH: irrelevant
    ("HVM", None, ("0000:00:00.0",), False),
    (None, "control_d", ("0000:00:00.0",), False),
])
def test_xen_swiotlb(tmp_path, guest_type, capabilities, pci, swiotlb):
    roots = fake_domain(tmp_path, guest_type, capabilities, pci)
    assert this_domain.xen_swiotlb(*roots) is swiotlb


def test_dom0_is_control_d(tmp_path):
    _, proc_root = fake_domain(tmp_path, capabilities="control_d")
    assert this_domain.is_dom0(proc_root)
    (tmp_path / "proc/xen/capabilities").write_text("")
    assert not this_domain.is_dom0(proc_root)


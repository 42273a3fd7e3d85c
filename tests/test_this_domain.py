"""Reading this domain's facts (grant/this_domain.py) from a tmp tree, and
the fdinfo parser that recognises a dma-buf gntdev exported."""

from __future__ import annotations

import os
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


# --- the exporter of a dma-buf ----------------------------------------------

#: /proc/self/fdinfo/N of a dma-buf as Linux 6.1 prints it
#: (generic lines, then dma_buf_show_fdinfo)
GNTDEV_FDINFO = (b"pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t2051\n"
                 b"size:\t8192\ncount:\t1\nexp_name:\txen_gntdev\n")


@pytest.mark.parametrize("text, name", [
    (GNTDEV_FDINFO, "xen_gntdev"),
    (GNTDEV_FDINFO.replace(b"xen_gntdev", b"udmabuf"), "udmabuf"),
    (GNTDEV_FDINFO + b"name:\tframe\n", "xen_gntdev"),
    # the buffer's name is its user's: a forged line after the real one
    (GNTDEV_FDINFO.replace(b"xen_gntdev", b"udmabuf")
     + b"name:\tx\nexp_name:\txen_gntdev\n", "udmabuf"),
    # a memfd or any other file: no exp_name
    (b"pos:\t0\nflags:\t0100002\nmnt_id:\t15\nino:\t7\n", None),
    (b"", None),
    # only whole lines count
    (b"pos:\t0\nexp_name:\txen_gntdev", None),
    (b"exp_name: xen_gntdev\n", None),
    (b"xexp_name:\txen_gntdev\n", None),
    (b"exp_name:\t\n", ""),
])
def test_parse_exp_name(text, name):
    assert this_domain.parse_exp_name(text) == name


def test_exporter_read_from_fdinfo(tmp_path):
    _, proc_root = fake_domain(tmp_path)
    (tmp_path / "proc/self/fdinfo/7").write_bytes(GNTDEV_FDINFO)
    assert this_domain.dmabuf_exporter(7, proc_root) == "xen_gntdev"
    assert this_domain.dmabuf_exporter(8, proc_root) is None


def test_a_memfd_has_no_exporter():
    fd = os.memfd_create("not-a-dmabuf", os.MFD_CLOEXEC)
    try:
        assert this_domain.dmabuf_exporter(fd) is None
    finally:
        os.close(fd)


# --- where the facts leave it to the kernel ----------------------------------

@pytest.mark.parametrize("answer, refused", [(True, False), (False, True),
                                             (None, True)])
def test_pv_domu_asks_the_kernel_about_its_frames(tmp_path, answer, refused):
    from qubes_gpu_share.grant.expected import GRANT_REFUSED_PV_DMA
    roots = fake_domain(tmp_path, "PV")
    asked = []

    def check():
        asked.append(1)
        return answer
    refusal = this_domain.grant_refusal(*roots, frames_check=check)
    assert (refusal is GRANT_REFUSED_PV_DMA) is refused
    assert asked == [1]


@pytest.mark.parametrize("guest_type, capabilities",
                         [("PV", "control_d"), ("PVH", None), (None, None)])
def test_other_domains_never_ask_the_kernel(tmp_path, guest_type,
                                            capabilities):
    roots = fake_domain(tmp_path, guest_type, capabilities)
    assert this_domain.grant_refusal(
        *roots, frames_check=lambda: pytest.fail("asked")) is None


@pytest.mark.parametrize("text, limit", [("1024\n", 1024), ("65536", 65536),
                                         ("", None), ("-1\n", None),
                                         ("x", None)])
def test_gntalloc_limit(tmp_path, text, limit):
    sys_root, _ = fake_domain(tmp_path)
    param = tmp_path / "sys" / this_domain.GNTALLOC_LIMIT_PARAM
    param.parent.mkdir(parents=True)
    param.write_text(text)
    assert this_domain.gntalloc_limit(sys_root) == limit


def test_gntalloc_not_loaded_is_no_limit(tmp_path):
    sys_root, _ = fake_domain(tmp_path)
    assert this_domain.gntalloc_limit(sys_root) is None

"""Which buffer source the agent grants from, per kind of domain.

A PV domU's kernel grants the wrong frames of a dma-buf (expected.py,
GRANT_REFUSED_PV_DMA; measured in the lab), so the agent must fall back to
gntalloc pages there whatever source was configured; elsewhere the
configured source is used.
"""

from __future__ import annotations

import logging

import pytest

from qubes_gpu_share.agent.main import choose_allocator
from qubes_gpu_share.alloc import MemfdAllocator


def _domain(tmp_path, guest_type: str | None, dom0: bool = False,
            pci: bool = False) -> tuple[str, str]:
    sys_root, proc_root = tmp_path / "sys", tmp_path / "proc"
    (sys_root / "hypervisor").mkdir(parents=True)
    (proc_root / "xen").mkdir(parents=True)
    if guest_type:
        (sys_root / "hypervisor" / "guest_type").write_text(guest_type + "\n")
    (proc_root / "xen" / "capabilities").write_text(
        "control_d\n" if dom0 else "")
    if pci:
        (sys_root / "bus" / "pci" / "devices" / "0000:00:01.0").mkdir(
            parents=True)
    return str(sys_root), str(proc_root)


@pytest.mark.parametrize("name", ["auto", "udmabuf", "dma-heap", "memfd"])
def test_pv_domu_grants_gntalloc_pages_whatever_was_asked(tmp_path, caplog,
                                                          name):
    roots = _domain(tmp_path, "PV")
    with caplog.at_level(logging.WARNING):
        assert choose_allocator(name, False, *roots) is None
    assert "swiotlb-xen" in caplog.text and name in caplog.text


def test_gntalloc_asked_in_a_pv_domu_is_no_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert choose_allocator("gntalloc", False,
                                *_domain(tmp_path, "PV")) is None
    assert caplog.text == ""


@pytest.mark.parametrize("guest_type, dom0, pci", [
    ("PVH", False, False), ("HVM", False, False), ("PV", True, False),
    ("PV", False, True), (None, False, False)])
def test_memfd_is_used_where_dma_bufs_grant_right(tmp_path, guest_type, dom0,
                                                  pci):
    roots = _domain(tmp_path, guest_type, dom0, pci)
    assert isinstance(choose_allocator("memfd", False, *roots),
                      MemfdAllocator)


def test_the_simulator_always_gets_memfds(tmp_path):
    assert isinstance(choose_allocator("auto", True,
                                       *_domain(tmp_path, "PV")),
                      MemfdAllocator)

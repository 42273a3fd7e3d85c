"""Facts about this domain and its dma-bufs, read from Linux.

What decides whether IMP_TO_REFS may be called here and cannot be learnt by
calling it, because the kernel answers with refs either way (expected.py):

* the virt mode, from /sys/hypervisor/guest_type;
* whether a PV kernel's DMA ops are swiotlb-xen (its DMA addresses are then
  machine addresses, which is what gntdev-dmabuf reads them as). Linux picks
  swiotlb-xen in the initial domain (xen_swiotlb_detect) and, in a PV domU,
  when pcifront finds PCI devices (pci_xen_swiotlb_init_late). A domU booted
  with iommu=soft or swiotlb=force has it too without PCI devices; it is
  not visible from userspace, so such a domU is refused like the others
  (the safe side: it keeps gntalloc pages);
* who exported a dma-buf, from /proc/self/fdinfo (a dma-buf gntdev made
  from foreign refs cannot be granted on);
* xen-gntalloc's page limit (its module parameter, /sys/module).

Where the facts say the kernel may grant wrong frames (PV without
swiotlb-xen), :func:`grant_refusal` asks the kernel too, through the check
its caller gives: a kernel with the gntdev frames fix (kernel/0003) grants
the right ones, and is recognised by doing so (the real check is
gntdev.kernel_grants_own_frames), never by its version. The check is
passed in rather than imported: native.py reads this module, and
gntdev.py is native's caller, so importing it here would close a loop.

Every path is under a root given as a parameter, so tests use a tmp tree.
Every read is bounded; what cannot be read is "not known", never an error.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .expected import (GRANT_REFUSED_PV_DMA, Refusal, VirtMode,
                       dmabuf_grant_refusal)

SYS_ROOT = "/sys"
PROC_ROOT = "/proc"
#: far more than the few short lines any of these files holds
_READ_LIMIT = 4096


def _read(path: str, limit: int = _READ_LIMIT) -> bytes | None:
    """At most ``limit`` bytes of a sysfs/procfs file, None if unreadable."""
    try:
        with open(path, "rb", buffering=0) as source:
            return source.read(limit)
    except OSError:
        return None


def virt_mode(sys_root: str = SYS_ROOT) -> VirtMode | None:
    """This domain's virt mode, None outside Xen (or an unknown word)."""
    data = _read(f"{sys_root}/hypervisor/guest_type", 16)
    word = data.strip().lower().decode("ascii", "replace") if data else ""
    try:
        return VirtMode(word)
    except ValueError:
        return None


def is_dom0(proc_root: str = PROC_ROOT) -> bool:
    """The control domain: ``control_d`` in /proc/xen/capabilities."""
    data = _read(f"{proc_root}/xen/capabilities", 256)
    return data is not None and b"control_d" in data


def has_pci_devices(sys_root: str = SYS_ROOT) -> bool:
    """Any device under /sys/bus/pci/devices (in a PV domU: from pcifront,
    which switched the kernel's DMA ops to swiotlb-xen)."""
    try:
        with os.scandir(f"{sys_root}/bus/pci/devices") as entries:
            return any(True for _ in entries)
    except OSError:
        return False


def xen_swiotlb(sys_root: str = SYS_ROOT,
                proc_root: str = PROC_ROOT) -> bool:
    """DomainKind.xen_swiotlb of this domain: a PV kernel whose DMA
    addresses are machine addresses (dom0, or a domU with PCI devices)."""
    return virt_mode(sys_root) is VirtMode.PV and (
        is_dom0(proc_root) or has_pci_devices(sys_root))


#: Answers whether this kernel's IMP_TO_REFS grants a buffer's own frames
#: (True), wrong ones (False), or cannot be asked (None).
FramesCheck = Callable[[], "bool | None"]


def grant_refusal(sys_root: str = SYS_ROOT, proc_root: str = PROC_ROOT,
                  *, frames_check: FramesCheck) -> Refusal | None:
    """expected.dmabuf_grant_refusal for this domain: why no IMP_TO_REFS
    may be made here, or None.

    The facts decide, except where they say the kernel may grant wrong
    frames (PV without swiotlb-xen): there the kernel is asked
    (``frames_check``; the real one: gntdev.kernel_grants_own_frames_once),
    and a kernel that grants the buffer's own frames is not refused. A
    kernel that cannot be asked (no udmabuf to try with, no grant device)
    is refused, the safe side.
    """
    refusal = dmabuf_grant_refusal(virt_mode(sys_root),
                                   xen_swiotlb(sys_root, proc_root))
    if refusal is GRANT_REFUSED_PV_DMA and frames_check() is True:
        return None
    return refusal


GNTALLOC_LIMIT_PARAM = "module/xen_gntalloc/parameters/limit"


def gntalloc_limit(sys_root: str = SYS_ROOT) -> int | None:
    """xen-gntalloc's ``limit``: pages this domain's gntalloc users may
    hold at once (default 1024); None when the module is not loaded or the
    value is unreadable. An admin raises it by writing the file (root) or
    with ``xen_gntalloc.limit=N`` on the kernel command line."""
    data = _read(f"{sys_root}/{GNTALLOC_LIMIT_PARAM}", 32)
    text = data.strip().decode("ascii", "replace") if data else ""
    return int(text) if text.isdigit() else None


def parse_exp_name(fdinfo: bytes) -> str | None:
    """The ``exp_name`` of a dma-buf's fdinfo text, None if there is none.

    Linux's dma_buf_show_fdinfo prints ``exp_name:\\t<exporter>`` after the
    generic lines and before ``name:``, which the buffer's user may set to
    anything, newlines included: so only the first ``exp_name`` line counts,
    and only a complete (newline-terminated) one.
    """
    for line in fdinfo.split(b"\n")[:-1]:
        key, tab, value = line.partition(b":\t")
        if tab and key == b"exp_name":
            return value.decode("ascii", "replace")
    return None


def dmabuf_exporter(fd: int, proc_root: str = PROC_ROOT) -> str | None:
    """Who exported the dma-buf behind ``fd`` (e.g. ``udmabuf``,
    ``xen_gntdev``), None for other files or when unreadable."""
    data = _read(f"{proc_root}/self/fdinfo/{fd}")
    return None if data is None else parse_exp_name(data)

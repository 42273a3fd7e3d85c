"""What the grant device does, per kind of domain: the one table.

The simulator takes its behaviour from here, and the Xen lab asserts the same
table against real Xen, so the two cannot drift apart silently. The defaults
are what ../shared/XEN-LAB.md measured on x86 (Xen 4.17, Linux 6.1):

* granting a dma-buf (IMP_TO_REFS) needs the DMABUF ioctls
  (CONFIG_XEN_GNTDEV_DMABUF; without them every DMABUF ioctl is ENOTTY)
  and DMA addresses that are machine addresses: dmabuf_imp_to_refs() reads
  each DMA address of the dma-buf as a machine frame (``bfn_to_pfn``). That
  holds in PVH/HVM and in a PV kernel whose DMA ops are swiotlb-xen (dom0; a
  PV domU only with PCI devices). In a PV domU without it the refs name wrong
  frames: the lab saw the ioctl succeed and Xen refuse every ref at map time
  (GNTST_bad_page), and a wrong frame that is the domain's own would grant
  another page of its memory silently. The kernel does not refuse, so the
  project does (:func:`dmabuf_grant_refusal`);
* a dma-buf received from another domain (EXP_FROM_REFS) cannot be granted
  on: its pages are grant mappings, and Xen grants only a domain's own RAM
  (the lab: IMP_TO_REFS gave refs, Xen refused each at map time);
* receiving one (EXP_FROM_REFS) is EINVAL in a PV domain (the kernel refuses
  before asking Xen, ``use_ptemod``) and in a PVH/HVM domain whose kernel
  requests ``GNTMAP_device_map`` (added for all of CONFIG_X86 in
  drivers/xen/gntdev-dmabuf.c; Xen refuses device maps for auto-translated
  domains). With the one-line fix (device map only for PV) it works in
  PVH/HVM;
* mapping refs for the CPU (MAP_GRANT_REF + mmap) works in every guest type.

The project's kernel series (kernel/, "+fix series" below) changes four of
these, each shown in the lab:

* 0001: EXP_FROM_REFS requests the device map only in PV: a PVH/HVM domain
  receives dma-bufs (``receive_fix``);
* 0002: gntdev's dma-buf exporter gets mmap, vmap and CPU access: a
  received dma-buf maps into a process like any system-RAM dma-buf
  (``dmabuf_mmap``; without it mmap is EINVAL);
* 0003: IMP_TO_REFS in a PV domain without swiotlb-xen grants the buffer's
  own frames (``grant_frames_fix``): such a domain may grant dma-bufs;
* 0004: IMP_TRY_RELEASE ends only the grants the peer no longer maps and
  says how many it still maps (``release_query``); without it IMP_RELEASE
  ends them all and the kernel defers, unseen, the end of those still
  mapped (gnttab_end_foreign_access). gntalloc has no such report.

A kernel is recognised by what it does, never by its version: the real
device and the probe try each ability (gntdev.py, probe.py).
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from collections.abc import Iterator

from .errors import (DmabufNotSupported, DmabufReceiveRefused, GrantError,
                     MapRefused, NotGrantable)

#: Xen's default max_grant_frames, and v1 entries per 4 KiB frame.
XEN_DEFAULT_GRANT_FRAMES = 64
GRANT_ENTRIES_PER_FRAME = 512
#: Linux keeps the first refs for itself (GNTTAB_NR_RESERVED_ENTRIES).
RESERVED_GRANT_REFS = 8
DEFAULT_GRANT_ENTRIES = XEN_DEFAULT_GRANT_FRAMES * GRANT_ENTRIES_PER_FRAME
#: Xen's default max_maptrack_frames x 256 entries per frame.
DEFAULT_MAPTRACK_ENTRIES = 1024 * 256
#: What Qubes sets max_grant_frames to (4 GiB of pages).
QUBES_GRANT_FRAMES = 2048
#: xen-gntalloc's module parameter ``limit``: pages all gntalloc users of a
#: domain may have allocated at once (drivers/xen/gntalloc.c; the lab read
#: 1024 and saw a 2025-page frame refused with ENOSPC). An admin raises it
#: in /sys/module/xen_gntalloc/parameters/limit (or xen_gntalloc.limit=N on
#: the kernel command line). A grant ended while the peer still maps it
#: no longer counts (gntalloc's __del_gref decrements at once).
GNTALLOC_DEFAULT_LIMIT = 1024


class Kernel(str, enum.Enum):
    """The gntdev builds the lab measures, by what they can do."""

    #: Debian's gntdev as shipped: no CONFIG_XEN_GNTDEV_DMABUF
    STOCK = "stock"
    #: built with CONFIG_XEN_GNTDEV_DMABUF, as Qubes' kernels are
    DMABUF = "dmabuf"
    #: that plus the project's series (kernel/0001..0004)
    FIXED = "fixed"


#: The DomainKind fields each kernel sets.
KERNEL_TRAITS = {
    Kernel.STOCK: dict(dmabuf_ioctls=False, receive_fix=False,
                       dmabuf_mmap=False, grant_frames_fix=False,
                       release_query=False),
    Kernel.DMABUF: dict(dmabuf_ioctls=True, receive_fix=False,
                        dmabuf_mmap=False, grant_frames_fix=False,
                        release_query=False),
    Kernel.FIXED: dict(dmabuf_ioctls=True, receive_fix=True,
                       dmabuf_mmap=True, grant_frames_fix=True,
                       release_query=True),
}


class VirtMode(str, enum.Enum):
    """/sys/hypervisor/guest_type, as Qubes' ``vm.virt_mode`` names it."""

    PV = "pv"
    PVH = "pvh"
    HVM = "hvm"


@dataclasses.dataclass(frozen=True)
class DomainKind:
    """What decides the grant device's behaviour in a domain.

    The default is a Qubes PVH qube with a Qubes kernel: the DMABUF ioctls
    are built in, the receive fix is not (the measured upstream state).
    """

    virt_mode: VirtMode = VirtMode.PVH
    #: kernel built with CONFIG_XEN_GNTDEV_DMABUF (Qubes' kernels are;
    #: Debian's 6.1 is not)
    dmabuf_ioctls: bool = True
    #: kernel requests GNTMAP_device_map only for PV (kernel/0001)
    receive_fix: bool = False
    #: PV only: the kernel's DMA addresses are machine addresses because its
    #: DMA ops are swiotlb-xen: dom0, or a PV domU with PCI devices (pcifront
    #: switches to it) or booted with iommu=soft / swiotlb=force. PVH/HVM
    #: need no such thing (their bus frames are their own frames).
    xen_swiotlb: bool = False
    #: a received dma-buf can be mmapped (and vmapped) (kernel/0002)
    dmabuf_mmap: bool = False
    #: IMP_TO_REFS grants the buffer's own frames in PV without swiotlb-xen
    #: (kernel/0003)
    grant_frames_fix: bool = False
    #: IMP_TRY_RELEASE says how many grants the peer still maps
    #: (kernel/0004)
    release_query: bool = False

    @classmethod
    def of(cls, virt_mode: VirtMode, kernel: Kernel,
           xen_swiotlb: bool = False) -> DomainKind:
        """A domain of this virt mode running this kernel."""
        return cls(VirtMode(virt_mode), xen_swiotlb=xen_swiotlb,
                   **KERNEL_TRAITS[Kernel(kernel)])

    @property
    def kernel(self) -> Kernel | None:
        """Which of the measured kernels this is, None for a mixture."""
        for kernel, traits in KERNEL_TRAITS.items():
            if all(getattr(self, name) == value
                   for name, value in traits.items()):
                return kernel
        return None

    def __post_init__(self) -> None:
        if self.xen_swiotlb and self.virt_mode != VirtMode.PV:
            raise ValueError(
                f"xen_swiotlb describes a PV kernel, not "
                f"{VirtMode(self.virt_mode).value}: PVH/HVM DMA addresses "
                f"are always usable by IMP_TO_REFS")


#: dom0 in Qubes (always PV, DMA through swiotlb-xen) with a Qubes kernel.
DOM0_KIND = DomainKind(virt_mode=VirtMode.PV, xen_swiotlb=True)


@dataclasses.dataclass(frozen=True)
class Refusal:
    """How the device refuses: the exception class and why, in one line."""

    error: type[GrantError]
    reason: str

    def exception(self) -> GrantError:
        return self.error(self.reason)


@dataclasses.dataclass(frozen=True)
class Expected:
    """The answer of the table for one kind of domain; None = it works."""

    grant_dmabuf: Refusal | None
    receive_dmabuf: Refusal | None
    #: MAP_GRANT_REF + mmap; gntalloc likewise works everywhere
    map_cpu: Refusal | None = None
    #: mmap of a received dma-buf (what receive_dmabuf refuses, it refuses)
    mmap_dmabuf: Refusal | None = None
    #: whether ending a dma-buf grant says how many pages the peer still
    #: maps (IMP_TRY_RELEASE); gntalloc pages never do
    held_pages: bool = False


NO_DMABUF_IOCTLS = Refusal(
    DmabufNotSupported,
    "kernel lacks CONFIG_XEN_GNTDEV_DMABUF (DMABUF ioctls answer ENOTTY); "
    "use a Qubes kernel, or grant gntalloc pages and receive in cpu mode")
RECEIVE_REFUSED_PV = Refusal(
    DmabufReceiveRefused,
    "EXP_FROM_REFS is refused in a PV domain (gntdev uses PTE mappings "
    "there); receive in cpu mode")
RECEIVE_REFUSED_DEVICE_MAP = Refusal(
    DmabufReceiveRefused,
    "EXP_FROM_REFS: this x86 kernel requests GNTMAP_device_map, which Xen "
    "refuses for PVH/HVM domains; receive in cpu mode, or use a kernel that "
    "requests the device map only for PV")
GRANT_REFUSED_PV_DMA = Refusal(
    NotGrantable,
    "PV domain without swiotlb-xen: gntdev's IMP_TO_REFS would grant wrong "
    "frames (it reads DMA addresses as machine frames); grant gntalloc "
    "pages instead (cpu mode), or use a kernel with the gntdev frames fix")
NO_DMABUF_MMAP = Refusal(
    MapRefused,
    "this kernel's gntdev dma-buf has no mmap (EINVAL): it is for a driver "
    "to import; for the CPU receive in cpu mode, or use a kernel with the "
    "gntdev dma-buf mmap patch")
RECEIVED_DMABUF = Refusal(
    NotGrantable,
    "a dma-buf received from another domain (EXP_FROM_REFS) cannot be "
    "granted on: its pages are grant mappings, and Xen grants only a "
    "domain's own RAM")


def dmabuf_grant_refusal(virt_mode: VirtMode | None, xen_swiotlb: bool,
                         grant_frames_fix: bool = False) -> Refusal | None:
    """Why this domain must not call IMP_TO_REFS at all, or None.

    The one statement of the rule: the table (:func:`expected`) and the
    real device (gntdev.py, from this domain's facts and, where the facts
    say the kernel might grant wrong frames, from what the kernel does) both
    ask it, because the kernel grants wrong frames here instead of
    refusing. ``virt_mode`` None (not in Xen) is no reason to refuse.
    """
    if virt_mode == VirtMode.PV and not xen_swiotlb \
            and not grant_frames_fix:
        return GRANT_REFUSED_PV_DMA
    return None


def expected(kind: DomainKind) -> Expected:
    """The grant device's behaviour in a domain of this kind (x86)."""
    if not kind.dmabuf_ioctls:
        return Expected(grant_dmabuf=NO_DMABUF_IOCTLS,
                        receive_dmabuf=NO_DMABUF_IOCTLS,
                        mmap_dmabuf=NO_DMABUF_IOCTLS)
    if kind.virt_mode is VirtMode.PV:
        receive = RECEIVE_REFUSED_PV
    elif not kind.receive_fix:
        receive = RECEIVE_REFUSED_DEVICE_MAP
    else:
        receive = None
    return Expected(
        grant_dmabuf=dmabuf_grant_refusal(kind.virt_mode, kind.xen_swiotlb,
                                          kind.grant_frames_fix),
        receive_dmabuf=receive,
        mmap_dmabuf=receive or (None if kind.dmabuf_mmap
                                else NO_DMABUF_MMAP),
        held_pages=kind.release_query)


def all_kinds() -> Iterator[DomainKind]:
    """Every combination the table distinguishes (for tests and the lab);
    swiotlb-xen only where it means something (PV)."""
    flags = ("receive_fix", "dmabuf_mmap", "grant_frames_fix",
             "release_query")
    for mode, ioctls, *values in itertools.product(
            VirtMode, (True, False), *[(False, True)] * len(flags)):
        for swiotlb in ((False, True) if mode is VirtMode.PV else (False,)):
            yield DomainKind(mode, ioctls, xen_swiotlb=swiotlb,
                             **dict(zip(flags, values)))

"""What the grant device does, per kind of domain: the one table.

The simulator takes its behaviour from here, and the Xen lab asserts the same
table against real Xen, so the two cannot drift apart silently. The defaults
are what ../shared/XEN-LAB.md measured on x86 (Xen 4.17, Linux 6.1):

* granting a dma-buf (IMP_TO_REFS) needs only the DMABUF ioctls
  (CONFIG_XEN_GNTDEV_DMABUF); without them every DMABUF ioctl is ENOTTY;
* receiving one (EXP_FROM_REFS) is EINVAL in a PV domain (the kernel refuses
  before asking Xen, ``use_ptemod``) and in a PVH/HVM domain whose kernel
  requests ``GNTMAP_device_map`` (added for all of CONFIG_X86 in
  drivers/xen/gntdev-dmabuf.c; Xen refuses device maps for auto-translated
  domains). With the one-line fix (device map only for PV) it works in
  PVH/HVM;
* mapping refs for the CPU (MAP_GRANT_REF + mmap) works in every guest type.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
from collections.abc import Iterator

from .errors import DmabufNotSupported, DmabufReceiveRefused, GrantError

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
    #: kernel requests GNTMAP_device_map only for PV (not upstream yet)
    receive_fix: bool = False


#: dom0 in Qubes (always PV) with a Qubes kernel.
DOM0_KIND = DomainKind(virt_mode=VirtMode.PV)


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


def expected(kind: DomainKind) -> Expected:
    """The grant device's behaviour in a domain of this kind (x86)."""
    if not kind.dmabuf_ioctls:
        return Expected(grant_dmabuf=NO_DMABUF_IOCTLS,
                        receive_dmabuf=NO_DMABUF_IOCTLS)
    if kind.virt_mode is VirtMode.PV:
        receive = RECEIVE_REFUSED_PV
    elif not kind.receive_fix:
        receive = RECEIVE_REFUSED_DEVICE_MAP
    else:
        receive = None
    return Expected(grant_dmabuf=None, receive_dmabuf=receive)


def all_kinds() -> Iterator[DomainKind]:
    """Every combination the table distinguishes (for tests and the lab)."""
    for mode, ioctls, fix in itertools.product(
            VirtMode, (True, False), (False, True)):
        yield DomainKind(mode, ioctls, fix)

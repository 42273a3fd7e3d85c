"""The contract suite against the real grant device (/dev/xen/gntdev).

Runs in a Qubes qube or in the project's Xen lab; skipped elsewhere. The
pair is the domain with itself (a domain may map its own grants, see
XEN-LAB.md). What the domain's kernel can do cannot all be read from here,
so the lab says it:

* QUBES_GPU_SHARE_SELF_DOMID -- this domain's id (default 0 in dom0);
* QUBES_GPU_SHARE_KIND -- traits as in open.py, e.g. ``pvh,fix`` or
  ``pv,nodmabuf`` (the virt mode defaults to /sys/hypervisor/guest_type,
  ``swiotlb`` to what the real device reads, grant/this_domain.py: so a PV
  domU expects IMP_TO_REFS refused and PV dom0 expects it to work).
"""

from __future__ import annotations

import os

import pytest

from grant_contract import *  # noqa: F401,F403 (the contract's tests)
from grant_contract import GrantImpl
from qubes_gpu_share.formats import PAGE_SIZE
from qubes_gpu_share.grant import this_domain
from qubes_gpu_share.grant.expected import VirtMode
from qubes_gpu_share.grant.open import DeviceSpec, open_grant_device
from qubes_gpu_share.grant.open import parse_traits

GNTDEV = "/dev/xen/gntdev"
#: a domain id that is not ours: refs granted to it must not map here
STRANGER_DOMID = 0x7FEF

pytestmark = [
    pytest.mark.xen,
    pytest.mark.skipif(not os.path.exists(GNTDEV),
                       reason=f"no {GNTDEV}: not a Xen domain (runs in the "
                              f"Xen lab or a Qubes qube)"),
]


def _self_domid() -> int:
    if "QUBES_GPU_SHARE_SELF_DOMID" in os.environ:
        return int(os.environ["QUBES_GPU_SHARE_SELF_DOMID"])
    if this_domain.is_dom0():
        return 0
    pytest.skip("set QUBES_GPU_SHARE_SELF_DOMID to this domain's id")


def _kind():
    """The env's traits; what it does not say is read as the real device
    reads it."""
    words = [word for word in os.environ.get(
        "QUBES_GPU_SHARE_KIND", "").split(",") if word]
    if not {mode.value for mode in VirtMode} & set(words):
        mode = this_domain.virt_mode()
        if mode is None:
            pytest.skip("no /sys/hypervisor/guest_type: set "
                        "QUBES_GPU_SHARE_KIND")
        words.append(mode.value)
    if "swiotlb" not in words and this_domain.xen_swiotlb():
        words.append("swiotlb")
    return parse_traits(",".join(words))


def _udmabuf_or_none():
    from qubes_gpu_share.alloc import UdmabufAllocator
    allocator = UdmabufAllocator()
    if not allocator.availability().ok:
        return None

    def make(pages: int) -> int:
        with allocator.allocate(pages * PAGE_SIZE) as allocation:
            return os.dup(allocation.fd)
    return make


@pytest.fixture
def grant_impl():
    domid, kind = _self_domid(), _kind()
    return GrantImpl(
        open_provider=lambda: open_grant_device(DeviceSpec()),
        open_consumer=lambda: open_grant_device(DeviceSpec()),
        provider_domid=domid, consumer_domid=domid,
        stranger_domid=STRANGER_DOMID, provider_kind=kind,
        consumer_kind=kind, make_dmabuf=_udmabuf_or_none())

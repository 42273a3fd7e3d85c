"""The contract suite against the real grant device (/dev/xen/gntdev).

Runs in a Qubes qube or in the project's Xen lab; skipped elsewhere. The
pair is the domain with itself (a domain may map its own grants, see
XEN-LAB.md). What the domain's kernel can do cannot all be read from here,
so the lab says it:

* QUBES_GPU_SHARE_SELF_DOMID -- this domain's id (default 0 in dom0);
* QUBES_GPU_SHARE_KIND -- traits as in open.py, e.g. ``pvh,fix`` or
  ``pv,nodmabuf`` (the virt mode defaults to /sys/hypervisor/guest_type).
"""

from __future__ import annotations

import os

import pytest

from grant_contract import *  # noqa: F401,F403 (the contract's tests)
from grant_contract import GrantImpl
from qubes_gpu_share.formats import PAGE_SIZE
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
    try:
        with open("/proc/xen/capabilities") as caps:
            if "control_d" in caps.read(256):
                return 0
    except OSError:
        pass
    pytest.skip("set QUBES_GPU_SHARE_SELF_DOMID to this domain's id")


def _kind():
    words = [word for word in os.environ.get(
        "QUBES_GPU_SHARE_KIND", "").split(",") if word]
    if not {mode.value for mode in VirtMode} & set(words):
        try:
            with open("/sys/hypervisor/guest_type") as guest:
                words.append(guest.read(16).strip().lower())
        except OSError:
            pytest.skip("no /sys/hypervisor/guest_type: set "
                        "QUBES_GPU_SHARE_KIND")
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

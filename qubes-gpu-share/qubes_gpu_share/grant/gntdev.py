"""The real grant device: /dev/xen/gntdev and /dev/xen/gntalloc.

Implements :mod:`.device` over :mod:`qubes_gpu_share.native`. Every lease
object opens its OWN gntdev (or gntalloc) fd, because the kernel ties state
to the open file:

* closing a gntdev fd ends every IMP_TO_REFS import and every mapping made
  through it, so a shared fd would tie unrelated leases' lifetimes together;
* a mapping's fd can be handed to an application (SCM_RIGHTS), which can then
  mmap exactly that lease (the offset in its :class:`CpuView`) and nothing
  else;
* EXP_WAIT_RELEASED looks exports up by fd number in the gntdev file's own
  list, so a private fd makes the number unambiguous.

Each constructor undoes what it opened when a later step fails (ExitStack),
so no fd leaks on an error path.

Two grants the kernel makes without complaint are refused here first
(expected.py): IMP_TO_REFS in a PV domain without swiotlb-xen whose kernel
grants wrong frames (the refs would name other frames than the buffer's;
a kernel with the gntdev frames fix, kernel/0003, is recognised by granting
the right ones: :func:`kernel_grants_own_frames`), and IMP_TO_REFS of a
dma-buf gntdev exported from foreign refs (Xen refuses every such ref when
the peer maps it).
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
from collections.abc import Sequence

from .. import native
from ..formats import PAGE_SIZE
from . import this_domain
from .domid import own_domid
from .device import (
    AllocatedGrant, CpuView, ForeignMapping, Grant, GrantDevice,
    ImportedDmabuf, check_page_count)
from .errors import (AlreadyReleased, DmabufNotSupported, GrantError,
                     MapRefused, NoGrantDevice)
from .expected import NO_DMABUF_IOCTLS, RECEIVED_DMABUF, Refusal

#: exp_name of the dma-bufs EXP_FROM_REFS makes: KBUILD_MODNAME of
#: drivers/xen/gntdev-dmabuf.c, part of the xen-gntdev module.
GNTDEV_EXPORTER = "xen_gntdev"


def _close(fd: int) -> int:
    """Close ``fd`` if open; returns -1 to store in its place."""
    if fd >= 0:
        os.close(fd)
    return -1


class DmabufGrant(Grant):
    """A dma-buf granted with IMP_TO_REFS.

    Holds a private dup of the dma-buf fd: the kernel keys the import by that
    fd number, so it must stay open and unchanged until IMP_RELEASE.
    """

    def __init__(self, gntdev_fd: int, dmabuf_fd: int, domid: int,
                 refs: tuple[int, ...]):
        self._gntdev_fd, self._dmabuf_fd = gntdev_fd, dmabuf_fd
        self.domid, self.refs = domid, refs
        self._revoked = False

    def revoke(self) -> None:
        if self._revoked:
            raise AlreadyReleased(
                f"grant of {self.pages} pages to domain {self.domid} was "
                f"already revoked")
        try:
            native.imp_release(self._gntdev_fd, self._dmabuf_fd)
        except AlreadyReleased:
            self._finish()
            raise
        self._finish()

    def try_end(self) -> int | None:
        """IMP_TRY_RELEASE: end what the peer no longer maps; the pages it
        still maps stay granted and the dup of the dma-buf stays open (the
        kernel keys the import by its number) until a later call finds
        them unmapped. A kernel without the ioctl: IMP_RELEASE, None."""
        if self._revoked:
            raise AlreadyReleased(
                f"grant of {self.pages} pages to domain {self.domid} was "
                f"already revoked")
        try:
            held = native.imp_try_release(self._gntdev_fd, self._dmabuf_fd)
        except DmabufNotSupported:
            self.revoke()
            return None
        except AlreadyReleased:
            self._finish()
            raise
        if held == 0:
            self._finish()
        return held

    def _finish(self) -> None:
        self._revoked = True
        self._dmabuf_fd = _close(self._dmabuf_fd)
        self._gntdev_fd = _close(self._gntdev_fd)


class GntallocGrant(AllocatedGrant):
    """Fresh pages from gntalloc, granted to one domain."""

    def __init__(self, gntalloc_fd: int, index: int, domid: int,
                 refs: tuple[int, ...]):
        self._fd, self._index = gntalloc_fd, index
        self.domid, self.refs = domid, refs
        self._revoked = False

    def view(self) -> CpuView:
        return CpuView(self._fd, self._index, self.pages * PAGE_SIZE)

    def revoke(self) -> None:
        if self._revoked:
            raise AlreadyReleased(
                f"gntalloc pages for domain {self.domid} already revoked")
        try:
            native.gntalloc_dealloc(self._fd, self._index, self.pages)
        finally:
            # closing the fd deallocates too: never keep a half-ended grant
            self._revoked = True
            self._fd = _close(self._fd)


class GntdevMapping(ForeignMapping):
    """Foreign refs reserved for mmap on a private gntdev fd.

    The refs were checked with GRANT_COPY before MAP_GRANT_REF (which asks
    Xen nothing); Xen checks them again at mmap. The range can be mmapped
    once: gntdev_mmap refuses a second mmap (EINVAL), even after munmap.
    """

    def __init__(self, gntdev_fd: int, index: int, domid: int,
                 refs: tuple[int, ...], writable: bool):
        self._fd, self._index = gntdev_fd, index
        self.domid, self.refs, self.writable = domid, refs, writable

    def view(self) -> CpuView:
        if self._fd < 0:
            raise ValueError("mapping is closed")
        return CpuView(self._fd, self._index, self.length)

    def mmap(self, writable: bool | None = None) -> mmap.mmap:
        writable = self.writable if writable is None else writable
        try:
            return self.view().mmap(writable)
        except OSError as exc:
            raise MapRefused(
                f"mapping {self.pages} refs of domain {self.domid} failed "
                f"({exc.strerror}): a ref was ended or is granted to another "
                f"domain, or this mapping was already mmapped (gntdev allows "
                f"one mmap per mapping)", exc.errno) from exc

    @property
    def pages(self) -> int:
        return len(self.refs)

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            native.unmap_grant_ref(self._fd, self._index, self.pages)
        finally:
            self._fd = _close(self._fd)


class GntdevImport(ImportedDmabuf):
    """A local dma-buf of foreign refs (EXP_FROM_REFS) on a private gntdev.

    With the gntdev mmap patch (kernel/0002) it maps for the CPU
    (:meth:`view`); every mapping holds the dma-buf, and EXP_WAIT_RELEASED
    waits for the mappings as for the fds."""

    def __init__(self, gntdev_fd: int, dmabuf_fd: int, domid: int,
                 refs: tuple[int, ...]):
        self._gntdev_fd = gntdev_fd
        self.fd = self._exported_fd = dmabuf_fd
        self.domid, self.refs = domid, refs

    def release(self, timeout_ms: int) -> None:
        if self._gntdev_fd < 0:
            raise AlreadyReleased("dma-buf import already released")
        self.fd = _close(self.fd)
        try:
            native.exp_wait_released(self._gntdev_fd, self._exported_fd,
                                     timeout_ms)
        except AlreadyReleased:
            pass  # the last user let go before we asked: released
        self._gntdev_fd = _close(self._gntdev_fd)

    def close(self) -> None:
        """Let go without waiting; the pages stay mapped until the last
        holder of a dup closes it."""
        self.fd = _close(self.fd)
        self._gntdev_fd = _close(self._gntdev_fd)


def _check_refs(gntdev_fd: int, domid: int, refs: tuple[int, ...]) -> None:
    """MapRefused unless Xen lets this domain read every ref now.

    MAP_GRANT_REF does no hypercall, so without this a ref that does not
    exist, was ended or is granted to another domain would be accepted and
    fail only at mmap -- which, besides, a mapping gets once. GRANT_COPY of
    one byte per ref asks Xen in one ioctl and maps nothing.
    """
    statuses = native.grant_copy_status(gntdev_fd, domid, refs)
    refused = [(ref, status) for ref, status in zip(refs, statuses)
               if status != native.GNTST_OKAY]
    if refused:
        ref, status = refused[0]
        raise MapRefused(
            f"{len(refused)} of {len(refs)} refs of domain {domid} refused "
            f"by Xen, first ref {ref}: "
            f"{native.GNTST_NAMES.get(status, 'GNTST ' + str(status))} "
            f"({status}); a ref does not exist, was ended, or is granted to "
            f"another domain")


def _dmabuf_ioctls_present() -> bool:
    """Whether this kernel has the DMABUF ioctls, asked without granting:
    IMP_RELEASE of an fd a fresh gntdev never imported finds nothing
    (ENOENT) and changes nothing; without the ioctls it is ENOTTY."""
    gntdev_fd = native.open_gntdev()
    try:
        native.imp_release(gntdev_fd, gntdev_fd)
    except DmabufNotSupported:
        return False
    except AlreadyReleased:
        pass
    finally:
        os.close(gntdev_fd)
    return True


#: what the frames check writes into its page and reads back through the
#: grant
_FRAMES_PROBE = b"qubes-gpu-share: own frames?\n"


def kernel_grants_own_frames() -> bool | None:
    """Whether this kernel's IMP_TO_REFS grants a buffer's own frames,
    tried: one page of a fresh udmabuf, with known bytes, granted to this
    domain itself and mapped back (MAP_GRANT_REF + mmap), read-only.

    For a PV domain without swiotlb-xen, the only place it is asked:
    Debian's 6.1 gntdev grants wrong frames there (Xen refuses the map,
    GNTST_bad_page, or another page shows), a kernel with the gntdev frames
    fix (kernel/0003) the right ones. Mapping a grant of one's own is
    harmless in PV (lab/README.md, finding 4 is PVH's). True, False, or
    None when it cannot be tried (no udmabuf, no DMABUF ioctls, no grant
    device or domain id).
    """
    from ..alloc.udmabuf import UdmabufAllocator
    allocator = UdmabufAllocator()
    if not allocator.availability().ok:
        return None
    try:
        domid = own_domid()
        allocation = allocator.allocate(PAGE_SIZE)
    except (GrantError, OSError, ValueError):
        return None
    with allocation:
        with allocation.mmap() as page:
            page[:len(_FRAMES_PROBE)] = _FRAMES_PROBE
        try:
            grant = imp_to_refs(allocation.fd, 1, domid)
        except DmabufNotSupported:
            return None
        except GrantError:
            return False
        with grant:
            return _reads_back(domid, grant.refs, _FRAMES_PROBE)


@functools.lru_cache(maxsize=1)
def kernel_grants_own_frames_once() -> bool | None:
    """:func:`kernel_grants_own_frames`, asked once per process: the
    answer stays while the kernel runs, and each asking grants and maps a
    page (harmless in PV, the only place it is asked)."""
    return kernel_grants_own_frames()


def _reads_back(domid: int, refs: tuple[int, ...], want: bytes) -> bool:
    """Map our own refs read-only and compare their first bytes."""
    try:
        gntdev_fd = native.open_gntdev(writable=False)
    except NoGrantDevice:
        return False
    try:
        index = native.map_grant_ref(gntdev_fd, domid, refs)
        try:
            with CpuView(gntdev_fd, index, PAGE_SIZE).mmap(
                    writable=False) as view:
                return bytes(view[:len(want)]) == want
        except OSError:     # Xen refused to map a frame (GNTST_bad_page)
            return False
        finally:
            native.unmap_grant_ref(gntdev_fd, index, len(refs))
    except GrantError:
        return False
    finally:
        os.close(gntdev_fd)


def imp_to_refs(dmabuf_fd: int, pages: int, to_domid: int) -> DmabufGrant:
    """The kernel's IMP_TO_REFS on its own gntdev fd, with none of the
    project's refusals before it: :meth:`GntdevDevice.grant_dmabuf` checks
    first; the Xen lab calls this to show what the kernel and Xen do."""
    with contextlib.ExitStack() as undo:
        own_dmabuf = os.dup(dmabuf_fd)
        undo.callback(os.close, own_dmabuf)
        gntdev_fd = native.open_gntdev()
        undo.callback(os.close, gntdev_fd)
        refs = native.imp_to_refs(gntdev_fd, own_dmabuf, pages, to_domid)
        undo.pop_all()
    return DmabufGrant(gntdev_fd, own_dmabuf, to_domid, refs)


class GntdevDevice(GrantDevice):
    """This domain's grant device. Opening it checks that it exists
    (NoGrantDevice otherwise); each operation opens its own fd.

    ``sys_root`` and ``proc_root`` are where this domain's facts are read
    (:mod:`.this_domain`; tests give a tmp tree), by default the module's
    SYS_ROOT and PROC_ROOT at the time of opening; ``frames_check`` asks
    the kernel where the facts leave it open, by default the real kernel
    (:func:`kernel_grants_own_frames_once`).
    """

    def __init__(self, sys_root: str | None = None,
                 proc_root: str | None = None,
                 frames_check: this_domain.FramesCheck | None = None
                 ) -> None:
        os.close(native.open_gntdev())
        self._sys_root = sys_root or this_domain.SYS_ROOT
        self._proc_root = proc_root or this_domain.PROC_ROOT
        self._frames_check = frames_check or kernel_grants_own_frames_once

    @functools.cached_property
    def _domain_refusal(self) -> Refusal | None:
        """Why no IMP_TO_REFS may be made in this domain, or None; read on
        the first grant, once (where the facts leave it open, by asking the
        kernel: this_domain.grant_refusal). A kernel without the DMABUF
        ioctls says so rather than the PV reason, as the table does."""
        refusal = this_domain.grant_refusal(
            self._sys_root, self._proc_root, frames_check=self._frames_check)
        if refusal is not None and not _dmabuf_ioctls_present():
            return NO_DMABUF_IOCTLS
        return refusal

    def _check_grantable(self, dmabuf_fd: int) -> None:
        """Refuse what IMP_TO_REFS would turn into refs Xen cannot honour."""
        refusal = self._domain_refusal
        if refusal is None and this_domain.dmabuf_exporter(
                dmabuf_fd, self._proc_root) == GNTDEV_EXPORTER:
            refusal = RECEIVED_DMABUF
        if refusal is not None:
            raise refusal.exception()

    def dmabuf_grant_refusal(self) -> Refusal | None:
        """Why this domain grants no dma-buf at all (the refusal
        :meth:`grant_dmabuf` would raise for any buffer), or None."""
        return self._domain_refusal

    def grant_dmabuf(self, dmabuf_fd: int, pages: int,
                     to_domid: int) -> DmabufGrant:
        check_page_count(pages)
        self._check_grantable(dmabuf_fd)
        return imp_to_refs(dmabuf_fd, pages, to_domid)

    def grant_new_pages(self, pages: int, to_domid: int) -> GntallocGrant:
        check_page_count(pages)
        with contextlib.ExitStack() as undo:
            gntalloc_fd = native.open_gntalloc()
            undo.callback(os.close, gntalloc_fd)
            index, refs = native.gntalloc_alloc(gntalloc_fd, to_domid, pages)
            undo.pop_all()
        return GntallocGrant(gntalloc_fd, index, to_domid, refs)

    def map_grant(self, from_domid: int, refs: Sequence[int],
                  writable: bool = True) -> GntdevMapping:
        check_page_count(len(refs))
        refs = tuple(refs)
        with contextlib.ExitStack() as undo:
            gntdev_fd = native.open_gntdev(writable)
            undo.callback(os.close, gntdev_fd)
            _check_refs(gntdev_fd, from_domid, refs)
            index = native.map_grant_ref(gntdev_fd, from_domid, refs)
            undo.pop_all()
        return GntdevMapping(gntdev_fd, index, from_domid, refs, writable)

    def import_dmabuf(self, from_domid: int,
                      refs: Sequence[int]) -> GntdevImport:
        check_page_count(len(refs))
        refs = tuple(refs)
        with contextlib.ExitStack() as undo:
            gntdev_fd = native.open_gntdev()
            undo.callback(os.close, gntdev_fd)
            dmabuf_fd = native.exp_from_refs(gntdev_fd, from_domid, refs)
            undo.pop_all()
        return GntdevImport(gntdev_fd, dmabuf_fd, from_domid, refs)

    def close(self) -> None:
        """Nothing to give up: every lease object owns its own fds."""

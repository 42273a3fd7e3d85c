"""The grant device seam: what an agent does with Xen grants.

One interface, two implementations: :mod:`.gntdev` (cffi over
``<xen/gntdev.h>`` and ``<xen/gntalloc.h>``, the product) and :mod:`.sim`
(a cross-process grant-table simulator that enforces the same rules, for
tests and the demo). Callers use only the names below.

Provider side (the qube that owns pages):

* :meth:`GrantDevice.grant_dmabuf` -- IMP_TO_REFS: a local dma-buf of exactly
  ``pages`` pages is granted to one foreign domain; ended by
  :meth:`Grant.revoke` (IMP_RELEASE);
* :meth:`GrantDevice.grant_new_pages` -- gntalloc ALLOC_GREF: fresh pages
  granted to one domain, for providers without a dma-buf source; ended by
  :meth:`Grant.revoke` (DEALLOC_GREF + unmap).

Ending a grant the peer still maps: the kernel cannot take the pages back.
:meth:`Grant.revoke` hands the end to the kernel, which defers it (the
grant entry and the page stay allocated until the peer unmaps or dies,
drivers/xen/grant-table.c) and tells nobody. :meth:`Grant.try_end` ends
only what the peer no longer maps and says how many pages it still holds,
where the kernel can tell (IMP_TRY_RELEASE, kernel/0004; not gntalloc):
call it again later to see them go.

Consumer side (the qube that receives refs):

* :meth:`GrantDevice.map_grant` -- MAP_GRANT_REF + mmap, ``cpu`` mode, works in
  every guest type; refs that are not ours to map are refused here
  (MapRefused), and the mapping can be mmapped ONCE (see :class:`CpuView`);
* :meth:`GrantDevice.import_dmabuf` -- EXP_FROM_REFS, ``dmabuf`` mode, only
  where the kernel can (see XEN-LAB.md: not on stock x86); released with
  :meth:`ImportedDmabuf.release`, which closes and then waits
  (EXP_WAIT_RELEASED is keyed by the fd number at export time).

Release order (DESIGN.md, "hard facts"): IMP_RELEASE cannot revoke a grant
the peer still maps, yet drops the dma-buf at once. So the consumer lets go
first and confirms; only then does the provider revoke. The simulator counts
every violation as a hazard.

Every object owns its file descriptors and closes them on ``close()``/
``revoke()`` and on context-manager exit; no fd leaks on an error path.
"""

from __future__ import annotations

import abc
import dataclasses
import mmap
from collections.abc import Sequence
from types import TracebackType

from ..formats import MAX_LEASE_PAGES, PAGE_SIZE, ReceiveMode
from .errors import TooManyPages

__all__ = ["ReceiveMode", "CpuView", "check_page_count", "Grant",
           "AllocatedGrant", "ForeignMapping", "ImportedDmabuf",
           "GrantDevice"]


@dataclasses.dataclass(frozen=True)
class CpuView:
    """Where a process maps a buffer: ``mmap(fd, length, offset=offset)``.

    The fd belongs to the object that handed out the view; pass it on (e.g.
    with SCM_RIGHTS) or dup it, never close it directly.

    For a consumer's :class:`ForeignMapping`: in a PV domain a mapping
    can be mmapped once (Linux 6.1's gntdev refuses a second mmap of the
    same range with EINVAL, even after munmap, and in PVH/HVM too), and
    that first mmap fixes it read-only or writable. Whoever mmaps it --
    normally the application the fd is handed to, never the agent before
    handing it -- does it once and keeps the mapping.
    """

    fd: int
    offset: int
    length: int

    def mmap(self, writable: bool = True) -> mmap.mmap:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return mmap.mmap(self.fd, self.length, mmap.MAP_SHARED, prot,
                         offset=self.offset)


def check_page_count(pages: int) -> int:
    """Refuse counts the kernel cannot take, before calling it."""
    if isinstance(pages, bool) or not isinstance(pages, int):
        raise TooManyPages(f"page count must be an integer, got {pages!r}")
    if not 1 <= pages <= MAX_LEASE_PAGES:
        raise TooManyPages(
            f"{pages} pages: a grant holds 1 to {MAX_LEASE_PAGES} pages "
            f"(the kernel keeps the count in 16 bits); split the buffer")
    return pages


class _Owned(abc.ABC):
    """Context-manager plumbing shared by every object that owns fds."""

    @abc.abstractmethod
    def close(self) -> None:
        """Give up everything this object holds; idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Grant(_Owned):
    """Pages of this domain granted to one foreign domain (provider side)."""

    #: the grantee's domain id
    domid: int
    #: one grant reference per page, in page order
    refs: tuple[int, ...]

    @property
    def pages(self) -> int:
        return len(self.refs)

    @abc.abstractmethod
    def revoke(self) -> None:
        """End the grant (IMP_RELEASE, or DEALLOC_GREF for gntalloc pages).

        Call only after the consumer confirmed it unmapped: what the peer
        still maps stays granted, its end deferred by the kernel, unseen
        (use :meth:`try_end` to know). Raises AlreadyReleased when called
        twice on the real device's terms (``close`` is the idempotent
        variant).
        """

    def try_end(self) -> int | None:
        """End every page's grant that the peer no longer maps; return the
        number of pages it still maps, or None when the kernel cannot tell.

        * 0: every grant ended; this object is revoked (as by
          :meth:`revoke`);
        * N > 0: those N pages are still mapped by the peer and stay
          granted (the buffer with them); the others were ended and cannot
          be mapped again. Call again later: the count falls as the peer
          unmaps, and to 0 when its domain dies (Xen drops a dead domain's
          mappings);
        * None: this kernel cannot say (no IMP_TRY_RELEASE, or gntalloc
          pages): the grant was ended with :meth:`revoke`, and what the
          peer still maps is deferred by the kernel, out of sight.

        The default (any grant without a report) is :meth:`revoke`.
        AlreadyReleased once the grant is fully ended.
        """
        self.revoke()
        return None

    def close(self) -> None:
        if not getattr(self, "_revoked", False):
            self.revoke()


class AllocatedGrant(Grant):
    """Fresh pages allocated by gntalloc and granted to one domain; the
    provider draws into them through :meth:`view`."""

    @abc.abstractmethod
    def view(self) -> CpuView:
        """The granted pages, for the provider (or a local application)."""


class ForeignMapping(_Owned):
    """A foreign domain's refs mapped into this domain (``cpu`` mode)."""

    domid: int
    refs: tuple[int, ...]

    @abc.abstractmethod
    def view(self) -> CpuView:
        """The mapped pages: an fd the application can mmap."""

    def mmap(self, writable: bool = True) -> mmap.mmap:
        return self.view().mmap(writable)

    @property
    def length(self) -> int:
        return len(self.refs) * PAGE_SIZE


class ImportedDmabuf(_Owned):
    """A local dma-buf made from a foreign domain's refs (``dmabuf`` mode)."""

    domid: int
    refs: tuple[int, ...]
    #: the dma-buf fd: for import into a GPU driver (PRIME) and, where the
    #: kernel's exporter has mmap (kernel/0002), for the CPU (:meth:`view`)
    fd: int

    @property
    def length(self) -> int:
        return len(self.refs) * PAGE_SIZE

    def view(self) -> CpuView:
        """The dma-buf for the CPU: ``mmap`` it (any number of times,
        unlike a cpu-mode mapping), bracketing access with
        DMA_BUF_IOCTL_SYNC. Mapping fails (OSError, EINVAL) where the
        kernel's exporter has no mmap; :meth:`cpu_mappable` asks. Every
        mapping keeps the dma-buf alive, so :meth:`release` waits for the
        mappings too."""
        if self.fd < 0:
            raise ValueError("the dma-buf was released")
        return CpuView(self.fd, 0, self.length)

    def cpu_mappable(self) -> bool:
        """Whether this dma-buf maps for the CPU here: tried (an mmap and
        munmap of its first page, which a dma-buf allows any number of
        times)."""
        try:
            with CpuView(self.fd, 0, PAGE_SIZE).mmap(writable=False):
                return True
        except (OSError, ValueError):
            return False

    @abc.abstractmethod
    def release(self, timeout_ms: int) -> None:
        """Close our fd, then wait until every other user (dups handed to
        applications) has let go. Raises ReleaseTimeout if one still holds it
        after ``timeout_ms``; calling again later continues the wait."""


class GrantDevice(_Owned):
    """One process's handle on the grant device of its domain."""

    @abc.abstractmethod
    def grant_dmabuf(self, dmabuf_fd: int, pages: int,
                     to_domid: int) -> Grant:
        """IMP_TO_REFS: grant a local dma-buf of exactly ``pages`` pages."""

    @abc.abstractmethod
    def grant_new_pages(self, pages: int, to_domid: int) -> AllocatedGrant:
        """gntalloc: allocate ``pages`` zeroed pages granted to ``to_domid``."""

    @abc.abstractmethod
    def map_grant(self, from_domid: int, refs: Sequence[int],
                  writable: bool = True) -> ForeignMapping:
        """MAP_GRANT_REF + mmap of refs granted to us by ``from_domid``.

        Raises MapRefused here (not at mmap) for a ref that does not exist,
        was ended or is granted to another domain. The returned mapping can
        be mmapped once."""

    @abc.abstractmethod
    def import_dmabuf(self, from_domid: int,
                      refs: Sequence[int]) -> ImportedDmabuf:
        """EXP_FROM_REFS: a local dma-buf of refs granted by ``from_domid``."""

"""The provider side of the agent: grant buffers, keep them, revoke on order.

dom0 decided the layout (formats.layout_for); the provider allocates exactly
that many pages, or takes the fd an application offered, grants them to the
consumer's domain id and keeps buffer and grant under the lease id until dom0
says, with ``qubes.GpuRevoke`` role=provider, that the consumer let go. It
never revokes on its own: IMP_RELEASE under a live mapping hands pages the
peer still sees back to this qube's allocator (DESIGN.md, hard facts).

Without any dma-buf source (no udmabuf, no dma-heap) the provider still
serves ``cpu`` consumers with gntalloc pages (``grant_new_pages``), as Qubes'
GUI agent does with window buffers. In a PV qube a dma-buf source is used
only where its kernel grants a dma-buf's own frames (the gntdev frames fix,
kernel/0003, recognised by doing it: grant/this_domain.grant_refusal);
elsewhere there it grants gntalloc pages.

A consumer's word is not a release: when dom0 revokes, the provider ends
only the grants the consumer no longer maps (``Grant.try_end``, where the
kernel can say: IMP_TRY_RELEASE, kernel/0004). Pages still mapped stay
granted, with their buffer, and the answer says how many
(:func:`revoke_answer`, RevokeAnswer.held_pages); dom0 asks again later, and each time the provider
ends what was let go. Where the kernel cannot say (no IMP_TRY_RELEASE,
gntalloc pages) the grant is ended on the consumer's word, and whatever
the consumer still maps is the kernel's deferred end, unseen.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os

from ..alloc import Allocation, AllocationError, Allocator
from ..grant.device import Grant, GrantDevice
from ..grant.errors import AlreadyReleased, GrantError
from ..protocol import (Error, ExportAnswer, ExportRequest, GrantRefs,
                        RevokeAnswer, RevokeStatus)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Provided:
    """One lease this qube provides: the buffer and its grant."""

    request: ExportRequest
    grant: Grant
    #: None when the pages came from gntalloc (the grant owns them)
    allocation: Allocation | None
    #: the application connection that offered the buffer, if any
    owner: object | None = None

    @property
    def lease(self) -> str:
        return self.request.lease

    def dup_fd(self) -> tuple[int, int, int]:
        """(fd, offset, length) of the pages for a local application to
        draw into; the caller owns the new fd."""
        if self.allocation is not None:
            return os.dup(self.allocation.fd), 0, self.request.meta.size
        view = self.grant.view()
        return os.dup(view.fd), view.offset, view.length

    def close(self) -> None:
        """Revoke the grant, then free the pages (the order IMP_RELEASE needs:
        the dma-buf must still exist when it is released)."""
        try:
            self.grant.close()
        finally:
            if self.allocation is not None:
                self.allocation.close()

    def end(self) -> int | None:
        """End what the consumer no longer maps: the pages it still maps
        (they stay granted, and the buffer with them), 0 once everything
        ended (the pages are freed), None where the kernel cannot tell
        (everything was ended on the consumer's word and freed)."""
        try:
            held = self.grant.try_end()
        except AlreadyReleased:
            held = 0
        if held:
            return held
        if self.allocation is not None:
            self.allocation.close()
            self.allocation = None
        return held


def revoke_answer(held: int | None, consumer: str) -> RevokeAnswer:
    """The provider's answer to dom0's revoke, from the pages the consumer
    still maps (None: the kernel cannot tell).

    For the broker's held-pages accounting (issue 14): pages still mapped
    are answered ``busy`` with the count (``held_pages``, and in the
    reason), so dom0 keeps the lease revoking, its budget held, and asks
    again later; ``held_pages`` None says the kernel cannot tell.
    """
    if held:
        return RevokeAnswer(RevokeStatus.BUSY,
                            f"{held} pages still mapped by {consumer}",
                            held_pages=held)
    return RevokeAnswer(RevokeStatus.RELEASED, held_pages=held)


class Provider:
    """Every lease this qube provides, by lease id."""

    def __init__(self, device: GrantDevice, allocator: Allocator | None):
        self._device = device
        self._allocator = allocator
        self._leases: dict[str, Provided] = {}
        #: exports not yet shown to a local drawing application (``next``)
        self.exported: asyncio.Queue[Provided] = asyncio.Queue()

    def __contains__(self, lease: str) -> bool:
        return lease in self._leases

    def get(self, lease: str) -> Provided | None:
        return self._leases.get(lease)

    def export(self, request: ExportRequest,
               offered: Allocation | None = None, owner: object = None
               ) -> ExportAnswer | Error:
        """Allocate (or take ``offered``) and grant; the answer for dom0.

        ``offered`` is owned by this call from now on: kept with the lease,
        or closed on failure.
        """
        if request.lease in self._leases:
            if offered is not None:
                offered.close()
            return Error("duplicate", f"lease {request.lease} is already "
                                      f"exported")
        try:
            provided = self._grant(request, offered)
        except (AllocationError, GrantError, OSError) as exc:
            log.warning("export of lease %s to %s failed: %s", request.lease,
                        request.consumer, exc)
            return Error.of("export-failed", str(exc))
        provided.owner = owner
        self._leases[request.lease] = provided
        if offered is None:
            self.exported.put_nowait(provided)
        log.info("lease %s: granted %d pages to %s (domid %d)",
                 request.lease, request.meta.pages, request.consumer,
                 request.consumer_domid)
        return ExportAnswer(GrantRefs.from_ints(provided.grant.refs))

    def _grant(self, request: ExportRequest,
               offered: Allocation | None) -> Provided:
        meta, domid = request.meta, request.consumer_domid
        if offered is None and self._allocator is None:
            return Provided(request,
                            self._device.grant_new_pages(meta.pages, domid),
                            None)
        allocation = offered
        try:
            if allocation is None:
                allocation = self._allocator.allocate(meta.size)
            if allocation.pages != meta.pages:
                raise AllocationError(
                    f"the buffer has {allocation.pages} pages, the lease's "
                    f"layout {meta.pages}")
            grant = self._device.grant_dmabuf(allocation.fd, meta.pages,
                                              domid)
        except BaseException:
            if allocation is not None:
                allocation.close()
            raise
        return Provided(request, grant, allocation)

    def revoke(self, lease: str) -> RevokeAnswer:
        """dom0 says the consumer let go: end what it no longer maps, and
        free the pages once nothing is held. Pages it still maps stay
        granted and are answered (:func:`revoke_answer`); dom0 revokes
        again later, which ends them once they are let go. An unknown lease
        is already gone (a restart of this agent, whose closed grant device
        ended every grant): released."""
        provided = self._leases.get(lease)
        if provided is None:
            return revoke_answer(0, "")
        consumer = provided.request.consumer
        try:
            held = provided.end()
        except GrantError as exc:
            log.warning("lease %s: revoke reported %s", lease, exc)
            held = None
            with contextlib.suppress(GrantError, OSError):
                provided.close()
        if held:
            log.warning("lease %s: %s still maps %d of its %d pages: they "
                        "stay granted", lease, consumer, held,
                        provided.grant.pages)
            return revoke_answer(held, consumer)
        self._leases.pop(lease, None)
        log.info("lease %s: revoked the grant to %s%s", lease, consumer,
                 "" if held == 0 else " (the kernel cannot say whether it "
                 "still maps pages)")
        return revoke_answer(held, consumer)

    def owned_by(self, owner: object) -> list[str]:
        return [lease for lease, provided in self._leases.items()
                if provided.owner is owner]

    def close(self) -> None:
        """At exit: the grant device's close ends the grants anyway; free
        what we hold so the fds do not outlive the agent's state."""
        for provided in self._leases.values():
            with contextlib.suppress(GrantError, OSError):
                provided.close()
        self._leases.clear()

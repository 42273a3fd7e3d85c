"""The provider side of the agent: grant buffers, keep them, revoke on order.

dom0 decided the layout (formats.layout_for); the provider allocates exactly
that many pages, or takes the fd an application offered, grants them to the
consumer's domain id and keeps buffer and grant under the lease id until dom0
says, with ``qubes.GpuRevoke`` role=provider, that the consumer let go. It
never revokes on its own: IMP_RELEASE under a live mapping hands pages the
peer still sees back to this qube's allocator (DESIGN.md, hard facts).

Without any dma-buf source (no udmabuf, no dma-heap) the provider still
serves ``cpu`` consumers with gntalloc pages (``grant_new_pages``), as Qubes'
GUI agent does with window buffers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os

from ..alloc import Allocation, AllocationError, Allocator
from ..grant.device import Grant, GrantDevice
from ..grant.errors import GrantError
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
        """dom0 says the consumer let go: end the grant and free the pages.
        An unknown lease is already gone (a restart of this agent, whose
        closed grant device ended every grant): released."""
        provided = self._leases.pop(lease, None)
        if provided is None:
            return RevokeAnswer(RevokeStatus.RELEASED)
        try:
            provided.close()
        except GrantError as exc:
            log.warning("lease %s: revoke reported %s", lease, exc)
        log.info("lease %s: revoked the grant to %s", lease,
                 provided.request.consumer)
        return RevokeAnswer(RevokeStatus.RELEASED)

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

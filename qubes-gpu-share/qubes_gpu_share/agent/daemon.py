"""The agent: one object tying both roles, the broker link and the sockets.

dom0's calls (services.py) and applications' requests (appserver.py) end
here; the provider and consumer halves (provider.py, consumer.py) hold the
buffers. Which roles are on, the qube's Qubes services say (roles.py), at
each request. A release dom0 must hear is retried until it does
(releases.py), and leases dom0 holds that nobody here knows are ended
(reconcile.py, sparing the answers of calls still on their way: calls.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable
from typing import TypeVar

from ..alloc import Allocator, adopt
from ..appproto import LeaseInfo, LeaseReq, OfferReq
from ..formats import ReceiveMode, layout_for
from ..grant.device import GrantDevice
from ..protocol import (Error, ExportAnswer, ExportRequest, LeaseAnswer,
                        LeaseEntry, LeaseRequest, OfferRequest, Ok,
                        RevokeAnswer, Role)
from .broker_link import BrokerLink, BrokerRefused
from .calls import LeaseCalls
from .consumer import Consumer, Received
from .provider import Provided, Provider
from .reconcile import Reconciler
from .releases import Releases
from .roles import SERVICE_FOR_ROLE, Roles

log = logging.getLogger(__name__)

T = TypeVar("T")


class RequestRefused(Exception):
    """An application's request the agent refuses (appserver.py answers it
    with an error); ``code`` as in protocol Error codes."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _reason(exc: BaseException) -> str:
    """An exception as the reason dom0 and the application are told."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} (errno {exc.errno})"
    return str(exc) or type(exc).__name__


def _check_holder(lease: str, holder: object | None, caller: object) -> None:
    """Only the application holding a lease (or that offered it) may end
    it; one nobody holds, any application of the qube may."""
    if holder is not None and holder is not caller:
        raise RequestRefused("not-yours", f"lease {lease} is held by "
                             f"another application")


class Agent:
    """Both roles of one qube's agent."""

    def __init__(self, name: str, device: GrantDevice,
                 allocator: Allocator | None, link: BrokerLink, roles: Roles):
        self.name = name
        self.roles = roles
        self.link = link
        self.provider = Provider(device, allocator)
        self.consumer = Consumer(device, self._notify_revoke)
        self._allocator = allocator
        #: set by the app server: notify(connection, lease)
        self.notify_app = lambda connection, lease: None
        self._releases = Releases(link)
        self._calls = LeaseCalls()
        self.reconciler = Reconciler(link, self._calls, self._knows,
                                     self._releases.tell)

    def _notify_revoke(self, connection: object, lease: str) -> None:
        self.notify_app(connection, lease)

    def _require(self, role: Role) -> None:
        if not self.roles.enabled(role):
            raise RequestRefused("role-disabled", f"this qube's "
                                 f"{SERVICE_FOR_ROLE[role]} service is off")

    # -- what dom0 asks (services.py) -------------------------------------

    def export(self, request: ExportRequest) -> ExportAnswer | Error:
        if not self.roles.enabled(Role.PROVIDER):
            return Error("role-disabled", "this qube does not provide")
        return self.provider.export(request)

    def deliver(self, answer: LeaseAnswer) -> Ok | Error:
        if not self.roles.enabled(Role.CONSUMER):
            return Error("role-disabled", "this qube does not receive")
        try:
            self.consumer.receive(answer)
        except Exception as exc:  # pylint: disable=broad-except
            # any failure (the device's errno, a bug): dom0 gets a definite
            # "not received", never a lease this agent does not know
            log.warning("lease %s from %s: cannot receive: %s", answer.lease,
                        answer.provider, _reason(exc))
            return Error.of("receive-failed", _reason(exc))
        return Ok()

    async def revoke(self, lease: str, role: Role) -> RevokeAnswer:
        if role is Role.PROVIDER:
            return self.provider.revoke(lease)
        return await self.consumer.revoke(lease)

    # -- what applications ask (appserver.py) -----------------------------

    async def lease(self, request: LeaseReq,
                    holder: object) -> tuple[int, LeaseInfo]:
        self._require(Role.CONSUMER)
        with self._calls.track(request.provider):
            answer = await self._reconciling_on_loss(self.link.lease(
                request.provider,
                LeaseRequest(request.spec, request.mode, request.ttl)))
            try:
                received = self.consumer.receive(answer, holder)
            except Exception as exc:  # pylint: disable=broad-except
                log.warning("lease %s from %s: cannot map: %s", answer.lease,
                            answer.provider, _reason(exc))
                with contextlib.suppress(BrokerRefused):
                    await self.link.release(answer.lease)
                raise RequestRefused("receive-failed",
                                     _reason(exc)) from None
        return received.hand_out()

    async def _reconciling_on_loss(self, call: Awaitable[T]) -> T:
        """A call to dom0 that failed without dom0's word (cut, qrexec
        trouble, no answer) may have left a lease recorded whose answer
        never came: reconcile (:class:`Reconciler`)."""
        try:
            return await call
        except BrokerRefused as exc:
            if not exc.answered:
                log.warning("call to dom0 failed (%s): reconciling leases",
                            exc)
                self.reconciler.request()
            raise

    def _knows(self, lease: str) -> bool:
        """Held, delivered and waiting to be taken, or being released."""
        return self.consumer.get(lease) is not None or lease in self._releases

    async def offer(self, request: OfferReq, fd: int, owner: object) -> str:
        """Offer the application's buffer (``fd``, owned by this call)."""
        try:
            self._require(Role.PROVIDER)
            allocation = self._adopt(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        if allocation.pages != layout_for(request.spec).pages:
            allocation.close()
            raise RequestRefused("size", "the buffer's size does not match "
                                 "its description")
        exported = []

        def export(export_request: ExportRequest) -> ExportAnswer | Error:
            exported.append(export_request.lease)
            return self.provider.export(export_request, allocation, owner)

        try:
            answer = await self._reconciling_on_loss(self.link.offer(
                request.consumer, OfferRequest(request.spec, request.ttl),
                export))
        except BrokerRefused as exc:
            if exported and not exc.answered:
                await self._withdraw(exported[0], owner)
            raise
        finally:
            if not exported:
                allocation.close()
        return answer.lease

    async def _withdraw(self, lease: str, owner: object) -> None:
        """An offer whose end we did not hear may be active at the
        consumer, while the application was told it failed: end it (dom0
        revokes it; it refuses one it never recorded)."""
        try:
            await self.release(lease, owner)
        except (RequestRefused, BrokerRefused) as exc:
            log.warning("lease %s: withdrawing the failed offer: %s",
                        lease, exc)

    def _adopt(self, fd: int):
        allocation = adopt(fd)
        adopt_memfd = getattr(self._allocator, "adopt_memfd", None)
        if allocation.kind == "adopted-memfd" and adopt_memfd is not None:
            try:
                return adopt_memfd(allocation.fd)
            finally:
                allocation.close()
        return allocation

    async def next(self, role: Role, timeout: int,
                   holder: object) -> tuple[int, LeaseInfo]:
        """The next buffer offered to us, or exported by us (to draw in)."""
        self._require(role)
        queue = (self.consumer.delivered if role is Role.CONSUMER
                 else self.provider.exported)
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), timeout or None)
            except asyncio.TimeoutError:
                raise RequestRefused("timeout", f"nothing arrived in "
                                     f"{timeout}s") from None
            if isinstance(item, Received):
                if self.consumer.get(item.lease) is item:
                    item.holder = holder
                    return item.hand_out()
            elif self.provider.get(item.lease) is item:
                return self._provided_info(item)

    @staticmethod
    def _provided_info(provided: Provided) -> tuple[int, LeaseInfo]:
        request = provided.request
        fd, offset, length = provided.dup_fd()
        return fd, LeaseInfo(request.lease, Role.PROVIDER, request.consumer,
                             ReceiveMode.CPU, request.meta, 0, offset,
                             length)

    async def list(self) -> tuple[LeaseEntry, ...]:
        return (await self.link.list()).leases

    async def release(self, lease: str, holder: object) -> None:
        """An application lets go of a lease it holds or offered, or of one
        of this qube's leases that no application holds (an offered lease
        nobody took, an export; ``qubes-gpu-share release``). A lease
        another application holds is refused: only its holder may end it.
        One this agent does not know goes to dom0, which refuses it unless
        it is this qube's."""
        received = self.consumer.get(lease)
        provided = self.provider.get(lease)
        if received is not None:
            _check_holder(lease, received.holder, holder)
            if not await self.consumer.let_go(lease):
                raise RequestRefused("busy", "a copy of the dma-buf is "
                                     "still open")
        elif provided is not None:
            _check_holder(lease, provided.owner, holder)
        await self._releases.tell(lease)

    async def connection_closed(self, holder: object) -> None:
        """Every lease an application held or offered ends with it."""
        for lease in (self.consumer.held_by(holder)
                      + self.provider.owned_by(holder)):
            try:
                await self.release(lease, holder)
            except (RequestRefused, BrokerRefused) as exc:
                log.warning("lease %s: release after the application went "
                            "away: %s", lease, exc)

    def close(self) -> None:
        self.reconciler.close()
        self.consumer.close()
        self.provider.close()


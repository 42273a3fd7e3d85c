"""The consumer side of the agent: map a lease, hand it over, let go in order.

A lease arrives as a :class:`~..protocol.LeaseAnswer` (the answer to our own
``qubes.GpuLease``, or ``qubes.GpuDeliver`` for an offered one). In ``cpu``
mode the refs are mapped (MAP_GRANT_REF) and the application gets the
mapping's fd with the offset and length to mmap; in ``dmabuf`` mode they
become a local dma-buf (EXP_FROM_REFS) and the application gets a dup of it,
with offset 0 and the buffer's length: the same mmap call maps it where the
kernel's exporter has mmap (kernel/0002; the agent finds out when the lease
arrives, :attr:`Received.cpu_mappable`), and it is for a GPU driver to
import anyway.

Revocation is cooperative and ordered: the agent tells the application,
waits (bounded) until it let go (``release`` or its connection closed), and
only then closes its own side and confirms ``released``. While an application
still holds the buffer the answer is ``busy``, never ``released``: the
provider would otherwise free pages a live mapping still shows. In dmabuf
mode the kernel checks the application really closed its dup
(EXP_WAIT_RELEASED); in cpu mode the agent relies on the application's word
and its connection (an mmap made from the fd is invisible to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from typing import Callable

from ..appproto import LeaseInfo
from ..formats import ReceiveMode
from ..grant.device import ForeignMapping, GrantDevice, ImportedDmabuf
from ..grant.errors import GrantError, ReleaseTimeout
from ..protocol import LeaseAnswer, RevokeAnswer, RevokeStatus, Role

log = logging.getLogger(__name__)

#: How long a revoke waits for the application, and then for the kernel.
REVOKE_WAIT = 5.0
RELEASE_WAIT_MS = 1000


@dataclasses.dataclass
class Received:
    """One lease this qube receives, and who holds it here."""

    answer: LeaseAnswer
    local: ForeignMapping | ImportedDmabuf
    #: the application connection holding it; None while nobody took it
    holder: object | None = None
    let_go: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    #: whether the application can mmap what it is handed: always in cpu
    #: mode; in dmabuf mode where the kernel's exporter has mmap (tried)
    cpu_mappable: bool = True

    @property
    def lease(self) -> str:
        return self.answer.lease

    def hand_out(self) -> tuple[int, LeaseInfo]:
        """A new fd for the application (it owns it) and what it is."""
        if isinstance(self.local, ImportedDmabuf):
            fd, offset, length = (os.dup(self.local.fd), 0,
                                  self.answer.meta.size)
        else:
            view = self.local.view()
            fd, offset, length = os.dup(view.fd), view.offset, view.length
        return fd, LeaseInfo(self.lease, Role.CONSUMER, self.answer.provider,
                             self.answer.mode, self.answer.meta,
                             self.answer.deadline, offset, length)

    def close_local(self) -> None:
        """Our side of the mapping; raises ReleaseTimeout (dmabuf) while a
        dup handed out is still open somewhere."""
        if isinstance(self.local, ImportedDmabuf):
            self.local.release(RELEASE_WAIT_MS)
        else:
            self.local.close()


class Consumer:
    """Every lease this qube receives, by lease id."""

    def __init__(self, device: GrantDevice,
                 notify: Callable[[object, str], None]):
        self._device = device
        #: notify(holder, lease): tell an application to let go
        self._notify = notify
        self._leases: dict[str, Received] = {}
        #: delivered (offered) leases nobody took yet (``next``)
        self.delivered: asyncio.Queue[Received] = asyncio.Queue()
        self.revoke_wait = REVOKE_WAIT

    def get(self, lease: str) -> Received | None:
        return self._leases.get(lease)

    def receive(self, answer: LeaseAnswer, holder: object = None) -> Received:
        """Map the lease in its mode; GrantError when the kernel refuses."""
        if answer.lease in self._leases:
            raise GrantError(f"lease {answer.lease} is already received")
        if answer.mode is ReceiveMode.DMABUF:
            local = self._device.import_dmabuf(answer.provider_domid,
                                               answer.refs)
        else:
            local = self._device.map_grant(answer.provider_domid, answer.refs)
        received = Received(answer, local, holder)
        if isinstance(local, ImportedDmabuf):
            received.cpu_mappable = local.cpu_mappable()
            log.info("lease %s: the dma-buf %s for the CPU here", answer.lease,
                     "maps" if received.cpu_mappable else
                     "does not map (this kernel's gntdev exporter has no "
                     "mmap): only a GPU driver can use it")
        self._leases[answer.lease] = received
        if holder is None:
            self.delivered.put_nowait(received)
        log.info("lease %s: received %d pages from %s in %s mode",
                 answer.lease, answer.meta.pages, answer.provider,
                 answer.mode.value)
        return received

    async def let_go(self, lease: str) -> bool:
        """The application released the lease (or went away): close our
        side now, so that a revoke waiting for it can confirm. False while
        a copy of the dma-buf is still open somewhere."""
        received = self._leases.get(lease)
        if received is None:
            return True
        received.holder = None
        try:
            await asyncio.to_thread(received.close_local)
        except ReleaseTimeout:
            log.warning("lease %s: a copy of the dma-buf is still open or "
                        "mapped", lease)
            return False
        finally:
            received.let_go.set()
        self._leases.pop(lease, None)
        return True

    async def revoke(self, lease: str) -> RevokeAnswer:
        """dom0 revokes: released only once nothing here holds the buffer."""
        received = self._leases.get(lease)
        if received is None:
            return RevokeAnswer(RevokeStatus.RELEASED)
        if received.holder is not None:
            self._notify(received.holder, lease)
            try:
                await asyncio.wait_for(received.let_go.wait(),
                                       self.revoke_wait)
            except asyncio.TimeoutError:
                log.warning("lease %s: the application did not let go",
                            lease)
                return RevokeAnswer(RevokeStatus.BUSY,
                                    "an application still holds the buffer")
        if lease in self._leases:
            try:
                await asyncio.to_thread(received.close_local)
            except ReleaseTimeout:
                return RevokeAnswer(RevokeStatus.BUSY,
                                    "a copy of the dma-buf is still open or "
                                    "mapped")
            self._leases.pop(lease, None)
        log.info("lease %s: let go of the buffer from %s", lease,
                 received.answer.provider)
        return RevokeAnswer(RevokeStatus.RELEASED)

    def held_by(self, holder: object) -> list[str]:
        return [lease for lease, received in self._leases.items()
                if received.holder is holder]

    def close(self) -> None:
        for received in self._leases.values():
            with contextlib.suppress(GrantError, OSError):
                received.close_local()
        self._leases.clear()

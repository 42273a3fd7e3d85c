"""The agent when its grant device fails (issue 13): every kernel call of
the simulated device fails in turn, with EMFILE, ENOMEM or EIO, while the
agent grants (GpuExport), receives an offer (GpuDeliver) and maps a lease
an application asked for. Each time dom0 gets a definite answer (the call
failed, with the reason), no fd is left behind, the agent keeps no lease
it did not report, and nothing stays granted or mapped in the simulated
hypervisor.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os

import pytest

from qubes_gpu_share.agent.broker_link import BrokerRefused
from qubes_gpu_share.agent.daemon import Agent, RequestRefused
from qubes_gpu_share.agent.roles import Roles
from qubes_gpu_share.alloc.memfd import MemfdAllocator
from qubes_gpu_share.appproto import LeaseReq
from qubes_gpu_share.formats import BlobSpec, ReceiveMode, layout_for
from qubes_gpu_share.grant.expected import DomainKind
from qubes_gpu_share.grant.sim import SimGrantDevice
from qubes_gpu_share.grant.sim import hypervisor as run_hypervisor
from qubes_gpu_share.names import new_lease_id
from qubes_gpu_share.protocol import (Error, ExportAnswer, ExportRequest,
                                      LeaseAnswer)

_domids = itertools.count(300)
PAGES = 3
META = layout_for(BlobSpec(PAGES * 4096))
ERRNOS = (errno.EMFILE, errno.ENOMEM, errno.EIO)


@pytest.fixture(scope="module")
def hv(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hv") / "hv.sock")
    with run_hypervisor(path):
        yield path


class Faults:
    """Makes the device's ``n``-th kernel call fail with ``code``."""

    def __init__(self, device: SimGrantDevice):
        self.calls = 0
        self.fail_at: int | None = None
        self.code = errno.EIO
        real = device._call

        def call(*args, **kwargs):
            self.calls += 1
            if self.calls == self.fail_at:
                raise OSError(self.code, os.strerror(self.code))
            return real(*args, **kwargs)
        device._call = call


class FakeLink:
    """dom0 for the application path: answers a lease with ``answer``,
    records releases."""

    def __init__(self):
        self.answer: LeaseAnswer | None = None
        self.released: list[str] = []

    async def lease(self, provider, request):
        return self.answer

    async def release(self, lease):
        self.released.append(lease)

    async def list(self):
        raise BrokerRefused("qrexec", "not here", answered=True)


def _agent(hv, name, *, allocator=True, kind=DomainKind()):
    domid = next(_domids)
    device = SimGrantDevice(hv, domid, kind)
    link = FakeLink()
    agent = Agent(name, device, MemfdAllocator() if allocator else None,
                  link, Roles.decided_by_broker())
    return agent, device, domid, link


class FailingAllocator(MemfdAllocator):
    """memfd_create fails (EMFILE when the process is out of fds)."""

    def __init__(self, code):
        super().__init__()
        self.code = code

    def allocate(self, size):
        raise OSError(self.code, os.strerror(self.code))


def _fds() -> dict[str, str]:
    """This process's open fds and what they are."""
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            found[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass  # the directory's own fd, closed by now
    return found


def _export(agent, consumer_domid):
    return agent.export(ExportRequest(new_lease_id(), "work", consumer_domid,
                                      META))


@pytest.mark.parametrize("code", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("source", ["memfd", "gntalloc"])
def test_export_fails_cleanly_at_every_step(hv, code, source):
    provider, device, _domid, _link = _agent(hv, "gpu",
                                             allocator=source == "memfd")
    faults = Faults(device)
    consumer_domid = next(_domids)
    before = faults.calls
    answer = _export(provider, consumer_domid)
    assert isinstance(answer, ExportAnswer)
    steps = faults.calls - before
    assert steps >= 1
    for step in range(1, steps + 1):
        fds = _fds()
        faults.code, faults.fail_at = code, faults.calls + step
        answer = _export(provider, consumer_domid)
        assert isinstance(answer, Error), f"step {step}"
        assert answer.code == "export-failed"
        assert os.strerror(code) in answer.message
        assert _fds() == fds, f"an fd leaked at step {step}"
        faults.fail_at = None
    assert len(provider.provider._leases) == 1  # the successful one only
    if source == "memfd":  # the allocator fails first
        provider._allocator = provider.provider._allocator = \
            FailingAllocator(code)
        fds = _fds()
        answer = _export(provider, consumer_domid)
        assert isinstance(answer, Error) and answer.code == "export-failed"
        assert _fds() == fds
    provider.close()
    device.close()


@pytest.mark.parametrize("code", ERRNOS, ids=errno.errorcode.get)
@pytest.mark.parametrize("mode", [ReceiveMode.CPU, ReceiveMode.DMABUF])
def test_delivery_and_lease_fail_cleanly_at_every_step(hv, code, mode):
    provider, pdevice, provider_domid, _ = _agent(hv, "gpu")
    consumer, cdevice, consumer_domid, link = _agent(
        hv, "work", kind=DomainKind(receive_fix=True))
    faults = Faults(cdevice)

    def granted() -> LeaseAnswer:
        lease = new_lease_id()
        refs = provider.export(ExportRequest(lease, "work", consumer_domid,
                                             META)).refs
        return LeaseAnswer(lease, "gpu", provider_domid, mode, META, 12345,
                           refs)

    before = faults.calls
    assert consumer.deliver(granted()).__class__.__name__ == "Ok"
    steps = faults.calls - before
    for step in range(1, steps + 1):
        # an offer delivered by dom0
        answer = granted()
        fds = _fds()
        faults.code, faults.fail_at = code, faults.calls + step
        result = consumer.deliver(answer)
        assert isinstance(result, Error) and result.code == "receive-failed"
        assert consumer.consumer.get(answer.lease) is None
        assert _fds() == fds, f"an fd leaked at step {step} (deliver)"
        # a lease an application asked for: dom0 is told at once
        link.answer = granted()
        fds = _fds()
        faults.fail_at = faults.calls + step
        with pytest.raises(RequestRefused) as failed:
            asyncio.run(consumer.lease(
                LeaseReq("gpu", BlobSpec(PAGES * 4096), mode, 60),
                holder=object()))
        assert failed.value.code == "receive-failed"
        assert link.released[-1] == link.answer.lease
        assert consumer.consumer.get(link.answer.lease) is None
        assert _fds() == fds, f"an fd leaked at step {step} (lease)"
        faults.fail_at = None
    stats = cdevice.stats(consumer_domid)
    # the one successful delivery, nothing of the failed ones
    assert stats.mapped_pages == PAGES
    assert stats.exports == (1 if mode is ReceiveMode.DMABUF else 0)
    for agent, device in ((consumer, cdevice), (provider, pdevice)):
        agent.close()
        device.close()

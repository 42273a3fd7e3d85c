"""The project's broker in the lab's dom0, for the lying consumer (issue 14).

The rest of the lab has no broker: refs travel over xenstore. To see the
broker's arithmetic on a real kernel's answer, dom0 runs the broker core
(broker/core.py) over a registry file, the lab's domains as its in-memory
Qubes model. Its calls to dom0's agent go where they go in dom0, to the
agent's service socket, served by the agent's own service code
(agent/services.py) in front of a provider agent (agent/provider.py) on
dom0's real grant device. The broker's event loop runs in a thread of its
own; the lab's synchronous steps call into it.

What it shows: when the consumer says released while its domain still
maps the pages, the provider agent's revoke answer (IMP_TRY_RELEASE's
count) keeps the lease ``releasing`` with the pages charged to dom0's
budget and the liar's quota, in the admin's view; the broker retries with
backoff, and the budget comes back once the provider's kernel reports the
pages free (after ``xl destroy``).
"""

import asyncio
import tempfile
import threading

from qubes_gpu_share import protocol
from qubes_gpu_share.broker.admin import AdminApi
from qubes_gpu_share.broker.agents import Agents, Timeouts
from qubes_gpu_share.broker.core import Broker
from qubes_gpu_share.formats import BlobSpec, ReceiveMode
from qubes_gpu_share.agent.services import make_server
from qubes_gpu_share.protocol import Error
from qubes_gpu_share.qubes.memory import MemoryQubes
from qubes_gpu_share.registry import Registry

PROVIDER = "dom0"
#: the broker's retry backoff here (seconds): first, longest
RETRY = (0.2, 1.0)


class LabBroker:
    """The broker core with ``provider`` (a Provider agent) as dom0's
    agent and ``consumer`` (domain ``domid``) as the only other qube."""

    def __init__(self, provider, consumer, domid):
        self.provider = provider
        self.consumer = consumer
        self.revokes = []          # the provider agent's answers, in order
        self._dir = tempfile.TemporaryDirectory(prefix="lab-broker-")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        daemon=True)
        self._thread.start()
        self._server = make_server(self, f"{self._dir.name}/service.sock")
        self.broker = self._call(self._make(consumer, domid))
        self.admin = AdminApi(self.broker)

    async def _make(self, consumer, domid):
        model = MemoryQubes.from_dict({"qubes": [
            {"name": PROVIDER, "services": ["gpu-share-provider"],
             "features": {"gpu-share-dom0": "1"}},
            {"name": consumer, "running": True, "xid": domid,
             "virt_mode": "pv", "services": ["gpu-share"]}]},
            service_handler=self._no_agent)
        await self._server.start()
        registry = Registry(f"{self._dir.name}/leases.db")
        agents = Agents(model, timeouts=Timeouts(10, 10, 10),
                        dom0_socket=f"{self._dir.name}/service.sock")
        broker = Broker(registry, model, agents, retry_base=RETRY[0],
                        retry_max=RETRY[1])
        broker.trusted = lambda: True    # no qubesd events in the lab
        return broker

    @staticmethod
    async def _no_agent(qube, service, payload):
        """The liar has no agent: a call to it gets no answer."""
        return 1, b""

    # -- dom0's agent, as agent/services.py calls it --

    def export(self, request):
        return self.provider.export(request)

    def deliver(self, answer):
        return Error.of("malformed", "dom0 receives nothing in the lab")

    async def revoke(self, lease, role):
        answer = self.provider.revoke(lease)
        self.revokes.append((answer.status.value, answer.reason))
        return answer

    def _call(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(
            timeout)

    def lease(self, pages):
        """The consumer's GpuLease: the broker's answer (refs, lease id)."""
        request = protocol.LeaseRequest(BlobSpec(pages * 4096),
                                        ReceiveMode.CPU, 600)
        return self._call(self.broker.lease(self.consumer, PROVIDER,
                                            request))

    def release(self, lease_id):
        """The consumer's GpuRelease (its word); the lease's state after."""
        return self._call(self.broker.release(self.consumer,
                                              lease_id)).state.value

    def view(self, lease_id):
        """What the admin sees: the lease (show) and both budgets."""
        async def both():   # (the admin's reads flush pending commits)
            shown = await self.admin.handle({"op": "show", "id": lease_id})
            budgets = await self.admin.handle({"op": "budgets"})
            return shown, budgets
        shown, budgets = self._call(both())
        side = {f"{kind}:{entry['qube']}": entry
                for kind in ("providers", "consumers")
                for entry in budgets.get(kind, [])}
        provider = side.get(f"providers:{PROVIDER}", {})
        consumer = side.get(f"consumers:{self.consumer}", {})
        lease = shown.get("lease", shown)
        return {"state": lease.get("state"),
                "waiting": lease.get("waiting"),
                "lease_held_pages": lease.get("held_pages"),
                "dom0_pages_used": provider.get("pages_used", 0),
                "dom0_held_pages": provider.get("held_pages", 0),
                "liar_pages": consumer.get("pages", 0),
                "liar_held_pages": consumer.get("held_pages", 0)}

    def close(self):
        async def stop():
            await self.broker.commits.flush()
            await self._server.close()
            self.broker.registry.close()
        try:
            self._call(stop(), timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()     # its selector and self-pipe: 3 fds
            self.provider.close()
            self._dir.cleanup()

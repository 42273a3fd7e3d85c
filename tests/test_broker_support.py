"""Shared pieces of the broker tests (no tests here): a registry file, the
in-memory Qubes model and scripted agents answering with real messages."""

from __future__ import annotations

import asyncio

from qubes_gpu_share import protocol
from qubes_gpu_share.broker.agents import Agents, Timeouts
from qubes_gpu_share.broker.core import Broker
from qubes_gpu_share.protocol import (
    ExportAnswer, ExportRequest, GrantRefs, LeaseAnswer, Ok, RevokeAnswer,
    RevokeRequest)
from qubes_gpu_share.qrexec import reply
from qubes_gpu_share.qubes.memory import MemoryQubes
from qubes_gpu_share.registry import Registry

QUBES = {"qubes": [
    {"name": "sys-gpu", "running": True, "virt_mode": "hvm",
     "services": ["gpu-share-provider"]},
    {"name": "work", "running": True, "virt_mode": "pvh",
     "services": ["gpu-share", "gpu-share-provider"]},
    {"name": "personal", "running": True, "services": ["gpu-share"]},
]}


class ScriptedAgents:
    """Plays every qube's agent: records calls, answers as told.

    ``export_answer(qube, request)`` may be replaced to misbehave;
    ``busy`` holds (qube, role) pairs that answer a revoke with busy."""

    def __init__(self):
        self.calls: list[tuple[str, str, protocol.Message]] = []
        self.busy: set[tuple[str, str]] = set()
        self.export_answer = lambda qube, request: reply.ok_reply(
            protocol.encode(ExportAnswer(GrantRefs.from_ints(
                range(100, 100 + request.meta.pages)))))
        self.deliver_answer = lambda qube, answer: reply.ok_reply(
            protocol.encode(Ok()))

    async def __call__(self, qube: str, service: str, payload: bytes):
        await asyncio.sleep(0)
        name = service.partition("+")[0]
        if name == "qubes.GpuExport":
            message = protocol.decode(payload, ExportRequest)
            output = self.export_answer(qube, message)
        elif name == "qubes.GpuDeliver":
            message = protocol.decode(payload, LeaseAnswer)
            output = self.deliver_answer(qube, message)
        else:
            message = protocol.decode(payload, RevokeRequest)
            if (qube, message.role.value) in self.busy:
                answer = RevokeAnswer("busy", "an application holds it")
            else:
                answer = RevokeAnswer("released")
            output = reply.ok_reply(protocol.encode(answer))
        self.calls.append((qube, name, message))
        return 0, output

    def revokes(self, lease_id: str) -> list[tuple[str, str]]:
        return [(qube, message.role.value) for qube, name, message
                in self.calls if name == "qubes.GpuRevoke"
                and message.lease == lease_id]


class Clock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_broker(tmp_path, *, qubes=QUBES, timeouts=Timeouts(1, 1, 1)):
    """(broker, model, agents, clock) over a real registry file."""
    agents = ScriptedAgents()
    model = MemoryQubes.from_dict(qubes, service_handler=agents)
    clock = Clock()
    registry = Registry(str(tmp_path / "leases.db"), clock=clock)
    broker = Broker(registry, model, Agents(model, timeouts=timeouts),
                    clock=clock, retry_base=0.01, retry_max=0.05)
    # these tests drive the flows without the event follower
    # (broker/follow.py), whose trust rule tests/test_broker_facts.py checks
    broker.trusted = lambda: True
    return broker, model, agents, clock

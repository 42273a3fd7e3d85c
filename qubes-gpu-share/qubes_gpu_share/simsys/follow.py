"""Keep a broker's in-memory Qubes model in step with ROOT/qubes.json.

In the simulation a test or the demo starts and shuts down qubes by
rewriting qubes.json (:meth:`.system.SimSystem.set_running`); the broker
process holds a :class:`~..qubes.memory.MemoryQubes` loaded from it. This
loop, run by the broker when its facts come from ``memory:FILE``, turns a
changed ``running`` into the model's own start/stop, which emit the events
Qubes would (domain-start; domain-pre-shutdown, domain-shutdown).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os

from ..qubes.memory import MemoryQubes

log = logging.getLogger(__name__)


async def follow_model(model: MemoryQubes, path: str | os.PathLike,
                       interval: float = 0.05) -> None:
    """Apply qube start/stop from the file at *path*, until cancelled."""
    seen = None
    while True:
        try:
            stamp = os.stat(path).st_mtime_ns
            if stamp != seen:
                seen = stamp
                apply_model_file(model, path)
        except (OSError, ValueError) as exc:
            log.warning("cannot follow %s: %s", path, exc)
        await asyncio.sleep(interval)


def apply_model_file(model: MemoryQubes, path: str | os.PathLike) -> None:
    """Start or stop the model's qubes whose ``running`` differs in the
    file; a started qube takes the file's domain id (the one its simulated
    agent uses). Events are queued, so listeners see the final snapshot."""
    with open(path, "rb") as file:
        entries = json.loads(file.read(1 << 20))["qubes"]
    for entry in entries:
        info = model.qube(entry["name"])
        running = entry.get("running", False)
        if info is None or info.is_dom0 or info.running == running:
            continue
        if running:
            model.start(info.name)
            model.add(dataclasses.replace(model.qube(info.name),
                                          xid=entry.get("xid", -1)))
        else:
            model.stop(info.name)
        log.info("qube %s %s (from %s)", info.name,
                 "started" if running else "shut down", path)

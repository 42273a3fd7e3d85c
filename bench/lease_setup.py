"""The lease side of bench_setup.py and bench_copy.py: one real lease in
the simulated system (grant hypervisor, broker, agents as processes, the
demo policy), taken by this process as the application in qube ``work``
from ``sys-gpu`` through the client library.

Why this process is the consumer application: the floor's consumer is a
process other than the one that allocates; here the provider agent
allocates and this process maps, so both sides cross a process boundary
and write every page with the same memset (fdpass.fill).
"""

from __future__ import annotations

import atexit
import tempfile
import time
from pathlib import Path

from fdpass import fill

from qubes_gpu_share import client
from qubes_gpu_share.limits import BUDGET_PAGES
from qubes_gpu_share.simsys import SimQube, SimSystem

REPO = Path(__file__).resolve().parents[1]
POLICY = [REPO / "policy" / "60-gpu-share.policy",
          REPO / "demo" / "policy" / "30-user-gpu-share.policy"]
QUBES = [SimQube("sys-gpu", 2, "hvm", ("gpu-share-provider",),
                 features={BUDGET_PAGES.feature: "65536"}),
         SimQube("work", 3, "pvh", ("gpu-share",), tags=("gpu-share",))]

_STATE: dict[str, object] = {}


def _client() -> client.Client:
    if "client" not in _STATE:
        root = tempfile.mkdtemp(prefix="bench-simsys-")
        sim = SimSystem(Path(root) / "root", QUBES, POLICY)
        sim.__enter__()
        app = client.Client(sim.app_socket("work"))
        _STATE.update(sim=sim, client=app)

        def stop() -> None:
            app.close()
            sim.__exit__(None, None, None)
        atexit.register(stop)
    return _STATE["client"]  # type: ignore[return-value]


def one_lease(size: int) -> tuple[float, float]:
    """(setup s, teardown s): request to written mapping; unmap+release."""
    app = _client()
    start = time.perf_counter()
    buffer = app.lease("sys-gpu", nbytes=size)
    mapping = buffer.mmap()
    fill(mapping, 0xA5)
    ready = time.perf_counter()
    mapping.close()
    buffer.close(release=True)
    return ready - start, time.perf_counter() - ready

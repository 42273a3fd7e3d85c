#!/usr/bin/env python3
"""make demo: a buffer crosses from one simulated qube to another, no copy.

Runs the whole system on this machine (docs/demo.md): the grant simulator,
the dom0 broker and one agent per qube as separate processes, qrexec policy
evaluated by the simulated router. This program plays the applications in
the qubes, each through its own qube's application socket. Every step says
what it checks; the exit status is 1 when any check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import pathlib
import shutil
import sys
import tempfile
import time

from qubes_gpu_share import client
from qubes_gpu_share.alloc.memfd import create_sealed_memfd
from qubes_gpu_share.formats import linear_layout
from qubes_gpu_share.limits import BUDGET_PAGES
from qubes_gpu_share.simsys import SimQube, SimSystem
from qubes_gpu_share.simsys.pattern import (first_difference, pattern_bytes,
                                            xr24_png)

HERE = pathlib.Path(__file__).resolve().parent
POLICY = [HERE.parent / "policy" / "60-gpu-share.policy",
          HERE / "policy" / "30-user-gpu-share.policy"]
#: sys-gpu may hold two full-HD frames (2 x 2,025 pages) but not a 4K one.
BUDGET = 4_096
QUBES = [
    SimQube("sys-gpu", 2, "hvm", ("gpu-share-provider", "gpu-share"),
            features={BUDGET_PAGES.feature: str(BUDGET)}),
    # stock kernel; provider too, to offer its own shared memory
    SimQube("work", 3, "pvh", ("gpu-share", "gpu-share-provider")),
    # a kernel with the project's gntdev series (kernel/): receives dma-bufs
    # and maps them for the CPU
    SimQube("media", 4, "pvh", ("gpu-share",), kernel=("fixed",)),
    SimQube("untrusted", 5, "pvh", ("gpu-share",)),       # not in the policy
]
WIDTH, HEIGHT, FOURCC = 1920, 1080, "XR24"


class Demo:
    """The steps, printed for a person; failed checks are counted."""

    def __init__(self, system: SimSystem, out: pathlib.Path):
        self.system = system
        self.out = out
        self.failures = 0
        self.meta = linear_layout(WIDTH, HEIGHT, FOURCC)

    def say(self, text: str) -> None:
        print(text, flush=True)

    def check(self, ok: bool, what: str) -> bool:
        self.say(f"   [{'ok' if ok else 'FAILED'}] {what}")
        self.failures += not ok
        return ok

    def app(self, qube: str):
        """An application in *qube*: a client of that qube's agent."""
        return client.Client(self.system.app_socket(qube))

    def compare(self, seen, seed: int, png: str) -> None:
        expected = pattern_bytes(self.meta, seed)
        where = first_difference(seen, expected)
        self.check(where is None,
                   f"all {WIDTH}x{HEIGHT} pixels match the pattern"
                   + ("" if where is None else f" (first difference at "
                                                f"byte {where})"))
        (self.out / png).write_bytes(xr24_png(self.meta, seen))
        self.say(f"   wrote {self.out / png}")

    # -- the steps -------------------------------------------------------

    def pull_cpu(self) -> None:
        self.say(f"\n1. work asks sys-gpu for a {WIDTH}x{HEIGHT} {FOURCC} "
                 f"buffer, cpu mode (what works on x86 Qubes today)")
        with self.app("work") as work, self.app("sys-gpu") as gpu:
            buffer = work.lease("sys-gpu", width=WIDTH, height=HEIGHT,
                                fourcc=FOURCC, mode="cpu")
            self.say(f"   lease {buffer.lease}: {buffer.meta.pages} pages, "
                     f"mode {buffer.mode.value}")
            self.draw(gpu, buffer.lease, seed=1)
            stats = self.system.grant_stats("work")
            self.check(stats.mapped_pages == self.meta.pages,
                       f"work maps {stats.mapped_pages} of sys-gpu's pages "
                       f"(the same pages: no byte was copied)")
            with buffer.mmap() as pixels:
                self.compare(pixels, 1, "work-cpu.png")
            buffer.close()

    def pull_dmabuf(self) -> None:
        self.say("\n1b. media (simulated kernel with the project's gntdev "
                 "series) asks for the same, dmabuf mode")
        with self.app("media") as media, self.app("sys-gpu") as gpu:
            buffer = media.lease("sys-gpu", width=WIDTH, height=HEIGHT,
                                 fourcc=FOURCC, mode="dmabuf")
            self.check(buffer.mode == "dmabuf",
                       f"media got a dma-buf (mode {buffer.mode.value})")
            self.draw(gpu, buffer.lease, seed=2)
            expected = pattern_bytes(self.meta, 2)
            where = self.system.check_dmabuf("media", buffer.fd,
                                             self.meta.pages, expected)
            self.check(where is None, "the dma-buf holds sys-gpu's pattern "
                       "(as a GPU driver importing it reads it)")
            pixels = buffer.mmap()      # the same one call as in cpu mode
            with buffer.cpu_access(write=False):
                self.compare(pixels, 2, "media-dmabuf.png")
            buffer.close()

    def draw(self, gpu, lease_id: str, seed: int) -> None:
        """sys-gpu's application takes the buffer its agent exports and
        draws into it (the lease's pages, in sys-gpu's memory)."""
        exported = gpu.exported(timeout=10)
        self.check(exported.lease == lease_id,
                   "sys-gpu's application got the exported buffer to draw in")
        with exported.mmap() as pixels:
            pixels[:] = pattern_bytes(self.meta, seed)
        exported.close()
        self.say(f"   sys-gpu drew the test pattern (seed {seed})")

    def offer(self) -> None:
        self.say("\n2. the other way: an application in work offers its "
                 "shared memory (a memfd) to sys-gpu -- the Wayland-SHM case")
        size = self.meta.pages * mmap.PAGESIZE
        fd = create_sealed_memfd(size, "wayland-shm")
        try:
            os.pwrite(fd, pattern_bytes(self.meta, 5), 0)
            with self.app("work") as work, self.app("sys-gpu") as gpu:
                lease_id = work.offer("sys-gpu", fd, width=WIDTH,
                                      height=HEIGHT, fourcc=FOURCC)
                self.say(f"   lease {lease_id} offered to sys-gpu")
                received = gpu.incoming(timeout=10)
                self.check(received.lease == lease_id,
                           f"sys-gpu received it (mode {received.mode.value})")
                with received.mmap() as pixels:
                    self.compare(pixels, 5, "sys-gpu-offered.png")
                received.close()
        finally:
            os.close(fd)

    def refusals(self) -> None:
        self.say("\n3. refused requests, each with its one-line reason")
        with self.app("untrusted") as untrusted:
            self.refused(lambda: untrusted.lease(
                "sys-gpu", width=WIDTH, height=HEIGHT, fourcc=FOURCC),
                "untrusted -> sys-gpu (not in the policy)")
        with self.app("work") as work:
            self.refused(lambda: work.lease(
                "sys-gpu", width=3840, height=2160, fourcc=FOURCC),
                f"work -> sys-gpu, 3840x2160 (8,100 pages; budget {BUDGET})")

    def refused(self, attempt, what: str) -> None:
        try:
            buffer = attempt()
        except client.ClientError as exc:
            self.check(True, f"{what}: refused: {exc}")
            return
        buffer.close()
        self.check(False, f"{what}: was granted")

    def finish(self) -> None:
        self.say("\n4. every buffer was released")
        system = self.system
        with contextlib.suppress(TimeoutError):
            system.wait_until(lambda: not system.live_leases(), 10, "")
        pages = system.provider_pages("sys-gpu")
        self.check(pages == 0, f"sys-gpu's budget is back: {pages} of "
                               f"{BUDGET} pages in use, as at the start")
        hazards = system.hazards()
        self.check(not hazards, f"grants ended while a consumer still "
                   f"mapped them (deferred ends): {len(hazards)}"
                   + "".join(f"\n      {h}" for h in hazards))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo-out", type=pathlib.Path,
                        help="where the PNGs and logs go (default demo-out)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    root = pathlib.Path(tempfile.mkdtemp(prefix="qubes-gpu-share-demo-"))
    print(f"Simulated Qubes system in {root}: grant hypervisor, dom0 broker, "
          f"agents in {', '.join(q.name for q in QUBES)}")
    started = time.monotonic()
    demo = None
    try:
        with SimSystem(root, QUBES, POLICY) as system:
            demo = Demo(system, args.out)
            for step in (demo.pull_cpu, demo.pull_dmabuf, demo.offer,
                         demo.refusals, demo.finish):
                step()
    except Exception as exc:  # a step that could not even run
        print(f"\ndemo FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return_code = 1
    else:
        return_code = int(demo.failures > 0)
    finally:
        logs = args.out / "logs"
        shutil.rmtree(logs, ignore_errors=True)
        if (root / "logs").exists():
            shutil.copytree(root / "logs", logs)
        shutil.rmtree(root, ignore_errors=True)
    verdict = ("every check passed" if return_code == 0
               else "FAILED" if demo is None or not demo.failures
               else f"{demo.failures} check(s) FAILED")
    print(f"\n{verdict} in {time.monotonic() - started:.1f} s; logs in "
          f"{args.out / 'logs'}")
    return return_code


if __name__ == "__main__":
    sys.exit(main())

"""A domU's side of the lab. For each gntdev build named on the kernel
command line (lab.gntdev=stock,upstream,fixed), in turn: the expected
table's row tried for real against dom0, and the probe. With the first
build that has the dma-buf ioctls it also consumes dom0's two cpu-mode
leases through the project's consumer agent; where EXP_FROM_REFS works
(the fixed build in PVH) it checks the dma-buf it gets from every side."""

import asyncio
import json
import os
import threading
import time

import checks
import labio
import lease_lab as L
from labio import emit

STEP_TIMEOUT = 240


def consume_cpu_leases(base):
    """dom0's udmabuf and gntalloc leases, received in cpu mode by the
    consumer agent: check the picture, draw ours over it, let go, say so."""
    from qubes_gpu_share.agent.consumer import Consumer
    from qubes_gpu_share.formats import ReceiveMode
    from qubes_gpu_share.grant.gntdev import GntdevDevice
    from qubes_gpu_share.protocol import GrantRefs, LeaseAnswer

    consumer = Consumer(GntdevDevice(), notify=lambda holder, lease: None)
    # what dom0 managed to provide: udmabuf, gntalloc, GPU buffers
    for mode in labio.xs_read(f"{base}/modes").split(","):
        lease = labio.xs_read(f"{base}/{mode}/lease")
        refs = labio.xs_read_ints(f"{base}/{mode}/refs", STEP_TIMEOUT)
        answer = LeaseAnswer(lease, "dom0", 0, ReceiveMode.CPU, L.META, 0,
                             GrantRefs.from_ints(refs))
        with labio.Timer() as t_map:
            received = consumer.receive(answer, holder="lab")
            fd, info = received.hand_out()       # what an application gets
            buf = L.map_fd(fd, info.offset, info.length)
            os.close(fd)
        with labio.Timer() as t_check:
            where = L.differs(buf, L.picture(L.SEED_PROVIDER))
        emit("consumer-sees-picture", where is None, mode=mode,
             pages=len(refs), bytes=len(buf), first_difference=where,
             map_ms=t_map.ms, check_ms=t_check.ms)
        buf[:] = L.picture(L.SEED_CONSUMER)
        buf.close()
        labio.xs_write(f"{base}/{mode}/written", 1)
        with labio.Timer() as t:
            let_go = asyncio.run(consumer.let_go(lease))
        emit("consumer-release", let_go is True, mode=mode, ms=t.ms)
        labio.xs_write(f"{base}/{mode}/released", 1)
    consumer.close()


def grant_back(base, variant, dmabuf_fd=None):
    """Grant to dom0 with IMP_TO_REFS a udmabuf of ours holding the receive
    bytes (the control) and, when given, the dma-buf EXP_FROM_REFS made of
    dom0's pages (the re-grant). dom0 maps both and says what it found.

    Judged against the expected table: the control maps with the same
    bytes where the table lets this domain grant dma-bufs (not in a PV
    domU: its refs name wrong frames); a re-grant never maps (its pages
    are grant mappings, Xen grants only a domain's own RAM)."""
    from qubes_gpu_share.alloc.udmabuf import UdmabufAllocator
    from qubes_gpu_share.grant.expected import expected
    # past the project's own refusals: the kernel and Xen are under test
    from qubes_gpu_share.grant.gntdev import imp_to_refs as raw_grant
    control = UdmabufAllocator().allocate(L.RECV_PAGES * 4096)
    m = control.mmap()
    m[:] = L.recv_bytes()
    m.close()
    grants = {}
    if checks.VARIANTS[variant]["dmabuf_ioctls"]:
        grants["control"] = raw_grant(control.fd, L.RECV_PAGES, 0)
    if dmabuf_fd is not None:
        grants["regrant"] = raw_grant(dmabuf_fd, L.RECV_PAGES, 0)
    for what in ("control", "regrant"):
        refs = grants[what].refs if what in grants else ()
        labio.xs_write_ints(f"{base}/{what}/refs", list(refs))
    verdicts = json.loads(labio.xs_wait(f"{base}/grant-back/verdicts",
                                        STEP_TIMEOUT))
    for grant in grants.values():
        grant.revoke()
    control.close()
    if "control" not in grants:
        return
    refusal = expected(checks.kind(variant)).grant_dmabuf
    emit("grant-back-control", (verdicts["control"] == "same") == (refusal is None),
         variant=variant, verdict=verdicts["control"],
         expected="same" if refusal is None else "not the same bytes",
         project_refuses=refusal and refusal.reason)
    if "regrant" in grants:
        emit("grant-back-regrant", verdicts["regrant"].startswith("map failed"),
             variant=variant, verdict=verdicts["regrant"],
             expected="map failed")


def dmabuf_received(imported, base, variant):
    """EXP_FROM_REFS gave a dma-buf: is it one, does it hold dom0's pages,
    does EXP_WAIT_RELEASED tell the truth; then the agent's dmabuf mode."""
    from qubes_gpu_share import native
    from qubes_gpu_share.grant import errors, this_domain
    from qubes_gpu_share.grant.gntdev import GntdevDevice

    device = GntdevDevice()
    fd = imported.fd
    link = os.readlink(f"/proc/self/fd/{fd}")
    emit("exp-from-refs-fd", link.startswith("/dmabuf") or "dmabuf" in link,
         fd_target=link, exp_name=this_domain.dmabuf_exporter(fd))

    # no mmap on it (the CPU path is MAP_GRANT_REF): recorded, not judged
    try:
        L.map_fd(fd, 0, L.RECV_PAGES * 4096, writable=False).close()
        mm = "works"
    except OSError as e:
        mm = f"{e.strerror} ({e.errno})"
    emit("exp-dmabuf-mmap", None, answer=mm)

    # its pages are dom0's: read them as a driver importing the dma-buf
    # would (attach, map the sg table, read its pages; lab/modules/dmabuf-peek.c)
    with labio.Timer() as t:
        seen = labio.peek_dmabuf(fd, L.RECV_PAGES * 4096)
    where = L.differs(seen, L.recv_bytes())
    emit("exp-dmabuf-holds-dom0-pages", where is None, bytes=len(seen),
         first_difference=where, ms=t.ms)

    # the project does not grant it on (it cannot work: grant_back shows why)
    got, why, grant = checks.outcome(
        lambda: device.grant_dmabuf(fd, L.RECV_PAGES, 0))
    if grant is not None:
        grant.revoke()
    emit("regrant-refused-by-project", got == "NotGrantable", observed=got,
         reason=why)
    grant_back(base, variant, fd)

    # EXP_WAIT_RELEASED, keyed by the exported fd number (native calls:
    # this is the kernel's behaviour, not the agent's)
    gfd, efd = imported._gntdev_fd, imported._exported_fd
    try:
        native.exp_wait_released(gfd, efd, 200)
        open_answer = "0"
    except errors.GrantError as e:
        open_answer = type(e).__name__
    emit("wait-released-while-open", open_answer == "ReleaseTimeout",
         answer=open_answer)

    closer = threading.Timer(0.5, os.close, (fd,))
    imported.fd = -1
    closer.start()
    t0 = time.monotonic()
    try:
        native.exp_wait_released(gfd, efd, 20000)
        close_answer = "0"
    except errors.GrantError as e:
        close_answer = type(e).__name__
    closer.join()
    emit("wait-released-after-last-close", close_answer == "0",
         answer=close_answer, ms=round((time.monotonic() - t0) * 1000))
    try:
        native.exp_wait_released(gfd, efd, 200)
        again = "0"
    except errors.GrantError as e:
        again = type(e).__name__
    emit("wait-released-again", again == "AlreadyReleased", answer=again)
    imported.close()


def consume_dmabuf_mode(base, refs):
    """The consumer agent receiving dom0's refs in dmabuf mode: the
    application's copy, then let go (which waits until it is released)."""
    from qubes_gpu_share.agent.consumer import Consumer
    from qubes_gpu_share.formats import ReceiveMode
    from qubes_gpu_share.grant.gntdev import GntdevDevice
    from qubes_gpu_share.names import new_lease_id
    from qubes_gpu_share.protocol import GrantRefs, LeaseAnswer

    consumer = Consumer(GntdevDevice(), notify=lambda holder, lease: None)
    lease = new_lease_id()
    answer = LeaseAnswer(lease, "dom0", 0, ReceiveMode.DMABUF, L.RECV_META, 0,
                         GrantRefs.from_ints(refs))
    with labio.Timer() as t:
        received = consumer.receive(answer, holder="lab")
        fd, info = received.hand_out()
        os.close(fd)                          # the application is done
        let_go = asyncio.run(consumer.let_go(lease))
    emit("consumer-dmabuf-mode", let_go is True, ms=t.ms)
    consumer.close()


def cross_domain(base, variants):
    """Everything done with dom0's grants and for dom0, build by build."""
    recv_refs = labio.xs_read_ints(f"{base}/recv/refs", STEP_TIMEOUT)
    fds_before = None
    consumed = regranted = False
    for variant in variants:
        labio.use_gntdev(variant)
        if fds_before is None:
            fds_before = len(os.listdir("/proc/self/fd"))
        imported = checks.table_row(variant, 0, recv_refs, L.recv_bytes())
        if imported is not None and not regranted:
            dmabuf_received(imported, base, variant)
            consume_dmabuf_mode(base, recv_refs)
            regranted = True
        elif imported is not None:
            imported.close()
        if variant != "stock" and not consumed:
            consume_cpu_leases(base)
            consumed = True
    if not regranted:     # no dma-buf of dom0's pages: the control alone
        grant_back(base, variants[-1])
    if not consumed:
        consume_cpu_leases(base)
    fds_after = len(os.listdir("/proc/self/fd"))
    emit("domu-fds-after", fds_after == fds_before, before=fds_before,
         after=fds_after)
    labio.xs_write(f"{base}/done", 1)


def main():
    opts = labio.cmdline()
    from qubes_gpu_share import native
    domid = native.own_domid()
    base = L.base(domid)
    variants = opts["gntdev"].split(",")
    steps = opts["steps"].split(",")
    emit("domu-env", None, domid=domid, guest_type=labio.guest_type(),
         steps=steps, variants=variants)
    labio.use_udmabuf()
    checks.native_imports()
    if "cross" in steps:
        labio.xs_wait(f"{base}/ready", STEP_TIMEOUT)
        cross_domain(base, variants)
    if "self" in steps:
        # this domain granting to itself, as the probe does, each step in
        # its own process, the kernel log checked after each
        checks.self_grant(variants[0])
    if "probe" in steps:
        for variant in variants:
            labio.use_gntdev(variant)
            checks.probe_matches(variant)
    if "contract" in steps:
        checks.contract_suite()
    if "sanity" in steps:
        checks.kernel_sane()


if __name__ == "__main__":
    labio.DOM = labio.cmdline().get("dom", "domU")
    labio.main_guard(main)

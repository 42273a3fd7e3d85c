"""A domU's side of the lab. For each gntdev build named on the kernel
command line (lab.gntdev=stock,upstream,fixed), in turn: the expected
table's row tried for real against dom0, and, with the dma-buf ioctls, a
udmabuf of ours granted to dom0 with the kernel's raw IMP_TO_REFS (dom0
says what it finds). Where EXP_FROM_REFS works (the fixed build in PVH) it
checks the dma-buf it gets from every side: a process maps it, a driver
reads it, vgem imports it, EXP_WAIT_RELEASED waits for fds and mappings.
Then, with the last build loaded, it consumes dom0's cpu-mode leases
through the project's consumer agent and, in PV, provides one to dom0
through the project's provider agent.

The ``liar`` role maps dom0's grants, says it let go, and keeps them,
until dom0 destroys it (issue 14: what a provider can learn)."""

import asyncio
import json
import mmap
import os
import threading
import time

import checks
import labio
import lease_lab as L
from labio import emit

STEP_TIMEOUT = 240


def consume_cpu_leases(base, variant):
    """dom0's udmabuf and gntalloc leases, received in cpu mode by the
    consumer agent: check the picture, draw ours over it, let go, say so."""
    from qubes_gpu_share.agent.consumer import Consumer
    from qubes_gpu_share.formats import ReceiveMode
    from qubes_gpu_share.protocol import GrantRefs, LeaseAnswer

    consumer = Consumer(checks.device(), notify=lambda holder, lease: None)
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
             map_ms=t_map.ms, check_ms=t_check.ms, variant=variant)
        buf[:] = L.picture(L.SEED_CONSUMER)
        buf.close()
        labio.xs_write(f"{base}/{mode}/written", 1)
        with labio.Timer() as t:
            let_go = asyncio.run(consumer.let_go(lease))
        emit("consumer-release", let_go is True, mode=mode, ms=t.ms,
             variant=variant)
        labio.xs_write(f"{base}/{mode}/released", 1)
    consumer.close()


def grant_back(base, variant, dmabuf_fd=None):
    """Grant to dom0 with the kernel's raw IMP_TO_REFS a udmabuf of ours
    holding the receive bytes (the control) and, when given, the dma-buf
    EXP_FROM_REFS made of dom0's pages (the re-grant). dom0 maps both and
    says what it found.

    Judged against the expected table: the control maps with the same
    bytes where the table lets this domain grant dma-bufs (not in a PV
    domU with Debian's gntdev: its refs name wrong frames; with the
    series' frames fix, yes); a re-grant never maps (its pages are grant
    mappings, Xen grants only a domain's own RAM)."""
    from qubes_gpu_share.alloc.udmabuf import UdmabufAllocator
    from qubes_gpu_share.grant.expected import expected
    # past the project's own refusals: the kernel and Xen are under test
    from qubes_gpu_share.grant.gntdev import imp_to_refs as raw_grant
    at = f"{base}/{variant}"
    control = UdmabufAllocator().allocate(L.RECV_PAGES * 4096)
    m = control.mmap()
    m[:] = L.recv_bytes()
    m.close()
    grants = {"control": raw_grant(control.fd, L.RECV_PAGES, 0)}
    if dmabuf_fd is not None:
        grants["regrant"] = raw_grant(dmabuf_fd, L.RECV_PAGES, 0)
    for what in ("control", "regrant"):
        refs = grants[what].refs if what in grants else ()
        labio.xs_write_ints(f"{at}/{what}/refs", list(refs))
    verdicts = json.loads(labio.xs_wait(f"{at}/grant-back/verdicts",
                                        STEP_TIMEOUT))
    for grant in grants.values():
        grant.revoke()
    control.close()
    refusal = expected(checks.kind(variant)).grant_dmabuf
    emit("grant-back-control", (verdicts["control"] == "same") == (refusal is None),
         variant=variant, verdict=verdicts["control"],
         expected="same" if refusal is None else "not the same bytes",
         project_refuses=refusal and refusal.reason)
    if "regrant" in grants:
        emit("grant-back-regrant", verdicts["regrant"].startswith("map failed"),
             variant=variant, verdict=verdicts["regrant"],
             expected="map failed")


def sync(fd, start):
    """DMA_BUF_IOCTL_SYNC (read and write): 0, or the errno's name."""
    from qubes_gpu_share import native
    try:
        native.dma_buf_sync(fd, start)
        return "0"
    except OSError as e:
        return checks.errno_name(e.errno)


def wait_released(imported, timeout_ms):
    """EXP_WAIT_RELEASED on the import's own gntdev fd, keyed by the
    exported fd number: '0' or the refusal's class name."""
    from qubes_gpu_share import native
    from qubes_gpu_share.grant import errors
    try:
        native.exp_wait_released(imported._gntdev_fd, imported._exported_fd,
                                 timeout_ms)
        return "0"
    except errors.GrantError as e:
        return type(e).__name__


def mmap_checks(imported, base):
    """The series' mmap (kernel/0002): Python maps the received dma-buf,
    brackets access with DMA_BUF_IOCTL_SYNC, reads dom0's bytes, writes
    some that dom0 must see. Returns the mapping (kept: the wait checks
    need it), or None when mmap failed."""
    fd, size = imported.fd, L.RECV_PAGES * 4096
    try:
        view = mmap.mmap(fd, size, mmap.MAP_SHARED,
                         mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as e:
        emit("dmabuf-mmap-reads-dom0", False,
             error=f"mmap: {e.strerror} ({e.errno})")
        return None
    with labio.Timer() as t:
        start = sync(fd, True)
        where = L.differs(view, L.recv_bytes())
        view[L.DMABUF_WRITE_AT:L.DMABUF_WRITE_AT + len(L.DMABUF_WRITE)] = \
            L.DMABUF_WRITE
        end = sync(fd, False)
    emit("dmabuf-mmap-reads-dom0", where is None and start == end == "0",
         first_difference=where, sync_start=start, sync_end=end,
         bytes=size, ms=t.ms)
    labio.xs_write(f"{base}/dmabuf-written", 1)
    verdict = labio.xs_wait(f"{base}/dmabuf-written/verdict", STEP_TIMEOUT)
    emit("dmabuf-mmap-write-seen-by-dom0", verdict == "same",
         verdict=verdict)
    second = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ, offset=4096)
    again = bytes(second[:16]) == L.recv_bytes()[4096:4096 + 16]
    second.close()
    emit("dmabuf-mmap-again", again, note="a dma-buf maps any number of "
         "times (unlike a gntdev mapping), here its second page alone")
    return view


def vgem_checks(fd):
    """vgem, a real upstream DRM driver: PRIME import of the received
    dma-buf; its GEM mmap (MODE_MAP_DUMB + mmap of the card) for its own
    dumb buffer, for the import and for a udmabuf imported the same way
    (the control: DRM core's rule, not gntdev's); and the import exported
    again (PRIME_HANDLE_TO_FD), mmapped."""
    from qubes_gpu_share import native
    from qubes_gpu_share.alloc.udmabuf import UdmabufAllocator
    card = os.open(checks.vgem_card(), os.O_RDWR | os.O_CLOEXEC)
    handles = []
    try:
        handle = native.drm_prime_fd_to_handle(card, fd)
        handles.append(handle)
        emit("vgem-import", True, handle=handle)

        def gem_mmap(h, size):
            try:
                offset = native.drm_map_dumb(card, h)
            except OSError as e:
                return checks.errno_name(e.errno), None
            with mmap.mmap(card, size, mmap.MAP_SHARED, mmap.PROT_READ,
                           offset=offset) as view:
                return "works", bytes(view[:size])

        own, pitch, size = native.drm_create_dumb(card, 64, 64, 32)
        handles.append(own)
        answer, _ = gem_mmap(own, size)
        emit("vgem-gem-mmap-own-buffer", answer == "works", answer=answer)
        answer, seen = gem_mmap(handle, L.RECV_PAGES * 4096)
        # DRM core's drm_gem_dumb_map_offset() refuses any import: EINVAL
        emit("vgem-gem-mmap-import", answer == "EINVAL", answer=answer,
             expected="EINVAL",
             same_bytes=None if seen is None else seen == L.recv_bytes())
        with UdmabufAllocator().allocate(4096) as control:
            ctrl = native.drm_prime_fd_to_handle(card, control.fd)
            handles.append(ctrl)
            control_answer, _ = gem_mmap(ctrl, 4096)
        emit("vgem-gem-mmap-import-control", answer == control_answer,
             answer=control_answer, gntdev_answer=answer,
             note="DRM core gives no mmap offset to any imported object "
                  "(drm_gem_dumb_map_offset)")
        again = native.drm_prime_handle_to_fd(card, handle)
        try:
            same_file = os.fstat(again).st_ino == os.fstat(fd).st_ino
            with mmap.mmap(again, L.RECV_PAGES * 4096, mmap.MAP_SHARED,
                           mmap.PROT_READ) as view:
                same = bytes(view) == L.recv_bytes()
        finally:
            os.close(again)
        emit("vgem-reexport-mmap-reads-dom0", same, same_file=same_file)
    except OSError as e:
        emit("vgem-import", False, error=str(e))
    finally:
        for h in handles:
            native.drm_gem_close(card, h)
        os.close(card)


def dmabuf_received(imported, base, variant):
    """EXP_FROM_REFS gave a dma-buf: is it one, does it hold dom0's pages
    (read by a process, by a driver through the sg table and through vmap,
    by vgem), does EXP_WAIT_RELEASED tell the truth about fds and
    mappings; then the agent's dmabuf mode."""
    from qubes_gpu_share.grant import this_domain

    dev = checks.device()
    fd = imported.fd
    link = os.readlink(f"/proc/self/fd/{fd}")
    emit("exp-from-refs-fd", link.startswith("/dmabuf") or "dmabuf" in link,
         fd_target=link, exp_name=this_domain.dmabuf_exporter(fd))

    view = mmap_checks(imported, base)

    # its pages are dom0's: read them as a driver importing the dma-buf
    # would (attach, map the sg table, read its pages; then its vmap)
    for how, prefix in (("sg", ""), ("vmap", "v")):
        with labio.Timer() as t:
            try:
                seen = labio.peek_dmabuf(fd, L.RECV_PAGES * 4096, prefix)
                where, error = L.differs(seen, L.recv_bytes()), None
            except OSError as e:
                seen, where, error = b"", None, f"{e.strerror} ({e.errno})"
        emit("exp-dmabuf-holds-dom0-pages" if how == "sg"
             else "exp-dmabuf-vmap-holds-dom0-pages",
             error is None and where is None, bytes=len(seen),
             first_difference=where, error=error, ms=t.ms)

    vgem_checks(fd)

    # the project does not grant it on (it cannot work: grant_back shows why)
    got, why, grant = checks.outcome(
        lambda: dev.grant_dmabuf(fd, L.RECV_PAGES, 0))
    if grant is not None:
        grant.revoke()
    emit("regrant-refused-by-project", got == "NotGrantable", observed=got,
         reason=why)
    grant_back(base, variant, fd)

    # EXP_WAIT_RELEASED, keyed by the exported fd number (native calls:
    # this is the kernel's behaviour, not the agent's): while open; after
    # the last fd closed while a mapping is left; across the munmap
    answer = wait_released(imported, 200)
    emit("wait-released-while-open", answer == "ReleaseTimeout",
         answer=answer)
    imported.fd = -1
    if view is None:        # no mapping: the fd is the last holder
        closer = threading.Timer(0.5, os.close, (fd,))
    else:
        os.close(fd)
        answer = wait_released(imported, 1000)
        emit("wait-released-while-mapped", answer == "ReleaseTimeout",
             answer=answer, note="the last fd is closed, a mapping is left")
        closer = threading.Timer(0.5, view.close)
    closer.start()
    t0 = time.monotonic()
    answer = wait_released(imported, 20000)
    closer.join()
    emit("wait-released-after-last-close", answer == "0", answer=answer,
         last_holder="fd" if view is None else "mapping (munmap)",
         ms=round((time.monotonic() - t0) * 1000))
    again = wait_released(imported, 200)
    emit("wait-released-again", again == "AlreadyReleased", answer=again)
    imported.close()


def consume_dmabuf_mode(base, refs, variant):
    """The consumer agent receiving dom0's refs in dmabuf mode: what an
    application gets maps for the CPU (kernel/0002) with dom0's bytes;
    then let go (which waits until it is released)."""
    from qubes_gpu_share.agent.consumer import Consumer
    from qubes_gpu_share.formats import ReceiveMode
    from qubes_gpu_share.names import new_lease_id
    from qubes_gpu_share.protocol import GrantRefs, LeaseAnswer

    consumer = Consumer(checks.device(), notify=lambda holder, lease: None)
    lease = new_lease_id()
    answer = LeaseAnswer(lease, "dom0", 0, ReceiveMode.DMABUF, L.RECV_META, 0,
                         GrantRefs.from_ints(refs))
    with labio.Timer() as t:
        received = consumer.receive(answer, holder="lab")
        fd, info = received.hand_out()
        try:          # the application's one mmap call, as in cpu mode
            with L.map_fd(fd, info.offset, info.length, writable=False) as v:
                same = bytes(v) == L.recv_bytes()
        except OSError:
            same = None
        os.close(fd)                          # the application is done
        let_go = asyncio.run(consumer.let_go(lease))
    emit("consumer-dmabuf-mode", let_go is True and same is not False,
         ms=t.ms, cpu_mappable=received.cpu_mappable, app_reads_dom0=same,
         variant=variant)
    consumer.close()


def provider_choice(variant, emit_it=True):
    """What the provider agent would grant here with this gntdev build:
    the kernel is asked (a page of a udmabuf granted to ourselves and
    mapped back), then the project's rule (grant/this_domain.py)."""
    from qubes_gpu_share.grant import this_domain
    from qubes_gpu_share.grant.gntdev import kernel_grants_own_frames
    with labio.Timer() as t_check:
        frames = kernel_grants_own_frames()
    refusal = this_domain.grant_refusal(frames_check=lambda: frames)
    if emit_it:
        want = "udmabuf" if checks.kind(variant).grant_frames_fix \
            else "gntalloc"
        got = "gntalloc" if refusal else "udmabuf"
        emit("provider-choice", got == want, variant=variant,
             own_frames=frames, ms=t_check.ms, source=got, expected=want,
             reason=refusal.reason if refusal else "")
    return refusal


def provide_to_dom0(base, variant):
    """The project's provider agent in this domain granting to dom0: a
    dma-buf (udmabuf) where the kernel grants its own frames, else
    gntalloc pages, as the agent chooses (agent/main.py asks
    grant/this_domain.grant_refusal, which asks the kernel where the facts
    leave it open); dom0 maps what it gets and compares."""
    from qubes_gpu_share.agent.provider import Provider
    from qubes_gpu_share.alloc.udmabuf import UdmabufAllocator
    from qubes_gpu_share.names import new_lease_id
    from qubes_gpu_share.protocol import Error, ExportRequest

    refusal = provider_choice(variant, emit_it=False)
    allocator = None if refusal else UdmabufAllocator()
    provider = Provider(checks.device(), allocator)
    lease = new_lease_id()
    answer = provider.export(ExportRequest(lease, "dom0", 0, L.RECV_META))
    if isinstance(answer, Error):
        emit("provider-to-dom0", False, variant=variant, error=answer.message)
        labio.xs_write_ints(f"{base}/provide/refs", [])
        return
    fd, off, length = provider.get(lease).dup_fd()
    buf = L.map_fd(fd, off, length)
    os.close(fd)
    buf[:] = L.recv_bytes()
    buf.close()
    labio.xs_write(f"{base}/provide/source", "gntalloc" if refusal else
                   "udmabuf")
    labio.xs_write_ints(f"{base}/provide/refs", list(answer.refs))
    verdict = labio.xs_wait(f"{base}/provide/verdict", STEP_TIMEOUT)
    revoked = provider.revoke(lease)
    emit("provider-to-dom0", verdict == "same" and revoked.status.value ==
         "released", variant=variant, verdict=verdict,
         source="gntalloc" if refusal else "udmabuf",
         revoke=revoked.status.value)
    provider.close()


def cross_domain(base, variants):
    """Everything done with dom0's grants and for dom0, build by build."""
    recv_refs = labio.xs_read_ints(f"{base}/recv/refs", STEP_TIMEOUT)
    fds_before = None
    for variant in variants:
        labio.use_gntdev(variant)
        if fds_before is None:
            fds_before = len(os.listdir("/proc/self/fd"))
        imported = checks.table_row(variant, 0, recv_refs, L.recv_bytes())
        if labio.guest_type() == "pv" and checks.has_ioctls(variant):
            provider_choice(variant)
        if imported is not None and variant == variants[-1]:
            dmabuf_received(imported, base, variant)
            consume_dmabuf_mode(base, recv_refs, variant)
        elif checks.has_ioctls(variant):
            grant_back(base, variant)
            if imported is not None:     # receive fix only: the table row
                imported.release(2000)
    last = variants[-1]
    consume_cpu_leases(base, last)
    if labio.guest_type() == "pv":
        provide_to_dom0(base, last)
    fds_after = len(os.listdir("/proc/self/fd"))
    emit("domu-fds-after", fds_after == fds_before, before=fds_before,
         after=fds_after)
    labio.xs_write(f"{base}/done", 1)


def lie(base):
    """Map every buffer dom0 grants us, through the consumer agent, write
    to each, say they were released, and keep them mapped until dom0
    destroys this domain."""
    from qubes_gpu_share.agent.consumer import Consumer
    from qubes_gpu_share.formats import ReceiveMode, blob_layout
    from qubes_gpu_share.protocol import GrantRefs, LeaseAnswer

    consumer = Consumer(checks.device(), notify=lambda holder, lease: None)
    kept = []
    for what in labio.xs_wait(f"{base}/liar/buffers", STEP_TIMEOUT).split(","):
        refs = labio.xs_read_ints(f"{base}/liar/{what}/refs", STEP_TIMEOUT)
        lease = labio.xs_read(f"{base}/liar/{what}/lease")
        answer = LeaseAnswer(lease, "dom0", 0, ReceiveMode.CPU,
                             blob_layout(len(refs) * 4096), 0,
                             GrantRefs.from_ints(refs))
        received = consumer.receive(answer, holder="liar")
        fd, info = received.hand_out()
        view = L.map_fd(fd, info.offset, info.length)
        os.close(fd)
        view[:8] = b"liar was"
        kept.append(view)
        emit("liar-maps", True, what=what, pages=len(refs))
    labio.xs_write(f"{base}/liar/released", 1)    # the lie
    emit("liar-says-released", None, mapped=len(kept),
         note="the consumer says released and keeps every mapping")
    while True:                  # until dom0 destroys this domain
        time.sleep(5)
        print(f"lab[{labio.DOM}]: still mapping {len(kept)} buffers",
              flush=True)


def main():
    opts = labio.cmdline()
    from qubes_gpu_share.grant.domid import own_domid
    domid = own_domid()
    base = L.base(domid)
    variants = opts["gntdev"].split(",")
    steps = opts["steps"].split(",")
    emit("domu-env", None, domid=domid, guest_type=labio.guest_type(),
         steps=steps, variants=variants)
    labio.use_udmabuf()
    checks.native_imports()
    if "liar" in steps:
        labio.use_gntdev(variants[-1])
        labio.xs_wait(f"{base}/ready", STEP_TIMEOUT)
        lie(base)
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
        checks.contract_suite(variants[-1])
    if "sanity" in steps:
        checks.kernel_sane()


if __name__ == "__main__":
    labio.DOM = labio.cmdline().get("dom", "domU")
    labio.main_guard(main)

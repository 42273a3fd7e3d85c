"""dom0's side of the lab (PV dom0, gntdev built from Debian's source with
the dma-buf ioctls and the project's kernel series): check dom0 itself,
then start each domU, provide its leases through the project's provider
agent, check what the domU wrote back, map what it grants, release in the
safe order, and relay the domU's results. For the ``liar`` domU, measure
what dom0's kernel says about grants ended while the domU still maps them,
and what happens when it is destroyed."""

import collections
import json
import logging
import os
import platform
import re
import threading
import time

import labio
from labio import emit, run
import lease_lab as L
import checks

XL = "xl"
CONSOLE_LOG = "/var/log/xen/console/guest-{}.log"
#: how long dom0 waits for a domU's next step (it boots Python under TCG)
STEP_TIMEOUT = 150

#: the domUs, in order: name, xl type, gntdev builds to try in turn, the
#: steps it runs (domu.py), seconds it may live. A PVH domU's kernel has been seen to oops after
#: grant mappings (lab/README.md), so the PVH steps get a fresh domU each:
#: one kernel's failure cannot hide another step's result. pvh-self, whose
#: kernel it corrupts, comes last.
DOMUS = (("pv", "pv", "stock,upstream,fixed", "cross,self,probe,contract,sanity", 420),
         ("pvh", "pvh", "stock,upstream,receive,fixed", "cross,sanity", 330),
         ("pvh-probe", "pvh", "upstream,fixed", "probe,sanity", 180),
         ("liar", "pv", "upstream", "liar", 240),
         ("pvh-self", "pvh", "stock", "self,sanity", 180))
#: GPU buffers that live in a device's VRAM (QEMU's VGA, bochs-drm): not
#: grantable, refused at PRIME export
VRAM_MODES = {"drm-bochs-drm"}
#: after a domU's kernel oopsed, give it this long to print the trace
OOPS_GRACE = 15
#: boots of a domU whose kernel died. Under emulation a PVH domU sometimes
#: dies at a random point (a triple fault, or a recursive page fault on its
#: per-CPU area), about 1 boot in 4 here (lab/README.md)
DOMU_BOOTS = 3
#: domUs whose kernel is expected to fail (the finding they exist for)
OOPS_EXPECTED = {"pvh-self"}
#: domUs dom0 destroys on purpose (their death is the measurement)
DESTROYED_BY_DOM0 = {"liar"}
#: console lines kept per domU boot, for a discarded boot's evidence
CONSOLE_TAIL = 12


class WarningsSeen(logging.Handler):
    """Collects the agent's warnings: a revoke that failed is logged there
    (Provider.revoke reports, it does not raise)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def start_domu(name, virt, gntdev, steps):
    cfg = f"/tmp/{name}.cfg"
    with open(cfg, "w") as f:
        f.write(f'''name = "{name}"
type = "{virt}"
kernel = "/lab/boot/vmlinuz"
ramdisk = "/lab/boot/domu.img"
memory = 512
vcpus = 1
extra = "console=hvc0 loglevel=3 lab.dom={name} lab.gntdev={gntdev} lab.steps={steps}"
on_poweroff = "destroy"
on_reboot = "destroy"
on_crash = "destroy"
''')
    # xenconsoled appends to a name's log: a new boot starts a new log
    if os.path.exists(CONSOLE_LOG.format(name)):
        os.unlink(CONSOLE_LOG.format(name))
    with labio.Timer() as t:
        run([XL, "create", cfg], timeout=180)
    domid = int(run([XL, "domid", name]).strip())
    emit("domu-create", True, domu=name, virt=virt, domid=domid, ms=t.ms)
    return domid


class ConsoleRelay(threading.Thread):
    """Copies a domU's console (xenconsoled's log) to dom0's as it grows:
    results arrive in order and a hang shows where it happened."""

    def __init__(self, name, attempt):
        super().__init__(daemon=True)
        self.name_, self.stop = name, threading.Event()
        self.attempt = attempt
        self.oops, self.oops_at = [], None
        #: result lines seen, whether the domain vanished (a domU that
        #: triple-faults is destroyed by Xen without a word on its own
        #: console), whether its /init said it is done (LAB-EXIT)
        self.results, self.gone, self.exited = 0, False, False
        #: its last console lines (a discarded boot's evidence)
        self.tail = collections.deque(maxlen=CONSOLE_TAIL)

    def dead(self):
        return self.gone or (self.oops_at is not None
                             and time.monotonic() - self.oops_at > OOPS_GRACE)

    def run(self):
        path, f, part = CONSOLE_LOG.format(self.name_), None, ""
        checked = time.monotonic()
        while True:
            stopping = self.stop.is_set()
            if time.monotonic() - checked > 3:
                checked = time.monotonic()
                self.gone = not run([XL, "domid", self.name_], check=False,
                                    timeout=30).strip().isdigit()
            if f is None and os.path.exists(path):
                f = open(path, errors="replace")
            if f is not None:
                part += f.read()
                *lines, part = part.split("\n")
                for line in lines:
                    if not line.startswith("LAB-RESULT ") and line.strip():
                        self.tail.append(line.strip()[:200])
                    self.results += line.startswith("LAB-RESULT ")
                    self.exited |= line.startswith("LAB-EXIT")
                    if line.startswith("LAB-RESULT "):
                        line = labio.tagged(line, attempt=self.attempt)
                    if any(w in line for w in ("BUG:", "Oops", "WARNING:",
                                               "Kernel panic")):
                        self.oops.append(line.strip())
                        self.oops_at = self.oops_at or time.monotonic()
                    print(line if line.startswith("LAB-RESULT ")
                          else f"[{self.name_}] {line}", flush=True)
            if stopping:
                if part:
                    print(f"[{self.name_}] {part}", flush=True)
                return
            time.sleep(0.3)


def finish_domu(name, t0, timeout, relay):
    """Wait until the domU has powered off (destroy it after timeout)."""
    deadline = time.monotonic() + max(timeout, 5)
    ok, beat = True, time.monotonic()
    while run([XL, "domid", name], check=False, timeout=30).strip().isdigit():
        if time.monotonic() > deadline or relay.dead():
            ok = relay.dead()     # an oops is reported on its own
            run([XL, "destroy", name], check=False, timeout=60)
            break
        if time.monotonic() - beat > 30:   # the host's hang detector listens
            beat = time.monotonic()
            print(f"lab[dom0]: {name} still running", flush=True)
        time.sleep(0.5)
    relay.stop.set()
    relay.join()
    # a kernel that oopsed in the domU fails the run whatever it printed
    emit("domu-kernel-clean", not relay.oops, domu=name, oops=relay.oops[:12])
    emit("domu-run", ok, domu=name, ms=round((time.monotonic() - t0) * 1000),
         timeout_s=timeout)


class Leases:
    """dom0 as provider for one domU: the two cpu-mode leases (udmabuf ->
    IMP_TO_REFS, gntalloc) and the small grant for the dma-buf checks."""

    def __init__(self, domid, name, drm=()):
        from qubes_gpu_share.agent.provider import Provider
        from qubes_gpu_share.alloc.drmdumb import DrmDumbAllocator
        from qubes_gpu_share.alloc.udmabuf import UdmabufAllocator
        from qubes_gpu_share.grant.gntdev import GntdevDevice
        from qubes_gpu_share.names import new_lease_id
        from qubes_gpu_share.protocol import Error, ExportRequest

        self.domid, self.name, self.base = domid, name, L.base(domid)
        self.device = GntdevDevice()
        self.providers, self.leases = {}, {}
        sources = [(m, UdmabufAllocator() if m == "udmabuf" else None)
                   for m in L.PROVIDE_MODES]
        # GPU buffers: DRM dumb buffers exported with PRIME, whatever the
        # driver keeps them in (bochs-drm's VRAM is expected to fail)
        sources += [(f"drm-{driver}", DrmDumbAllocator(node))
                    for driver, node in drm]
        for mode, allocator in sources:
            provider = Provider(self.device, allocator)
            lease = new_lease_id()
            with labio.Timer() as t:
                answer = provider.export(ExportRequest(
                    lease, f"lab-{name}", domid, L.META))
                if isinstance(answer, Error):
                    # a buffer in VRAM is refused at its PRIME export
                    # (ENOSYS: the VRAM helpers cannot export); any other
                    # refusal is a fault
                    emit("provide", mode in VRAM_MODES and
                         "PRIME_HANDLE_TO_FD" in answer.message, mode=mode,
                         to=name, error=answer.message,
                         expected="refused" if mode in VRAM_MODES else
                         "works")
                    continue
                fd, off, length = provider.get(lease).dup_fd()
                buf = L.map_fd(fd, off, length)
                os.close(fd)
                buf[:] = L.picture(L.SEED_PROVIDER)
            emit("provide", mode not in VRAM_MODES, mode=mode, to=name,
                 pages=L.META.pages, ms=t.ms,
                 expected="refused" if mode in VRAM_MODES else "works")
            self.providers[mode], self.leases[mode] = provider, (lease, buf)
            labio.xs_write(f"{self.base}/{mode}/lease", lease)
            labio.xs_write_ints(f"{self.base}/{mode}/refs",
                                list(answer.refs))
        self.modes = list(self.leases)
        labio.xs_write(f"{self.base}/modes", ",".join(self.modes))
        # the dma-buf receive checks: gntalloc pages with known bytes
        self.recv = self.device.grant_new_pages(L.RECV_PAGES, domid)
        self.recv_buf = self.recv.view().mmap()
        self.recv_buf[:] = L.recv_bytes()
        labio.xs_write_ints(f"{self.base}/recv/refs", list(self.recv.refs))
        labio.xs_write(f"{self.base}/ready", 1)

    def check_written_back(self, mode):
        """The domU overwrote the picture through its mapping: dom0 must
        see the consumer's picture in its own buffer."""
        labio.xs_wait(f"{self.base}/{mode}/written", STEP_TIMEOUT)
        lease, buf = self.leases[mode]
        where = L.differs(buf, L.picture(L.SEED_CONSUMER))
        emit("provider-sees-write", where is None, mode=mode, of=self.name,
             first_difference=where)

    def release_after_consumer(self, mode):
        """The safe order: the consumer unmapped and said so; only then
        IMP_RELEASE (or gntalloc dealloc), which must succeed."""
        labio.xs_wait(f"{self.base}/{mode}/released", STEP_TIMEOUT)
        lease, buf = self.leases.pop(mode)
        buf.close()
        seen = WarningsSeen()
        logging.getLogger("qubes_gpu_share.agent.provider").addHandler(seen)
        with labio.Timer() as t:
            answer = self.providers[mode].revoke(lease)
        emit("provider-release", not seen.messages, mode=mode, of=self.name,
             answer=answer.status.value, warnings=seen.messages, ms=t.ms)

    def check_grant_back(self, variant):
        """The domU granted us, with the raw IMP_TO_REFS of gntdev build
        ``variant``, a udmabuf of its own holding the receive bytes (the
        control) and, where it received a dma-buf, that dma-buf (the
        re-grant). Map each, compare, and tell the domU, which judges
        against the expected table (here they are only recorded)."""
        at = f"{self.base}/{variant}"
        verdicts = {}
        for what in ("control", "regrant"):
            refs = labio.xs_read_ints(f"{at}/{what}/refs", STEP_TIMEOUT)
            if refs:
                verdicts[what] = self.map_and_compare(refs)
                emit(f"dom0-maps-{what}", None, of=self.name, pages=len(refs),
                     verdict=verdicts[what], variant=variant)
        labio.xs_write(f"{at}/grant-back/verdicts", json.dumps(verdicts))

    def check_dmabuf_written(self):
        """The PVH domU wrote through its mmap of the dma-buf made of our
        pages: we must read it in our own pages; then put them back."""
        labio.xs_wait(f"{self.base}/dmabuf-written", STEP_TIMEOUT)
        at, data = L.DMABUF_WRITE_AT, L.DMABUF_WRITE
        seen = bytes(self.recv_buf[at:at + len(data)])
        emit("provider-sees-dmabuf-write", seen == data, of=self.name,
             seen=seen[:60].decode("ascii", "replace"))
        self.recv_buf[:] = L.recv_bytes()
        labio.xs_write(f"{self.base}/dmabuf-written/verdict",
                       "same" if seen == data else "differs")

    def check_domu_provides(self):
        """The PV domU's provider agent granted us a buffer (a udmabuf where
        its kernel grants its own frames, else gntalloc pages): map it,
        compare, tell it."""
        refs = labio.xs_read_ints(f"{self.base}/provide/refs", STEP_TIMEOUT)
        if not refs:
            return
        source = labio.xs_read(f"{self.base}/provide/source")
        verdict = self.map_and_compare(refs)
        emit("dom0-maps-domu-provider", None, of=self.name, source=source,
             pages=len(refs), verdict=verdict)
        labio.xs_write(f"{self.base}/provide/verdict",
                       "same" if verdict == "same" else verdict[:200])

    def map_and_compare(self, refs):
        from qubes_gpu_share.grant.errors import GrantError
        try:
            with self.device.map_grant(self.domid, refs, writable=False) as m:
                view = m.mmap(False)
                where = L.differs(view, L.recv_bytes())
                view.close()
            return "same" if where is None else f"differs at {where}"
        except GrantError as e:
            return f"map failed: {e}"

    def close(self):
        labio.xs_wait(f"{self.base}/done", STEP_TIMEOUT)
        self.recv_buf.close()
        self.recv.revoke()

    def abandon(self):
        """The domU is gone: end every grant (nothing maps them any more)."""
        for mode, (lease, buf) in list(self.leases.items()):
            buf.close()
            self.providers[mode].revoke(lease)
        self.leases.clear()
        if getattr(self, "recv", None) is not None:
            self.recv_buf.close()
            self.recv.close()


GNTALLOC_LIMIT = "/sys/module/xen_gntalloc/parameters/limit"


def gntalloc_limit():
    """xen-gntalloc caps the pages one domain allocates (module parameter
    `limit`, default 1024): a full-HD frame (2025 pages) does not fit.
    Record the refusal, then raise the limit as an admin would."""
    from qubes_gpu_share.grant.gntdev import GntdevDevice
    limit = int(open(GNTALLOC_LIMIT).read())
    got, why, grant = checks.outcome(
        lambda: GntdevDevice().grant_new_pages(L.META.pages, 0))
    if grant is not None:
        grant.revoke()
    with open(GNTALLOC_LIMIT, "w") as f:
        f.write("65536")
    from qubes_gpu_share.grant.expected import GNTALLOC_DEFAULT_LIMIT
    emit("gntalloc-default-limit", limit == GNTALLOC_DEFAULT_LIMIT and
         got == "GrantTableFull", limit=limit, pages=L.META.pages,
         expected=f"{GNTALLOC_DEFAULT_LIMIT}, GrantTableFull",
         observed=got, reason=why, raised_to=65536)


def dmesg_mark():
    """Empty the kernel's log buffer (busybox dmesg -c): what is read next
    was logged after this point, however small the buffer."""
    labio.run(["dmesg", "-c"], check=False, timeout=60)


def dmesg_lines():
    return labio.run(["dmesg"], check=False, timeout=60).splitlines()


#: grant-table.c's pr_debug lines (dynamic debug), with the totals
DEFERRING = re.compile(r"deferring g\.e\. (0x[0-9a-f]+) .*total deferred "
                       r"(\d+), total leaked (\d+)")
FREEING = re.compile(r"freeing g\.e\. (0x[0-9a-f]+) .*, (\d+) remaining")
PENDING = re.compile(r"g\.e\. (0x[0-9a-f]+) still pending")
DYNDBG = "/proc/dynamic_debug/control"
FREE_PER_ITERATION = "/sys/module/grant_table/parameters/free_per_iteration"


def deferred_log():
    """What grant-table.c said since the last :func:`dmesg_mark`: refs
    deferred, refs freed (and the last 'remaining' count), refs still
    pending."""
    lines = dmesg_lines()
    deferred = [m for m in map(DEFERRING.search, lines) if m]
    freed = [m for m in map(FREEING.search, lines) if m]
    return {"deferred": len(deferred),
            "total_deferred": int(deferred[-1].group(2)) if deferred else None,
            "total_leaked": int(deferred[-1].group(3)) if deferred else None,
            "freed": len(freed),
            "remaining": int(freed[-1].group(2)) if freed else None,
            "pending_lines": sum(1 for l in lines if PENDING.search(l)),
            "refs_deferred": {m.group(1) for m in deferred},
            "refs_freed": {m.group(1) for m in freed}}


def serve_liar(domid, name):
    """Issue 14, measured: dom0 lends the domU three buffers, which it
    maps, says it released, and keeps. dom0 ends them three ways and says
    what its kernel tells it; then destroys the domU and times how long
    until every page is given back."""
    from qubes_gpu_share.agent.provider import Provider
    from qubes_gpu_share.alloc.udmabuf import UdmabufAllocator
    from qubes_gpu_share.formats import blob_layout
    from qubes_gpu_share.grant.gntdev import GntdevDevice
    from qubes_gpu_share.names import new_lease_id
    from qubes_gpu_share.protocol import ExportRequest
    from lab_broker import LabBroker

    base, pages = L.base(domid), L.LIAR_PAGES
    meta = blob_layout(pages * 4096)
    # grant-table.c's deferral is visible only as pr_debug lines: turn
    # them on (dynamic debug), as an admin could
    with open(DYNDBG, "w") as f:
        f.write("file drivers/xen/grant-table.c +p\n")
    per_tick = open(FREE_PER_ITERATION).read().strip()
    device = GntdevDevice()
    providers = {"try-end": Provider(device, UdmabufAllocator()),
                 "imp-release": Provider(device, UdmabufAllocator()),
                 "gntalloc": Provider(device, None)}
    leases = {}
    for what, provider in providers.items():
        lease = new_lease_id()
        answer = provider.export(ExportRequest(lease, name, domid, meta))
        leases[what] = lease
        labio.xs_write(f"{base}/liar/{what}/lease", lease)
        labio.xs_write_ints(f"{base}/liar/{what}/refs", list(answer.refs))
    # a fourth buffer through the project's broker: its arithmetic on the
    # provider agent's real answer (lab_broker.py)
    broker = LabBroker(Provider(GntdevDevice(), UdmabufAllocator()), name,
                       domid)
    answer = broker.lease(pages)
    leases["broker"] = answer.lease
    labio.xs_write(f"{base}/liar/broker/lease", answer.lease)
    labio.xs_write_ints(f"{base}/liar/broker/refs", list(answer.refs))
    labio.xs_write(f"{base}/liar/buffers", ",".join([*providers, "broker"]))
    labio.xs_write(f"{base}/ready", 1)
    labio.xs_wait(f"{base}/liar/released", STEP_TIMEOUT)

    # the consumer's word says released: dom0 ends the grants
    state = broker.release(leases["broker"])
    time.sleep(2)               # the broker retries (0.2 s, then 0.4 ...)
    view = broker.view(leases["broker"])
    emit("liar-broker-holds", state == "releasing" and view["state"] ==
         "releasing" and view["lease_held_pages"] == pages and
         view["dom0_pages_used"] == pages and view["liar_pages"] == pages
         and view["dom0_held_pages"] == view["liar_held_pages"] == pages,
         pages=pages, after_release=state, revokes=len(broker.revokes),
         note="GpuRelease from the liar; broker's admin view 2 s later",
         **view)
    dmesg_mark()
    answer = providers["try-end"].revoke(leases["try-end"])
    emit("liar-try-end", answer.status.value == "busy" and
         str(pages) in (answer.reason or ""), pages=pages,
         answer=answer.status.value, reason=answer.reason,
         note="IMP_TRY_RELEASE (kernel/0004) through the provider agent")
    log = deferred_log()
    emit("liar-try-end-defers-nothing", log["deferred"] == 0, **{
        k: v for k, v in log.items() if not k.startswith("refs_")})
    ended = {}
    for what in ("imp-release", "gntalloc"):
        provided = providers[what].get(leases[what])
        refs = {hex(r) for r in provided.grant.refs}
        dmesg_mark()
        if what == "imp-release":
            # what a kernel without IMP_TRY_RELEASE offers: IMP_RELEASE
            provided.grant.revoke()
            said = "IMP_RELEASE returned 0"
        else:     # the provider agent: gntalloc pages cannot report
            said = providers[what].revoke(leases[what]).status.value
        time.sleep(1.5)   # the deferred timer runs once a second
        log = deferred_log()
        ended[what] = refs
        emit("liar-end-deferred", log["deferred"] == pages and
             log["refs_deferred"] == refs, how=what, pages=pages,
             answer=said, deferred_lines=log["deferred"],
             total_deferred=log["total_deferred"],
             total_leaked=log["total_leaked"], freed=log["freed"],
             note="the call said nothing; only dynamic debug shows it")
    time.sleep(3)
    dmesg_mark()
    answer = providers["try-end"].revoke(leases["try-end"])
    emit("liar-still-held", answer.status.value == "busy",
         answer=answer.status.value, reason=answer.reason,
         free_per_iteration=per_tick)

    # the domU dies: Xen drops its mappings
    t0 = time.monotonic()
    run([XL, "destroy", name], timeout=60)
    t_gone = time.monotonic() - t0
    t_try = t_deferred = None
    deadline = time.monotonic() + 120
    all_refs = ended["imp-release"] | ended["gntalloc"]
    t_budget = None
    while time.monotonic() < deadline and None in (t_try, t_deferred,
                                                   t_budget):
        if t_try is None:
            answer = providers["try-end"].revoke(leases["try-end"])
            if answer.status.value == "released":
                t_try = time.monotonic() - t0
        if t_budget is None and \
                broker.view(leases["broker"])["dom0_pages_used"] == 0:
            t_budget = time.monotonic() - t0
        if t_deferred is None:
            log = deferred_log()
            if all_refs <= log["refs_freed"]:
                t_deferred = time.monotonic() - t0
        time.sleep(0.2)
    log = deferred_log()
    view = broker.view(leases["broker"])
    emit("liar-broker-budget-back", t_budget is not None and
         view["state"] == "released", budget_back_after_s=t_budget and
         round(t_budget, 1), revokes=len(broker.revokes),
         note="seconds after xl destroy until the broker gave dom0's "
              "budget back (its retries at most 1 s apart)", **view)
    broker.close()
    emit("liar-destroyed", t_try is not None and t_deferred is not None,
         destroy_s=round(t_gone, 1),
         try_end_zero_after_s=t_try and round(t_try, 1),
         deferred_freed_after_s=t_deferred and round(t_deferred, 1),
         freed=len(log["refs_freed"] & all_refs), of=len(all_refs),
         remaining=log["remaining"], free_per_iteration=per_tick,
         pending_lines=log["pending_lines"])
    with open(DYNDBG, "w") as f:
        f.write("file drivers/xen/grant-table.c -p\n")
    for provider in providers.values():
        provider.close()


def serve_domu(name, virt, gntdev, steps, lifetime, drm=(), attempt=1):
    """Start the domU, serve its steps, wait for its end. A domU whose
    kernel died (no LAB-EXIT: a triple fault, an oops) is booted again, up
    to DOMU_BOOTS times, unless its crash is the finding (OOPS_EXPECTED,
    once it has said anything);
    the results of a discarded boot stay in the log, tagged with it, and
    the report sets them aside."""
    t0 = time.monotonic()
    fds_before = len(os.listdir("/proc/self/fd"))
    labio.CONTEXT["attempt"] = tag = f"{name}#{attempt}"
    domid = start_domu(name, virt, gntdev, steps)
    relay = ConsoleRelay(name, tag)
    relay.start()
    labio.ABORT = relay.dead
    leases = None
    try:
        if "cross" in steps.split(","):
            leases = Leases(domid, name, drm if name == "pv" else ())
            serve_cross(leases, virt, gntdev.split(","))
            leases.close()
        if "liar" in steps.split(","):
            serve_liar(domid, name)
    except Exception as e:  # noqa: BLE001 - recorded; the domU is still waited for
        if leases is not None:
            leases.abandon()
        emit("dom0-serves", False, of=name, error=f"{type(e).__name__}: {e}")
    finish_domu(name, t0, lifetime - (time.monotonic() - t0), relay)
    labio.ABORT = leases = None
    del labio.CONTEXT["attempt"]
    flaky = relay.results == 0 or name not in OOPS_EXPECTED | DESTROYED_BY_DOM0
    if not relay.exited and flaky and attempt < DOMU_BOOTS:
        emit("domu-boot-discarded", None, domu=name, discarded=tag,
             results=relay.results, oops=relay.oops[:6],
             console=list(relay.tail))
        return serve_domu(name, virt, gntdev, steps, lifetime, drm,
                          attempt + 1)
    fds_after = len(os.listdir("/proc/self/fd"))
    emit("dom0-fds-after-domu", fds_after == fds_before, of=name,
         before=fds_before, after=fds_after)


def serve_cross(leases, virt, variants):
    """dom0's half of domu.py's cross_domain, step for step in its order."""
    from qubes_gpu_share.grant.expected import expected
    import checks
    for variant in variants:
        if not checks.has_ioctls(variant):
            continue
        table = expected(checks.kind_of(virt, variant))
        if table.receive_dmabuf is None and table.mmap_dmabuf is None:
            leases.check_dmabuf_written()
        leases.check_grant_back(variant)
    for mode in leases.modes:
        leases.check_written_back(mode)
        leases.release_after_consumer(mode)
    if virt == "pv":
        leases.check_domu_provides()


def environment():
    info = run([XL, "info"], timeout=60)
    xen = info.split("xen_version")[1].split(":")[1].split()[0]
    emit("env", None, kernel=platform.release(), guest_type=labio.guest_type(),
         dom0_gntdev="fixed (Debian's source + CONFIG_XEN_GNTDEV_DMABUF + "
                     "kernel/0001..0004)",
         python=platform.python_version(), xen=xen,
         qemu_cpu=os.environ.get("LAB_QEMU_CPU", "qemu64,+svm,+npt"))


def main():
    environment()
    checks.native_imports()
    drm = checks.drm_cards()
    checks.probe_matches("fixed")
    checks.contract_suite("fixed")
    gntalloc_limit()
    for domu in DOMUS:
        serve_domu(*domu, drm=drm)
    print("LAB-DONE", flush=True)


if __name__ == "__main__":
    labio.main_guard(main)

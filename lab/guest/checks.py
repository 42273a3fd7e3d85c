"""Checks that run the same way in dom0 and in a domU: the project's
helper imports, the probe against the expected table, the contract suite,
one row of the expected table tried for real."""

import glob
import os
import re
import subprocess
import time

import labio
from labio import emit

#: gntdev builds the lab loads, and which kernel of the expected table
#: (grant/expected.py, Kernel) each is
VARIANTS = {
    "stock": "stock",       # Debian's module: no CONFIG_XEN_GNTDEV_DMABUF
    "upstream": "dmabuf",   # Debian's source + CONFIG_XEN_GNTDEV_DMABUF
    "receive": "dmabuf,fix",  # that + kernel/0001 only (before/after 0002)
    "fixed": "fixed",       # that + the project's series, kernel/0001..0004
}


def has_ioctls(variant):
    return variant != "stock"


def python(args, timeout, cwd=None, env=None):
    """Run python3 ARGS: (exit status or 'timeout', output as text)."""
    try:
        p = subprocess.run(["python3", *args], cwd=cwd, text=True,
                           env=None if env is None else {**os.environ, **env},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", "", ""
    return p.returncode, p.stdout, p.stderr


def kind(variant):
    """This domain as the expected table describes it. The lab knows its
    own setup, so it says it rather than asking the project's reader: only
    dom0 has swiotlb-xen (the domUs have no PCI devices)."""
    return kind_of(labio.guest_type(), variant, labio.DOM == "dom0")


def kind_of(virt, variant, swiotlb=False):
    """The expected table's DomainKind of a domain of guest type ``virt``
    running gntdev build ``variant`` (grant/open.py's words)."""
    from qubes_gpu_share.grant.open import parse_traits
    return parse_traits(",".join([virt, VARIANTS[variant],
                                  *(["swiotlb"] if swiotlb else [])]))


def kind_words(variant):
    """The same kind as QUBES_GPU_SHARE_KIND words (grant/open.py)."""
    return ",".join([labio.guest_type(), VARIANTS[variant],
                     *(["swiotlb"] if labio.DOM == "dom0" else [])])


def device():
    """The project's grant device, asking the kernel about its frames each
    time: a domU swaps gntdev builds within one process, and the default
    check is asked once per process."""
    from qubes_gpu_share.grant.gntdev import (GntdevDevice,
                                              kernel_grants_own_frames)
    return GntdevDevice(frames_check=kernel_grants_own_frames)


def outcome(fn):
    """'works' or the name of the GrantError class the call raised."""
    from qubes_gpu_share.grant.errors import GrantError
    try:
        result = fn()
    except GrantError as e:
        return type(e).__name__, str(e), None
    return "works", "", result


def want(refusal):
    return "works" if refusal is None else refusal.error.__name__


def native_imports():
    with labio.Timer() as t:
        from qubes_gpu_share import native  # noqa: F401 - the cffi module loads
        from qubes_gpu_share.grant import gntdev  # noqa: F401
    emit("native-import", True, ms=t.ms)


def probe_matches(variant):
    """`qubes-gpu-share probe --json` in this domain must say what the
    expected table says this kind of domain can do."""
    import json
    from qubes_gpu_share.grant.expected import expected
    k = kind(variant)
    with labio.Timer() as t:
        rc, out, err = python(["-m", "qubes_gpu_share.cli.main", "probe",
                               "--json"], 45)
    try:
        report = json.loads(out)
    except ValueError:
        emit("probe", False, variant=variant, rc=rc, error=(err or out)[-800:])
        return
    from qubes_gpu_share.probe import NO_SELF_MAP
    status = {c["id"]: c["status"] for c in report["checks"]}
    sources = {s["name"]: s["status"] for s in report.get("sources", ())}
    exp = expected(k)
    should = {"grant-device": "yes", "receive-cpu": "yes",
              "provide-gntalloc": "yes",
              "dmabuf-ioctls": "yes" if k.dmabuf_ioctls else "no",
              "receive-dmabuf": "yes" if exp.receive_dmabuf is None else "no",
              "receive-dmabuf-mmap":
                  "yes" if exp.mmap_dmabuf is None else "no",
              # told by ending a granted udmabuf page: only where one is
              "release-query": "untested" if exp.grant_dmabuf else
                  "yes" if exp.held_pages else "no"}
    if k.dmabuf_ioctls and report["domain"]["guest_type"] in NO_SELF_MAP:
        should["receive-dmabuf"] = "untested"    # the probe does not self-map
        should["receive-dmabuf-mmap"] = "untested"
    # udmabuf is loaded in every lab domain: granting it follows the table
    should["udmabuf"] = ("grantable" if exp.grant_dmabuf is None
                         else "not-grantable")
    status["udmabuf"] = sources.get("udmabuf")
    wrong = {c: (status.get(c), v) for c, v in should.items()
             if status.get(c) != v}
    emit("probe", not wrong, variant=variant, ms=t.ms, wrong=wrong,
         receive_modes=report.get("receive_modes"),
         provide_modes=report.get("provide_modes"),
         gntalloc_limit=report.get("gntalloc_limit"),
         statuses={c: status.get(c) for c in should},
         sources=sources,
         details={c["id"]: c["detail"] for c in report["checks"]})


def contract_suite(variant):
    """tests/test_grant_real.py (the contract suite against this domain's
    real grant device, with gntdev build ``variant`` loaded), run with
    pytest inside the domain; the lab says which kernel it is."""
    from qubes_gpu_share.grant.domid import own_domid
    path = "/lab/tests/test_grant_real.py"
    if not os.path.exists(path):
        emit("contract-suite", None, skipped="tests/test_grant_real.py is "
             "not in the project yet")
        return
    with labio.Timer() as t:
        rc, out, err = python(["-m", "pytest", "-q", "--tb=line", "-rfEs", "-p",
                               "no:cacheprovider", "-m", "xen", path], 180,
                              cwd="/lab", env={"QUBES_GPU_SHARE_SELF_DOMID":
                                               str(own_domid()),
                                               "QUBES_GPU_SHARE_KIND":
                                               kind_words(variant)})
    counts = {k: int(n) for n, k in re.findall(
        r"(\d+) (passed|failed|skipped|errors?|deselected)", out)}
    emit("contract-suite", rc == 0 and counts.get("passed", 0) > 0,
         rc=rc, counts=counts, ms=t.ms, variant=variant,
         kind=kind_words(variant),
         tail=(out + err).strip().splitlines()[-40:])


def table_row(variant, peer, recv_refs, recv_bytes):
    """The expected table's row for this domain with this gntdev, tried
    against a real peer: grant a dma-buf to it, receive its refs as a
    dma-buf, map them for the CPU. Returns the import when it worked
    (the caller goes on with it), else None."""
    from qubes_gpu_share.alloc.udmabuf import UdmabufAllocator
    from qubes_gpu_share.grant.expected import expected
    k = kind(variant)
    exp = expected(k)
    dev = device()
    row = dict(variant=variant, virt=k.virt_mode.value)

    with UdmabufAllocator().allocate(4096) as buf:
        got, why, grant = outcome(lambda: dev.grant_dmabuf(buf.fd, 1, peer))
        if grant is not None:
            grant.revoke()
    emit("table-grant-dmabuf", got == want(exp.grant_dmabuf), **row,
         expected=want(exp.grant_dmabuf), observed=got, reason=why)

    got, why, imported = outcome(lambda: dev.import_dmabuf(peer, recv_refs))
    emit("table-receive-dmabuf", got == want(exp.receive_dmabuf), **row,
         expected=want(exp.receive_dmabuf), observed=got, reason=why)

    # the received dma-buf for the CPU (kernel/0002): mmap, dom0's bytes
    if imported is None:
        mm, same = got, None
    else:
        try:
            with imported.view().mmap(writable=False) as view:
                same = bytes(view) == recv_bytes
            mm = "works"
        except OSError as e:
            mm, same = "MapRefused", None
            why = f"mmap: {e.strerror} (errno {e.errno})"
    emit("table-mmap-dmabuf", mm == want(exp.mmap_dmabuf)
         and same is not False, **row, expected=want(exp.mmap_dmabuf),
         observed=mm, same_bytes=same, reason=why if mm != "works" else "")

    # a real DRM driver imports it (vgem, PRIME_FD_TO_HANDLE)
    if imported is None:
        vg, why = got, "no dma-buf was received"
    else:
        vg, why = vgem_import(imported.fd)
    emit("table-vgem-import", vg == want(exp.receive_dmabuf), **row,
         expected=want(exp.receive_dmabuf), observed=vg, reason=why)

    def cpu_map():
        with dev.map_grant(peer, recv_refs, writable=False) as m:
            view = m.mmap(False)
            same = bytes(view) == recv_bytes
            view.close()
        return same
    got, why, same = outcome(cpu_map)
    emit("table-receive-cpu", got == want(exp.map_cpu) and same is not False,
         **row, expected=want(exp.map_cpu), observed=got, reason=why,
         same_bytes=same)
    return imported


def vgem_card():
    """vgem's card node (the only DRM driver of a domU), loading it."""
    for ko in open("/lab/load/vgem").read().split():
        labio.run(["insmod", ko], check=False)    # shared deps load once
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for node in sorted(glob.glob("/dev/dri/card*")):
            name = os.path.basename(node)
            drv = f"/sys/class/drm/{name}/device/driver"
            dev = os.path.realpath(f"/sys/class/drm/{name}/device")
            if "vgem" in os.path.basename(dev) or (
                    os.path.exists(drv) and "vgem" in os.path.realpath(drv)):
                return node
        time.sleep(0.1)
    raise RuntimeError("vgem's card node did not appear")


def vgem_import(dmabuf_fd):
    """('works', handle note) or (errno name, why): PRIME_FD_TO_HANDLE of
    the dma-buf into vgem, the handle closed again."""
    from qubes_gpu_share import native
    try:
        card = os.open(vgem_card(), os.O_RDWR | os.O_CLOEXEC)
    except (OSError, RuntimeError) as e:
        return "no vgem", str(e)
    try:
        handle = native.drm_prime_fd_to_handle(card, dmabuf_fd)
        native.drm_gem_close(card, handle)
        return "works", f"GEM handle {handle}"
    except OSError as e:
        return errno_name(e.errno), str(e)
    finally:
        os.close(card)


def errno_name(err):
    import errno as errno_mod
    return errno_mod.errorcode.get(err, str(err))


SELF_GRANT = r"""
import sys
from qubes_gpu_share.grant.domid import own_domid
from qubes_gpu_share.grant.gntdev import GntdevDevice
dev, me = GntdevDevice(), own_domid()
step = sys.argv[1]
with dev.grant_new_pages(1, me) as g:
    buf = g.view().mmap()
    buf[:16] = b"self-grant-check"
    if step == "cpu":
        with dev.map_grant(me, g.refs) as m:
            v = m.mmap()
            print(bytes(v[:16]) == b"self-grant-check")
            v.close()
    else:
        try:
            dev.import_dmabuf(me, g.refs).release(1000)
            print("works")
        except Exception as e:
            print(type(e).__name__)
    buf.close()
"""


def kernel_complaints():
    out = labio.run(["dmesg"], check=False)
    return [l for l in out.splitlines()
            if any(w in l for w in ("BUG:", "Oops", "WARNING:", "general protection"))]


def self_grant(variant):
    """The probe's method: grant a page to this domain itself, map it
    (MAP_GRANT_REF + mmap), and try EXP_FROM_REFS on it. Each step in a
    fresh process, then the kernel log and a fresh process's sanity."""
    from qubes_gpu_share.grant.expected import expected
    labio.use_gntdev(variant)
    answers = {"cpu": "True", "dmabuf": want(expected(kind(variant)).receive_dmabuf)}
    for step, should in answers.items():
        before = len(kernel_complaints())
        rc, out, err = python(["-c", SELF_GRANT, step], 30)
        sane = python(["-c", "print(sum(range(1000)))"], 30)[1].strip()
        new = kernel_complaints()[before:]
        emit(f"self-grant-{step}", out.strip() == should and not new
             and sane == "499500", variant=variant, expected=should,
             answer=(out + err).strip()[-300:], rc=rc,
             sane_after=sane == "499500", kernel_log=new[:8])


def kernel_sane():
    """After everything: no oops in the kernel log, and a new process
    still computes what it should (memory not corrupted)."""
    out = python(["-c", "print(sum(range(1000)))"], 30)[1].strip()
    new = kernel_complaints()
    emit("kernel-sane", not new and out == "499500",
         process_ok=out == "499500", kernel_log=new[:8])


#: card nodes expected from the DRM modules make-initramfs lists in
#: /lab/load/drm.list: vgem, virtio-gpu, bochs-drm
DRM_CARDS = 3


def label(node):
    """The driver of a card's own device (virtio_gpu, not the virtio-pci
    bus it sits on), or its device's name when no driver is bound (vgem
    is a platform device without one)."""
    dev = f"/sys/class/drm/{os.path.basename(node.node)}/device"
    # virtio-gpu's card hangs off the PCI device (driver virtio-pci); its
    # own driver is on the virtio device below it
    for d in [*sorted(glob.glob(dev + "/virtio*/driver")), dev + "/driver"]:
        if os.path.exists(d):
            return os.path.basename(os.path.realpath(d))
    return os.path.basename(os.path.realpath(dev))


def drm_cards():
    """Load the DRM drivers (QEMU gives dom0 a standard VGA, bochs-drm, and
    a virtio-gpu; vgem needs no device) and list the card nodes the
    project's device scan finds: [(driver, DrmNode)]."""
    from qubes_gpu_share import devices
    for name in open("/lab/load/drm.list").read().split():
        for ko in open(f"/lab/load/{name}").read().split():
            labio.run(["insmod", ko], check=False)   # shared deps load once
    deadline = time.monotonic() + 20
    while True:
        cards = [(label(n), n) for n in devices.scan().drm if n.kind == "card"]
        if len(cards) >= DRM_CARDS or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    modules = sorted(l.split()[0] for l in open("/proc/modules")
                     if re.match(r"(drm|vgem|virtio|bochs|ttm)", l))
    pci = sorted(open(f"/sys/bus/pci/devices/{d}/vendor").read().strip() + ":"
                 + open(f"/sys/bus/pci/devices/{d}/device").read().strip()
                 for d in os.listdir("/sys/bus/pci/devices"))
    log = [l for l in labio.run(["dmesg"], check=False).splitlines()
           if re.search(r"virtio|drm|bochs|vgem", l, re.I)]
    emit("drm-cards", len(cards) >= DRM_CARDS,
         cards={n.node: f"{d} ({n.memory.value})" for d, n in cards},
         modules=modules, pci=pci, kernel_log=log[-12:])
    return cards

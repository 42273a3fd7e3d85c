#!/usr/bin/env python3
"""Read the lab's serial log, decide, and write the record.

    lab/out/results.json   every result line, versions, boot timings, the
                           verdict and why
    lab/out/results.md     the table "what crosses between Xen domains on
                           x86, stock vs fixed"
    --readme               also put that table into lab/README.md

Exit status 0 only when the run completed, every required result is there
and passed, and nothing failed except the known findings listed in KNOWN
(each a measured fact of Xen/Linux, explained in lab/README.md).
"""

import json
import os
import re
import sys

LAB = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(LAB, "out")
README = os.path.join(LAB, "README.md")
BEGIN, END = "<!-- lab-results:begin -->", "<!-- lab-results:end -->"

def _oops(r):
    """The result's kernel log (or dom0's relay) shows an oops."""
    return bool(r.get("kernel_log") or r.get("oops"))


#: Failures that are findings, not lab faults: (dom, test, domu or None)
#: -> (why, the exact failure accepted). Anything else that fails fails the
#: run, and so does one of these failing any other way.
KNOWN = {
    ("pvh-self", "self-grant-cpu", None): (
        "a PVH domU that maps a grant of its own reads other bytes (0xff: "
        "pages with no memory behind them) or oopses; the probe therefore "
        "does not self-map in PVH/HVM",
        lambda r: r.get("answer") == "False" or "\ufffd" in r.get("answer", "")
        or _oops(r)),
    ("pvh-self", "self-grant-dmabuf", None): (
        "after the self-map, the next process that grants to itself hangs "
        "(30 s timeout) or the same oops shows (the answer itself, "
        "DmabufNotSupported of Debian's stock gntdev, would be right)",
        lambda r: r.get("rc") == "timeout" or (
            r.get("answer") == "DmabufNotSupported"
            and (_oops(r) or not r.get("sane_after")))),
    ("pvh-self", "kernel-sane", None): (
        "the same oops in that domU's kernel log", _oops),
    ("dom0", "domu-kernel-clean", "pvh-self"): (
        "the same oops, relayed by dom0", _oops),
    ("dom0", "domu-run", "pvh-self"): (
        "its kernel hangs after the self-grant until dom0's timeout",
        lambda r: r.get("ms", 0) >= (r.get("timeout_s", 0) - 15) * 1000),
}

#: Results that must be present and pass: (dom, test, {field: value}).
REQUIRED = [
    ("dom0", "native-import", {}),
    ("dom0", "probe", {}),
    ("dom0", "contract-suite", {}),
    *[(d, "consumer-sees-picture", {"mode": m})
      for d in ("pv", "pvh") for m in ("udmabuf", "gntalloc")],
    *[("dom0", t, {"of": d, "mode": m})
      for t in ("provider-sees-write", "provider-release")
      for d in ("pv", "pvh") for m in ("udmabuf", "gntalloc")],
    *[(d, t, {"variant": v}) for d, vs in (
        ("pv", ("stock", "upstream", "fixed")),
        ("pvh", ("stock", "upstream", "receive", "fixed")))
      for t in ("table-grant-dmabuf", "table-receive-dmabuf",
                "table-receive-cpu", "table-mmap-dmabuf", "table-vgem-import")
      for v in vs],
    ("pvh", "grant-back-control", {"variant": "receive"}),
    *[(d, "grant-back-control", {"variant": v}) for d in ("pv", "pvh")
      for v in ("upstream", "fixed")],
    *[("pv", "provider-choice", {"variant": v}) for v in ("upstream", "fixed")],
    ("pv", "provider-to-dom0", {"variant": "fixed"}),
    ("pvh", "exp-from-refs-fd", {}),
    ("pvh", "dmabuf-mmap-reads-dom0", {}),
    ("pvh", "dmabuf-mmap-write-seen-by-dom0", {}),
    ("dom0", "provider-sees-dmabuf-write", {}),
    ("pvh", "dmabuf-mmap-again", {}),
    ("pvh", "exp-dmabuf-holds-dom0-pages", {}),
    ("pvh", "exp-dmabuf-vmap-holds-dom0-pages", {}),
    ("pvh", "vgem-import", {}),
    ("pvh", "vgem-gem-mmap-own-buffer", {}),
    ("pvh", "vgem-gem-mmap-import", {}),
    ("dom0", "gntalloc-default-limit", {}),
    *[("dom0", "provide", {"to": "pv", "mode": m}) for m in (
        "drm-vgem", "drm-virtio_gpu", "drm-bochs-drm")],
    ("pvh", "vgem-gem-mmap-import-control", {}),
    ("pvh", "vgem-reexport-mmap-reads-dom0", {}),
    ("pvh", "regrant-refused-by-project", {}),
    ("pvh", "grant-back-regrant", {}),
    ("pvh", "wait-released-while-open", {}),
    ("pvh", "wait-released-while-mapped", {}),
    ("pvh", "wait-released-after-last-close", {}),
    ("pvh", "wait-released-again", {}),
    ("pvh", "consumer-dmabuf-mode", {}),
    *[("pv", "probe", {"variant": v}) for v in ("stock", "upstream", "fixed")],
    ("pv", "contract-suite", {}),
    ("pv", "kernel-sane", {}),
    *[("pvh-probe", "probe", {"variant": v}) for v in ("upstream", "fixed")],
    ("pvh-probe", "kernel-sane", {}),
    ("dom0", "drm-cards", {}),
    ("pvh", "kernel-sane", {}),
    *[("liar", "liar-maps", {"what": w})
      for w in ("try-end", "imp-release", "gntalloc", "broker")],
    ("dom0", "liar-broker-holds", {}),
    ("dom0", "liar-broker-budget-back", {}),
    ("dom0", "liar-try-end", {}),
    ("dom0", "liar-try-end-defers-nothing", {}),
    *[("dom0", "liar-end-deferred", {"how": h})
      for h in ("imp-release", "gntalloc")],
    ("dom0", "liar-still-held", {}),
    ("dom0", "liar-destroyed", {}),
]

#: Results that must be present whatever their verdict (the findings):
#: (what, [(dom, test, {field: value}, accepts)...]): one of the
#: alternatives. pvh-self's self-map either reports its bytes, or its
#: kernel oopses before the result leaves it (seen in __tlb_remove_page_size
#: during the munmap), which dom0 relays.
PRESENT = [
    ("pvh-self self-grant-cpu, or its kernel's oops relayed by dom0", [
        ("pvh-self", "self-grant-cpu", {}, lambda r: True),
        ("dom0", "domu-kernel-clean", {"domu": "pvh-self"}, _oops)]),
]

ERRNO = {"DmabufNotSupported": "ENOTTY", "DmabufReceiveRefused": "EINVAL",
         "NotGrantable": "EINVAL", "MapRefused": "EINVAL",
         "GrantTableFull": "ENOSPC", "ReleaseTimeout": "ETIMEDOUT",
         "AlreadyReleased": "ENOENT"}

#: what the project does instead of calling the kernel, said as such in
#: the table (the reason text of expected.GRANT_REFUSED_PV_DMA)
PROJECT_REFUSES = ("wrong frames",
                   "refused by the project (the kernel would grant wrong "
                   "frames)")


def parse(log):
    results, done = [], False
    for line in open(log, errors="replace"):
        if line.startswith("LAB-DONE"):
            done = True
        if line.startswith("LAB-RESULT "):
            try:
                results.append(json.loads(line[len("LAB-RESULT "):]))
            except ValueError:
                results.append({"dom": "?", "test": "unparsable", "ok": False,
                                "line": line[:300]})
    return results, done


def set_aside(results):
    """(kept, discarded boots): every result of a domU boot dom0 discarded
    (its kernel died under emulation and it was booted again) is set aside,
    dom0's own results for it included; they stay in results.json."""
    gone = {r["discarded"] for r in results
            if r["test"] == "domu-boot-discarded"}
    return ([r for r in results if r.get("attempt") not in gone],
            [r for r in results if r["test"] == "domu-boot-discarded"])


def known(r):
    """Why this failure is a finding, or None: only the exact failure
    KNOWN accepts for that result."""
    for (dom, test, domu), (why, accepts) in KNOWN.items():
        if r["dom"] == dom and test == r["test"] and \
                domu in (None, r.get("domu")) and accepts(r):
            return why
    return None


def find(results, dom, test, **fields):
    return [r for r in results if r["dom"] == dom and r["test"] == test
            and all(r.get(k) == v for k, v in fields.items())]


def cell(results, dom, test, **fields):
    rs = find(results, dom, test, **fields)
    if not rs:
        return "not run"
    r = rs[0]
    obs = r.get("observed", "works" if r["ok"] else "failed")
    if obs == "works":
        text = "works"
    elif obs == "NotGrantable" and PROJECT_REFUSES[0] in r.get("reason", ""):
        text = PROJECT_REFUSES[1]
    else:
        text = f"{ERRNO.get(obs, obs)} ({obs})"
    return text + ("" if r["ok"] is not False else " **unexpected**")


def grant_back_cell(results, dom, variant):
    """What dom0 found mapping the refs the domU's raw IMP_TO_REFS gave."""
    rs = find(results, dom, "grant-back-control", variant=variant)
    if not rs:
        return "– (no DMABUF ioctls)" if variant == "stock" else "not run"
    verdict = rs[0].get("verdict", "?")
    if verdict == "same":
        text = "works: dom0 reads the domU's bytes"
    elif "GNTST_bad_page" in verdict:
        text = "wrong frames: Xen refuses every ref (GNTST_bad_page)"
    else:
        text = verdict.replace("|", "/")[:80]
    return text + ("" if rs[0]["ok"] is not False else " **unexpected**")


def ms(results, dom, test, key="ms", **fields):
    rs = find(results, dom, test, **fields)
    return f"{rs[0][key]} ms" if rs and key in rs[0] else "–"


def table(results, versions, boot, discarded=(), checkpatch=None):
    checkpatch = checkpatch or {}
    cols = [*(("pv", v) for v in ("stock", "upstream", "fixed")),
            *(("pvh", v) for v in ("stock", "upstream", "receive", "fixed"))]
    name = {"stock": "Debian stock", "upstream": "+DMABUF",
            "receive": "+DMABUF+0001", "fixed": "+DMABUF+fix"}
    lines = ["| domU kernel's gntdev → | " + " | ".join(
        f"{d.upper()} {name[v]}" for d, v in cols) + " |",
        "|---|" + "---|" * len(cols)]
    for label, test in (
            ("domU grants a udmabuf to dom0 (IMP_TO_REFS, through the project)", "table-grant-dmabuf"),
            ("domU receives dom0's grant as a dma-buf (EXP_FROM_REFS)", "table-receive-dmabuf"),
            ("a process maps that dma-buf (mmap), reads dom0's bytes", "table-mmap-dmabuf"),
            ("a DRM driver imports it (vgem, PRIME_FD_TO_HANDLE)", "table-vgem-import"),
            ("domU maps dom0's grant for the CPU (MAP_GRANT_REF + mmap)", "table-receive-cpu")):
        lines.append(f"| {label} | " + " | ".join(
            cell(results, d, test, variant=v) for d, v in cols) + " |")
    lines.append("| the kernel's own IMP_TO_REFS of a udmabuf (raw ioctl), dom0 maps the refs | "
                 + " | ".join(grant_back_cell(results, d, v) for d, v in cols)
                 + " |")

    facts = [
        ("dom0 (PV, +DMABUF+fix) probe: receive modes",
         ", ".join((find(results, "dom0", "probe") or [{}])[0].get("receive_modes") or []) or "–", ""),
        ("xen-gntalloc default `limit` (pages), a 1920x1080 XR24 frame needs 2025",
         str((find(results, "dom0", "gntalloc-default-limit") or [{}])[0].get("limit", "–")),
         (find(results, "dom0", "gntalloc-default-limit") or [{}])[0].get("observed", "")),
    ]
    for d in ("pv", "pvh"):
        for m, how in (("udmabuf", "memfd → udmabuf → IMP_TO_REFS"),
                       ("gntalloc", "gntalloc pages")):
            seen = find(results, d, "consumer-sees-picture", mode=m)
            wrote = find(results, "dom0", "provider-sees-write", of=d, mode=m)
            rel = find(results, "dom0", "provider-release", of=d, mode=m)
            ok = bool(seen and seen[0]["ok"] and wrote and wrote[0]["ok"]
                      and rel and rel[0]["ok"])
            facts.append((
                f"lease dom0 → {d.upper()} domU, {how}, cpu mode via the agents: "
                f"full 1920x1080 XR24 read, written back, released in order",
                "works" if ok else "**failed**",
                f"map {ms(results, d, 'consumer-sees-picture', 'map_ms', mode=m)}, "
                f"check {ms(results, d, 'consumer-sees-picture', 'check_ms', mode=m)}, "
                f"IMP_RELEASE/dealloc {ms(results, 'dom0', 'provider-release', of=d, mode=m)}"))
    # GPU buffers: every DRM driver dom0 had, its dumb buffer exported
    for r in find(results, "dom0", "provide", to="pv"):
        if not r["mode"].startswith("drm-"):
            continue
        seen = find(results, "pv", "consumer-sees-picture", mode=r["mode"])
        wrote = find(results, "dom0", "provider-sees-write", of="pv", mode=r["mode"])
        if "error" not in r:
            res = ("works" if seen and seen[0]["ok"] and wrote and wrote[0]["ok"]
                   else "**failed**")
        else:
            res = "refused: " + r.get("error", "?").replace("|", "/")[:140]
        if r["ok"] is False:
            res += " **unexpected**"
        facts.append((f"dom0 GPU buffer, {r['mode'][4:]} dumb buffer → PRIME → "
                      f"IMP_TO_REFS → PV domU maps, checks, writes back", res,
                      ms(results, "pv", "consumer-sees-picture", "check_ms",
                         mode=r["mode"])))
    for label, dom, test, key, *extra in (
            ("PVH +fix: EXP_FROM_REFS fd is a dma-buf", "pvh", "exp-from-refs-fd", "fd_target"),
            ("PVH +fix: Python mmaps it, DMA_BUF_IOCTL_SYNC start/end around the access, reads dom0's 4 pages", "pvh", "dmabuf-mmap-reads-dom0", None),
            ("PVH +fix: DMA_BUF_IOCTL_SYNC start, end", "pvh", "dmabuf-mmap-reads-dom0", "sync_start"),
            ("PVH +fix: bytes written through that mapping, read by dom0 in its own pages", "dom0", "provider-sees-dmabuf-write", None),
            ("PVH +fix: a second mmap of the same dma-buf (its second page alone)", "pvh", "dmabuf-mmap-again", None),
            ("PVH +fix: EXP_WAIT_RELEASED while open", "pvh", "wait-released-while-open", "answer"),
            ("PVH +fix: EXP_WAIT_RELEASED after the last fd closed, a mapping left", "pvh", "wait-released-while-mapped", "answer"),
            ("PVH +fix: EXP_WAIT_RELEASED across the munmap of that mapping", "pvh", "wait-released-after-last-close", "answer"),
            ("PVH +fix: EXP_WAIT_RELEASED afterwards", "pvh", "wait-released-again", "answer"),
            ("PVH +fix: consumer agent in dmabuf mode (receive, the application's one mmap reads dom0's bytes, let go)", "pvh", "consumer-dmabuf-mode", None),
            ("PVH +fix: the dma-buf holds dom0's pages (read by an importing driver through the sg table, lab/modules/dmabuf-peek.c)", "pvh", "exp-dmabuf-holds-dom0-pages", None),
            ("PVH +fix: the same through the exporter's vmap (dma_buf_vmap, begin/end_cpu_access)", "pvh", "exp-dmabuf-vmap-holds-dom0-pages", None),
            ("PVH +fix: vgem imports it (PRIME_FD_TO_HANDLE)", "pvh", "vgem-import", None),
            ("PVH +fix: vgem's GEM mmap of its own dumb buffer (MODE_MAP_DUMB)", "pvh", "vgem-gem-mmap-own-buffer", "answer"),
            ("PVH +fix: vgem's GEM mmap of the imported dma-buf (MODE_MAP_DUMB)", "pvh", "vgem-gem-mmap-import", "answer"),
            ("PVH +fix: the same for an imported udmabuf (the control: DRM core refuses any import)", "pvh", "vgem-gem-mmap-import-control", "answer"),
            ("PVH +fix: vgem's import exported again (PRIME_HANDLE_TO_FD), mmapped: dom0's bytes", "pvh", "vgem-reexport-mmap-reads-dom0", None),
            ("PVH +fix: the dma-buf's exporter (fdinfo exp_name)", "pvh", "exp-from-refs-fd", "exp_name"),
            ("PVH +fix: domU grants that dma-buf on to dom0 (IMP_TO_REFS), dom0 maps it", "pvh", "grant-back-regrant", "verdict"),
            ("PVH +fix: the project refuses to grant it on", "pvh", "regrant-refused-by-project", "observed"),
            ("PV domU, +DMABUF: the provider agent's choice (the kernel asked: a udmabuf page granted to itself, mapped back)", "pv", "provider-choice", "source", {"variant": "upstream"}),
            ("PV domU, +DMABUF+fix: the provider agent's choice", "pv", "provider-choice", "source", {"variant": "fixed"}),
            ("PV domU, +DMABUF+fix: its provider agent grants a udmabuf to dom0, dom0 maps it and reads the domU's bytes", "pv", "provider-to-dom0", "verdict", {"variant": "fixed"}),
            ("PV domU maps a grant of its own (self-grant, as the probe)", "pv", "self-grant-cpu", "answer"),
            ("PVH domU maps a grant of its own (Debian stock gntdev)", "pvh-self", "self-grant-cpu", "answer"),
            ("oops lines in that PVH domU's kernel log", "dom0", "domu-kernel-clean", "oops", {"domu": "pvh-self"}),
            ("the probe in a PVH domU (+DMABUF): receive modes", "pvh-probe", "probe", "receive_modes", {"variant": "upstream"}),
            ("the probe in a PVH domU (+DMABUF+fix): its checks", "pvh-probe", "probe", "statuses", {"variant": "fixed"}),
            ("the probe in a PV domU (+DMABUF): provide modes", "pv", "probe", "provide_modes", {"variant": "upstream"}),
            ("the probe in a PV domU (+DMABUF+fix): provide modes", "pv", "probe", "provide_modes", {"variant": "fixed"}),
            ("the probe in dom0 (+DMABUF+fix): its checks", "dom0", "probe", "statuses"),
            ("contract suite (tests/test_grant_real.py) in dom0 (+DMABUF+fix)", "dom0", "contract-suite", "counts"),
            ("contract suite in the PV domU (+DMABUF+fix)", "pv", "contract-suite", "counts"),
            ("liar (PV domU) maps 4 buffers of dom0's (3 from its provider agent, 1 through its broker), says released, keeps them: the provider agent (IMP_TRY_RELEASE) answers", "dom0", "liar-try-end", "reason"),
            ("the same ended with IMP_RELEASE: what the ioctl said / grant-table.c's deferral (dynamic debug lines)", "dom0", "liar-end-deferred", "deferred_lines", {"how": "imp-release"}),
            ("the same with gntalloc's dealloc (the provider agent answers released) / deferral lines", "dom0", "liar-end-deferred", "deferred_lines", {"how": "gntalloc"}),
            ("after 3 s more, the provider agent still answers", "dom0", "liar-still-held", "reason"),
            ("xl destroy liar: seconds until IMP_TRY_RELEASE reports 0 held", "dom0", "liar-destroyed", "try_end_zero_after_s"),
            ("xl destroy liar: seconds until every deferred ref is freed (free_per_iteration per second)", "dom0", "liar-destroyed", "deferred_freed_after_s"),
            ("a 4th buffer leased through the broker: after the liar's GpuRelease, the admin sees", "dom0", "liar-broker-holds", "waiting"),
            ("the same: pages charged to dom0's budget / held by the liar", "dom0", "liar-broker-holds", "dom0_pages_used"),
            ("xl destroy liar: seconds until the broker gives dom0's budget back", "dom0", "liar-broker-budget-back", "budget_back_after_s")):
        fields = extra[0] if extra else {}
        rs = find(results, dom, test, **fields)
        if not rs and dom == "pvh-self" and any(
                _oops(r) for r in find(results, "dom0", "domu-kernel-clean",
                                       domu="pvh-self")):
            facts.append((label, "no result: the domU's kernel oopsed "
                          "during it (next row)", ""))
            continue
        if not rs:
            facts.append((label, "not run", ""))
            continue
        r = rs[0]
        val = r.get(key) if key else ("works" if r["ok"] else "failed")
        if isinstance(val, list):
            val = "; ".join(val[:2]) or "clean"
        if isinstance(val, dict):
            val = ", ".join(f"{v} {k}" for k, v in val.items())
        if val == "True":
            val = "works, same bytes"
        if isinstance(val, str) and "\ufffd" in val:
            val = "unreadable output (bytes 0xff: pages with no memory behind them)"
        facts.append((label, str(val).replace("|", "/")[:160],
                      ms(results, dom, test, **fields)))
    boots = len(find(results, "dom0", "domu-create")) + len(discarded)
    facts.append(("domU boots discarded and booted again (kernel died under "
                  "emulation; evidence below)", f"{len(discarded)} of {boots}",
                  ""))
    for name, r in sorted(checkpatch.items()):
        facts.append((f"scripts/checkpatch.pl --strict (Debian's 6.1 source) on kernel/{name[:40]}…",
                      f"{r.get('errors', '?')} errors, {r.get('warnings', '?')} warnings, "
                      f"{r.get('checks', '?')} checks"
                      + (" (only the commit id it cannot look up without a git tree)"
                         if r.get("no_tree_only") else ""), ""))
    lines += ["", "| what | result | time |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in facts]
    if discarded:
        lines += ["", "Discarded domU boots, each with the last lines of its "
                  "console (its kernel died under emulation; its results "
                  "are set aside):", ""]
        for r in discarded:
            evidence = r.get("oops") or r.get("console") or \
                ["(no console line: the domain vanished, a triple fault)"]
            lines.append(f"- {r['discarded']} after {r.get('results', 0)} "
                         f"results: " + " / ".join(
                             e.replace("|", "/")[:120] for e in evidence[-4:]))
    env = (find(results, "dom0", "env") or [{}])[0]
    lines += ["", f"Xen {env.get('xen', '?')} ({versions.get('xen-hypervisor-4.17-amd64', '?')}), "
              f"Linux {env.get('kernel', '?')} ({versions.get('linux-image-' + env.get('kernel', ''), '?')}), "
              f"Python {env.get('python', '?')}, QEMU TCG `-cpu {env.get('qemu_cpu', '?')}`, "
              f"dom0 PV, domUs started with xl. Boot: {boot}. "
              "+DMABUF = Debian's gntdev source built with CONFIG_XEN_GNTDEV_DMABUF; "
              "+DMABUF+0001 = that plus kernel/0001 only; "
              "+fix = that plus the project's series, kernel/0001..0004 (dom0 runs it too); "
              "udmabuf built with a test-only patch (lab/modules/). Times are under "
              "software emulation."]
    return "\n".join(lines)


def main():
    everything, done = parse(os.path.join(OUT, "serial.log"))
    results, discarded = set_aside(everything)
    versions = {}
    for line in open(os.path.join(OUT, "packages.txt")):
        parts = line.split()
        if len(parts) == 3:
            versions[parts[1]] = parts[2]
    boot_lines = open(os.path.join(OUT, "boot.txt")).read().split("\n")
    boot = "; ".join(l for l in boot_lines if l)
    try:
        checkpatch = json.load(open(os.path.join(OUT, "checkpatch.json")))
    except (OSError, ValueError):
        checkpatch = {}
    unexpected, findings = [], []
    for r in results:
        if r["ok"] is False:
            why = known(r)
            (findings if why else unexpected).append(
                {"dom": r["dom"], "test": r["test"], **({"known": why} if why else {})})
    missing = [f"{d} {t} {f}" for d, t, f in REQUIRED
               if not any(r["ok"] for r in find(results, d, t, **f))]
    missing += [what for what, alternatives in PRESENT
                if not any(accepts(r) for d, t, f, accepts in alternatives
                           for r in find(results, d, t, **f))]
    missing += [f"checkpatch clean: {name}" for name, r in checkpatch.items()
                if not r.get("clean")]
    if not checkpatch:
        missing.append("checkpatch results (lab/checkpatch)")
    verdict = "pass" if done and not unexpected and not missing else "fail"
    record = {"verdict": verdict, "completed": done, "boot": boot_lines[:-1],
              "unexpected_failures": unexpected, "missing_required": missing,
              "known_findings": findings, "versions": versions,
              "discarded_boots": discarded, "checkpatch": checkpatch,
              "results": everything}
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    md = table(results, versions, boot, discarded, checkpatch)
    with open(os.path.join(OUT, "results.md"), "w") as f:
        f.write(md + "\n")
    if "--readme" in sys.argv:
        text = open(README).read()
        text = re.sub(re.escape(BEGIN) + ".*" + re.escape(END),
                      lambda m: f"{BEGIN}\n{md}\n{END}", text, flags=re.S)
        with open(README, "w") as f:
            f.write(text)
    print(md)
    print(f"report: {verdict}: {len(results)} results "
          f"({len(discarded)} domU boots discarded), "
          f"{len(unexpected)} unexpected failures, {len(missing)} missing, "
          f"{len(findings)} known findings (lab/out/results.json)")
    for u in unexpected:
        print(f"  unexpected: {u['dom']} {u['test']}")
    for m in missing:
        print(f"  missing: {m}")
    return 0 if verdict == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())

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

#: Failures that are findings, not lab faults: (dom, test, domu or None) ->
#: why. Anything else that fails fails the run.
KNOWN = {
    ("pvh-self", "*", None):
        "a PVH domU that maps a grant of its own corrupts its kernel's "
        "memory (oops); the probe therefore does not self-map in PVH/HVM",
    ("dom0", "domu-kernel-clean", "pvh-self"): "same oops, seen from dom0",
    ("dom0", "domu-run", "pvh-self"): "its kernel hangs after the self-grant",
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
    *[(d, t, {"variant": v}) for d in ("pv", "pvh")
      for t in ("table-grant-dmabuf", "table-receive-dmabuf",
                "table-receive-cpu")
      for v in ("stock", "upstream", "fixed")],
    ("pvh", "exp-from-refs-fd", {}),
    ("pvh", "exp-dmabuf-holds-dom0-pages", {}),
    ("pvh", "regrant-refused-by-project", {}),
    ("pvh", "grant-back-control", {}),
    ("pvh", "grant-back-regrant", {}),
    ("pvh", "wait-released-while-open", {}),
    ("pvh", "wait-released-after-last-close", {}),
    ("pvh", "wait-released-again", {}),
    ("pvh", "consumer-dmabuf-mode", {}),
    ("pv", "grant-back-control", {}),
    *[("pv", "probe", {"variant": v}) for v in ("stock", "upstream", "fixed")],
    ("pv", "contract-suite", {}),
    ("pv", "kernel-sane", {}),
    ("pvh-probe", "probe", {"variant": "upstream"}),
    ("pvh-probe", "kernel-sane", {}),
    ("dom0", "drm-cards", {}),
    ("pvh", "kernel-sane", {}),
]

#: Results that must be present whatever their verdict (the findings).
PRESENT = [("pvh-self", "self-grant-cpu")]

ERRNO = {"DmabufNotSupported": "ENOTTY", "DmabufReceiveRefused": "EINVAL",
         "NotGrantable": "EINVAL", "MapRefused": "EINVAL",
         "GrantTableFull": "ENOSPC", "ReleaseTimeout": "ETIMEDOUT",
         "AlreadyReleased": "ENOENT"}


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
    for (dom, test, domu), why in KNOWN.items():
        if r["dom"] == dom and test in ("*", r["test"]) and \
                domu in (None, r.get("domu")):
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
    text = "works" if obs == "works" else f"{ERRNO.get(obs, obs)} ({obs})"
    return text + ("" if r["ok"] is not False else " **unexpected**")


def ms(results, dom, test, key="ms", **fields):
    rs = find(results, dom, test, **fields)
    return f"{rs[0][key]} ms" if rs and key in rs[0] else "–"


def table(results, versions, boot, discarded=()):
    cols = [(d, v) for d in ("pv", "pvh") for v in ("stock", "upstream", "fixed")]
    name = {"stock": "Debian stock", "upstream": "+DMABUF", "fixed": "+DMABUF+fix"}
    lines = ["| domU kernel's gntdev → | " + " | ".join(
        f"{d.upper()} {name[v]}" for d, v in cols) + " |",
        "|---|" + "---|" * len(cols)]
    for label, test in (
            ("domU grants a udmabuf to dom0 (IMP_TO_REFS)", "table-grant-dmabuf"),
            ("domU receives dom0's grant as a dma-buf (EXP_FROM_REFS)", "table-receive-dmabuf"),
            ("domU maps dom0's grant for the CPU (MAP_GRANT_REF + mmap)", "table-receive-cpu")):
        lines.append(f"| {label} | " + " | ".join(
            cell(results, d, test, variant=v) for d, v in cols) + " |")

    facts = [
        ("dom0 (PV, +DMABUF) probe: receive modes",
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
        if r["ok"]:
            res = ("works" if seen and seen[0]["ok"] and wrote and wrote[0]["ok"]
                   else "**failed**")
        else:
            res = "refused: " + r.get("error", "?").replace("|", "/")[:140]
        facts.append((f"dom0 GPU buffer, {r['mode'][4:]} dumb buffer → PRIME → "
                      f"IMP_TO_REFS → PV domU maps, checks, writes back", res,
                      ms(results, "pv", "consumer-sees-picture", "check_ms",
                         mode=r["mode"])))
    for label, dom, test, key, *extra in (
            ("PVH +fix: EXP_FROM_REFS fd is a dma-buf", "pvh", "exp-from-refs-fd", "fd_target"),
            ("PVH +fix: mmap of that dma-buf", "pvh", "exp-dmabuf-mmap", "answer"),
            ("PVH +fix: EXP_WAIT_RELEASED while open", "pvh", "wait-released-while-open", "answer"),
            ("PVH +fix: EXP_WAIT_RELEASED across the last close", "pvh", "wait-released-after-last-close", "answer"),
            ("PVH +fix: EXP_WAIT_RELEASED afterwards", "pvh", "wait-released-again", "answer"),
            ("PVH +fix: consumer agent in dmabuf mode (receive, hand out, let go)", "pvh", "consumer-dmabuf-mode", None),
            ("PVH +fix: the dma-buf holds dom0's pages (read by an importing driver, lab/modules/dmabuf-peek.c)", "pvh", "exp-dmabuf-holds-dom0-pages", None),
            ("PVH +fix: the dma-buf's exporter (fdinfo exp_name)", "pvh", "exp-from-refs-fd", "exp_name"),
            ("PVH +fix: domU grants that dma-buf on to dom0 (IMP_TO_REFS), dom0 maps it", "pvh", "grant-back-regrant", "verdict"),
            ("PVH +fix: the project refuses to grant it on", "pvh", "regrant-refused-by-project", "observed"),
            ("PVH domU grants a udmabuf to dom0 (IMP_TO_REFS), dom0 maps it", "pvh", "grant-back-control", "verdict"),
            ("PV domU grants a udmabuf to dom0 (IMP_TO_REFS), dom0 maps it", "pv", "grant-back-control", "verdict"),
            ("PV domU maps a grant of its own (self-grant, as the probe)", "pv", "self-grant-cpu", "answer"),
            ("PVH domU maps a grant of its own (Debian stock gntdev)", "pvh-self", "self-grant-cpu", "answer"),
            ("oops lines in that PVH domU's kernel log", "dom0", "domu-kernel-clean", "oops", {"domu": "pvh-self"}),
            ("the probe in a PVH domU (+DMABUF): receive modes", "pvh-probe", "probe", "receive_modes", {"variant": "upstream"}),
            ("the probe in a PV domU (+DMABUF): provide modes", "pv", "probe", "provide_modes", {"variant": "upstream"}),
            ("contract suite (tests/test_grant_real.py) in dom0", "dom0", "contract-suite", "counts"),
            ("contract suite in the PV domU", "pv", "contract-suite", "counts")):
        fields = extra[0] if extra else {}
        rs = find(results, dom, test, **fields)
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
    why = "; ".join(f"{r['discarded']} "
                    f"{(r['oops'] or ['no oops: triple fault or hang'])[0][:60]}"
                    for r in discarded)
    facts.append(("domU boots discarded and booted again (kernel died under "
                  "emulation)", f"{len(discarded)} of {boots}"
                  + (f": {why}" if why else ""), ""))
    lines += ["", "| what | result | time |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in facts]
    env = (find(results, "dom0", "env") or [{}])[0]
    lines += ["", f"Xen {env.get('xen', '?')} ({versions.get('xen-hypervisor-4.17-amd64', '?')}), "
              f"Linux {env.get('kernel', '?')} ({versions.get('linux-image-' + env.get('kernel', ''), '?')}), "
              f"Python {env.get('python', '?')}, QEMU TCG `-cpu {env.get('qemu_cpu', '?')}`, "
              f"dom0 PV, domUs started with xl. Boot: {boot}. "
              "+DMABUF = Debian's gntdev source built with CONFIG_XEN_GNTDEV_DMABUF; "
              "+fix = that plus kernel/0001-*.patch; udmabuf built with a test-only patch "
              "(lab/modules/). Times are under software emulation."]
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
    unexpected, findings = [], []
    for r in results:
        if r["ok"] is False:
            why = known(r)
            (findings if why else unexpected).append(
                {"dom": r["dom"], "test": r["test"], **({"known": why} if why else {})})
    missing = [f"{d} {t} {f}" for d, t, f in REQUIRED
               if not any(r["ok"] for r in find(results, d, t, **f))]
    missing += [f"{d} {t} (any verdict)" for d, t in PRESENT
                if not find(results, d, t)]
    verdict = "pass" if done and not unexpected and not missing else "fail"
    record = {"verdict": verdict, "completed": done, "boot": boot_lines[:-1],
              "unexpected_failures": unexpected, "missing_required": missing,
              "known_findings": findings, "versions": versions,
              "discarded_boots": discarded, "results": everything}
    with open(os.path.join(OUT, "results.json"), "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    md = table(results, versions, boot, discarded)
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

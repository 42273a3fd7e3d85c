#!/usr/bin/env python3
"""Download the Debian packages the Xen lab is made of, and unpack them.

Everything in the lab comes from Debian's archive through apt: the
hypervisor, the kernel (image, headers, source), the Xen tools for dom0 and
Python 3.11 for both domains. Packages are fetched with `apt-get download`
into lab/cache/debs (kept between runs) and unpacked with `dpkg-deb -x`
into one tree per group under lab/out/root/<group>; nothing is installed on
the host.

    debs.py fetch        download what is missing, write lab/out/packages.txt
    debs.py unpack       unpack each group (after fetch)

Dependencies are followed (first alternative of each Depends/Pre-Depends)
except into packages a busybox initramfs does not need; STOP names them.
"""

import os
import re
import shutil
import subprocess
import sys

LAB = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(LAB, "cache", "debs")
OUT = os.path.join(LAB, "out")
ROOT = os.path.join(OUT, "root")

# The kernel's ABI name changes with Debian's point releases: follow the
# meta packages to whatever the mirror has today.
KERNEL_META = "linux-image-amd64"
HEADERS_META = "linux-headers-amd64"

# Each group is unpacked into its own tree; `deps` says whether to follow
# the dependencies.
GROUPS = {
    # xen.gz only (gunzipped it is a multiboot ELF QEMU boots directly)
    "xen": (["xen-hypervisor-4.17-amd64"], False),
    # the dom0 and domU kernel and Debian's stock modules
    "kernel": (["@" + KERNEL_META], False),
    # what `make -C .../build M=dir modules` needs (compiler comes from the host)
    "headers": (["@" + HEADERS_META, "linux-headers-@KVER@-common",
                 "linux-kbuild-6.1"], False),
    # only drivers/xen/gntdev*.c/h and drivers/dma-buf/udmabuf.c are used
    "source": (["linux-source-6.1"], False),
    # xl, xenstored, xenconsoled and their libraries, for dom0
    "xentools": (["xen-utils-4.17", "xenstore-utils", "libgcc-s1"], True),
    # the interpreter for the project's code in both domains
    "python": (["python3.11-minimal", "libpython3.11-stdlib",
                "libudev1"], True),     # libudev: pyudev finds devices
    # /bin/sh and the small tools of both initramfs images
    "busybox": (["busybox-static"], False),
}

# Dependencies a busybox initramfs does without: package machinery, init
# systems, udev, Python's full meta package (we run python3.11 directly),
# data packages Python does not need to start.
STOP = {
    "debconf", "perl-base", "dpkg", "init-system-helpers", "lsb-base",
    "sysvinit-utils", "udev", "ucf", "python3", "python3-minimal",
    "media-types", "mime-support", "tzdata", "readline-common",
    "libc-bin", "gcc-12-base", "xen-hypervisor-common", "debianutils",
    "iproute2", "bridge-utils", "usrmerge", "libpam-runtime",
}


def run(*cmd, **kw):
    return subprocess.run(cmd, check=True, text=True,
                          stdout=subprocess.PIPE, **kw).stdout


def depends(pkgs):
    """Direct dependencies of each of pkgs (first alternative, real
    packages), in one apt-cache run: each run costs most of a second."""
    out = run("apt-cache", "depends", "--no-recommends", "--no-suggests",
              "--no-conflicts", "--no-breaks", "--no-replaces",
              "--no-enhances", *pkgs)
    deps, cur, alt = {}, None, False
    for line in out.splitlines():
        if not line.startswith(" "):
            cur = deps.setdefault(line.strip(), [])
            alt = False
            continue
        m = re.match(r"\s*(\|)?(Pre)?Depends: (<)?([^>\s:]+)", line)
        if not m:
            continue
        if not alt and not m.group(3):
            cur.append(m.group(4))
        alt = bool(m.group(1))      # the next line is an alternative of this one
    return deps


def meta_target(meta):
    """linux-image-amd64 -> linux-image-6.1.0-NN-amd64."""
    return depends([meta])[meta][0]


def resolve():
    """{group: [package, ...]} with dependencies followed where asked."""
    kver = meta_target(KERNEL_META)[len("linux-image-"):]
    abi = kver.rsplit("-", 1)[0]
    groups = {}
    for group, (roots, follow) in GROUPS.items():
        level = [meta_target(r[1:]) if r.startswith("@")
                 else r.replace("@KVER@", abi) for r in roots]
        seen = []
        while level:
            level = [p for p in dict.fromkeys(level)
                     if p not in seen and p not in STOP]
            seen += level
            level = ([d for ds in depends(level).values() for d in ds]
                     if follow and level else [])
        groups[group] = seen
    return kver, groups


def candidates(pkgs):
    out = run("apt-cache", "policy", *pkgs)
    found = dict(re.findall(r"^(\S+):\n(?:  .*\n)*?  Candidate: (\S+)",
                            out, re.M))
    for p in pkgs:
        if found.get(p, "(none)") == "(none)":
            sys.exit(f"debs: {p}: not available from apt (run apt-get update)")
    return found


def ensure_package_lists():
    """A fresh machine may have no package lists yet: as root, fetch them
    once (a developer without root is told what to run)."""
    probe = subprocess.run(["apt-cache", "policy", KERNEL_META], text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if re.search(r"Candidate: (?!\(none\))", probe.stdout):
        return
    if os.geteuid() != 0:
        sys.exit("debs: no package lists: run apt-get update")
    print("debs: apt-get update", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)


def deb_path(pkg, version):
    # apt-get download names files pkg_version_arch.deb, epoch ':' as %3a
    v = version.replace(":", "%3a")
    for arch in ("amd64", "all"):
        p = os.path.join(CACHE, f"{pkg}_{v}_{arch}.deb")
        if os.path.exists(p):
            return p
    return None


def fetch():
    os.makedirs(CACHE, exist_ok=True)
    os.makedirs(OUT, exist_ok=True)
    ensure_package_lists()
    kver, groups = resolve()
    vers = candidates(sorted({p for ps in groups.values() for p in ps}))
    manifest, missing = [], []
    for group, pkgs in groups.items():
        for pkg in pkgs:
            ver = vers[pkg]
            if not deb_path(pkg, ver) and f"{pkg}={ver}" not in missing:
                missing.append(f"{pkg}={ver}")
            manifest.append(f"{group} {pkg} {ver}")
    if missing:
        print(f"debs: downloading {len(missing)} packages", flush=True)
        # one apt run for all; as root into a root-owned cache, so no sandbox
        subprocess.run(["timeout", "900", "apt-get", "download", "-q",
                        "-o", "APT::Sandbox::User=root", *missing],
                       cwd=CACHE, check=True)
    with open(os.path.join(OUT, "packages.txt"), "w") as f:
        f.write(f"kver {kver}\n" + "\n".join(manifest) + "\n")


def unpack():
    with open(os.path.join(OUT, "packages.txt")) as f:
        lines = f.read().split("\n")[1:]
    for group in GROUPS:
        dest = os.path.join(ROOT, group)
        shutil.rmtree(dest, ignore_errors=True)
        os.makedirs(dest)
        for line in lines:
            if line.startswith(group + " "):
                _, pkg, ver = line.split()
                run("dpkg-deb", "-x", deb_path(pkg, ver), dest)
    print(f"debs: unpacked into {ROOT}")


if __name__ == "__main__":
    {"fetch": fetch, "unpack": unpack}[sys.argv[1]]()

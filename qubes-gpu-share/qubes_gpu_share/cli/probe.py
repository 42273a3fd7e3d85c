"""``qubes-gpu-share probe``: what can cross to another qube from here."""

from __future__ import annotations

import argparse
import json
import sys

NAME = "probe"
SUMMARY = "report which buffers this qube can grant and receive, and why"

DESCRIPTION = """\
Find out, by trying, which buffers can cross from this qube to another one
through the Xen grant device, and which cannot and why.

The probe opens /dev/xen/gntdev, grants one page to its own domain with
gntalloc, maps it back with MAP_GRANT_REF and checks the bytes ('cpu'
receive mode), turns the same grant into a dma-buf with
IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS ('dmabuf' receive mode; ENOTTY means the
kernel lacks CONFIG_XEN_GNTDEV_DMABUF, EINVAL is the PV or x86 device-map
refusal), and allocates one page from every buffer source it finds
(udmabuf, each dma-heap, each DRM card node) and grants it with
IOCTL_GNTDEV_DMABUF_IMP_TO_REFS. Nothing is granted to another domain and
everything is released before it exits. Outside Xen it says so."""

EPILOG = """\
exit status:
  0 the probe ran (the answers are in the report, whatever they are);
  1 the probe itself failed

files:
  /dev/xen/gntdev, /dev/xen/gntalloc  the grant devices
  /sys/hypervisor/type, /sys/hypervisor/guest_type  hypervisor, PV/PVH/HVM
  /dev/udmabuf, /dev/dma_heap/*, /dev/dri/card*  buffer sources

examples:
  qubes-gpu-share probe
  qubes-gpu-share probe --json | jq -r .receive_modes[]

The JSON schema is described in docs/probe.md (key "schema" is its version)."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", action="store_true",
        help="print the report as one JSON object for scripts, instead of "
             "tables for people")


def run(args: argparse.Namespace) -> int:
    from .. import probe
    report = probe.probe_this_domain()
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(probe.render_text(report))
    return 0

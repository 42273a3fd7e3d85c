"""What can cross to another qube from here, found by trying.

The question this project exists for: does XEN_GNTDEV_DMABUF already cover
cross-domain buffer sharing in this qube? The answer depends on the kernel
(CONFIG_XEN_GNTDEV_DMABUF, the x86 device-map refusal), the guest type and
the buffer sources present, so the probe does not guess: it grants one page
to its own domain with gntalloc, maps it back for the CPU and checks the
bytes, turns it into a dma-buf with EXP_FROM_REFS, and grants one page of
every buffer source with IMP_TO_REFS, reporting each answer with its reason.

:func:`probe` takes any :class:`~.grant.device.GrantDevice`, so it runs
against the simulator in tests; :func:`probe_this_domain` runs it against
the real device. The report renders as a table (:func:`render_text`) or as
JSON (:meth:`Report.to_json`, schema in docs/probe.md).

A kernel with the project's gntdev series (kernel/) is recognised by what
it does, never by a version: a received dma-buf that maps for the CPU
(receive-dmabuf-mmap, where receiving is tried), a grant whose end says how
many pages a peer still maps (release-query: a granted page ended at once
answers 0, not "cannot tell"), and, in a PV domain, IMP_TO_REFS granting
the buffer's own frames (the source checks: the grant is mapped back).
"""

from __future__ import annotations

import dataclasses
import enum
import os
import platform
from collections.abc import Callable, Sequence

from . import alloc, devices
from .alloc.base import AllocationError, Allocator
from .formats import PAGE_SIZE
from .grant import this_domain
from .grant.device import GrantDevice
from .grant.domid import own_domid
from .grant.errors import DmabufNotSupported, GrantError, NoGrantDevice

#: Bumped on any incompatible change of :meth:`Report.to_json`.
SCHEMA_VERSION = 1
PATTERN = b"qubes-gpu-share probe\n"


class Status(str, enum.Enum):
    YES = "yes"
    NO = "no"
    UNTESTED = "untested"


class SourceStatus(str, enum.Enum):
    GRANTABLE = "grantable"
    NOT_GRANTABLE = "not-grantable"
    UNAVAILABLE = "unavailable"
    UNTESTED = "untested"


@dataclasses.dataclass(frozen=True)
class Check:
    id: str
    question: str
    status: Status
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class SourceCheck:
    name: str
    status: SourceStatus
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class Domain:
    """This domain as Linux sees it (None: not known, e.g. not in Xen)."""

    hypervisor: str | None
    guest_type: str | None
    domid: int | None
    machine: str


@dataclasses.dataclass(frozen=True)
class Report:
    domain: Domain
    checks: tuple[Check, ...]
    sources: tuple[SourceCheck, ...]
    #: xen-gntalloc's page limit in this domain, None when unknown
    gntalloc_limit: int | None = None

    def check(self, check_id: str) -> Check:
        return next(c for c in self.checks if c.id == check_id)

    @property
    def receive_modes(self) -> list[str]:
        return [mode for mode, cid in (("dmabuf", "receive-dmabuf"),
                                       ("cpu", "receive-cpu"))
                if self.check(cid).status is Status.YES]

    @property
    def provide_modes(self) -> list[str]:
        modes = []
        if any(s.status is SourceStatus.GRANTABLE for s in self.sources):
            modes.append("dmabuf")
        if self.check("provide-gntalloc").status is Status.YES:
            modes.append("gntalloc")
        return modes

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA_VERSION,
            "domain": dataclasses.asdict(self.domain),
            "gntalloc_limit": self.gntalloc_limit,
            "checks": [{"id": c.id, "question": c.question,
                        "status": c.status.value, "detail": c.detail}
                       for c in self.checks],
            "sources": [{"name": s.name, "status": s.status.value,
                         "detail": s.detail} for s in self.sources],
            "receive_modes": self.receive_modes,
            "provide_modes": self.provide_modes,
        }


# --- the checks --------------------------------------------------------------

QUESTIONS = {
    "grant-device": "grant device (/dev/xen/gntdev) present",
    "provide-gntalloc": "can grant fresh pages (gntalloc)",
    "receive-cpu": "can receive by CPU mapping (MAP_GRANT_REF + mmap)",
    "dmabuf-ioctls": "DMABUF ioctls supported (CONFIG_XEN_GNTDEV_DMABUF)",
    "receive-dmabuf": "can receive dma-bufs (EXP_FROM_REFS)",
    "receive-dmabuf-mmap": "a received dma-buf maps for the CPU (mmap)",
    "release-query": "ending a grant says which pages a peer still maps "
                     "(IMP_TRY_RELEASE)",
}


def _check(check_id: str, status: Status, detail: str = "") -> Check:
    return Check(check_id, QUESTIONS[check_id], status, detail)


def _untested(why: str) -> dict[str, Check]:
    return {cid: _check(cid, Status.UNTESTED, why)
            for cid in QUESTIONS if cid != "grant-device"}


def _receive_cpu(device: GrantDevice, domid: int,
                 refs: Sequence[int]) -> Check:
    """Map our own grant and read back what the granting side wrote."""
    try:
        with device.map_grant(domid, refs) as mapping, \
                mapping.mmap(writable=False) as view:
            seen = bytes(view[:len(PATTERN)])
    except (GrantError, OSError) as exc:
        return _check("receive-cpu", Status.NO, str(exc))
    if seen != PATTERN:
        return _check("receive-cpu", Status.NO,
                      "mapped the grant but read other bytes than written")
    return _check("receive-cpu", Status.YES, "read back the granted page")


def _receive_dmabuf(device: GrantDevice, domid: int,
                    refs: Sequence[int]) -> tuple[Check, Check, Check]:
    """EXP_FROM_REFS on our own grant: whether we can receive dma-bufs,
    whether what we receive maps for the CPU, and, from the same answer,
    whether the DMABUF ioctls exist at all (only ENOTTY says they do
    not)."""
    try:
        imported = device.import_dmabuf(domid, refs)
    except DmabufNotSupported as exc:
        return (_check("receive-dmabuf", Status.NO, str(exc)),
                _check("receive-dmabuf-mmap", Status.NO, str(exc)),
                _check("dmabuf-ioctls", Status.NO, str(exc)))
    except GrantError as exc:
        # the self-grant is valid, so EINVAL here is the kernel's refusal
        return (_check("receive-dmabuf", Status.NO, str(exc)),
                _check("receive-dmabuf-mmap", Status.NO,
                       "no dma-buf is received here"),
                _check("dmabuf-ioctls", Status.YES,
                       f"EXP_FROM_REFS answered errno {exc.errno}, "
                       f"not ENOTTY"))
    with imported:
        mappable = imported.cpu_mappable()
        imported.release(timeout_ms=1000)
    return (_check("receive-dmabuf", Status.YES,
                   "EXP_FROM_REFS gave a dma-buf of a granted page"),
            _check("receive-dmabuf-mmap",
                   Status.YES if mappable else Status.NO,
                   "mmap of the received dma-buf worked" if mappable else
                   "mmap of the received dma-buf failed: this kernel's "
                   "gntdev exporter has no mmap (a GPU driver can still "
                   "import it)"),
            _check("dmabuf-ioctls", Status.YES, "EXP_FROM_REFS works"))


#: Guest types whose kernel must not map a grant of its own domain: in the
#: project's Xen lab a PVH domU that did (MAP_GRANT_REF + mmap of its own
#: gntalloc page, Debian's unmodified 6.1 gntdev) read 0xff pages and later
#: oopsed; the same is harmless in PV (lab/README.md, findings).
NO_SELF_MAP = frozenset({"PVH", "HVM"})

SELF_MAP_UNSAFE = ("not tried: mapping a grant of its own corrupts a PVH/HVM "
                   "kernel (measured in the project's Xen lab)")


def _self_grant_checks(device: GrantDevice, domid: int,
                       self_map_safe: bool = True) -> dict[str, Check]:
    """gntalloc one page to ourselves, then receive it both ways (only
    where mapping our own grant is safe: see NO_SELF_MAP)."""
    try:
        grant = device.grant_new_pages(1, domid)
    except GrantError as exc:
        return {**_untested(f"no self-grant to receive: {exc}"),
                "provide-gntalloc": _check("provide-gntalloc", Status.NO,
                                           str(exc))}
    with grant:
        with grant.view().mmap() as view:
            view[:len(PATTERN)] = PATTERN
        found = {
            "provide-gntalloc": _check("provide-gntalloc", Status.YES,
                                       f"granted one page to domain {domid}"),
        }
        if not self_map_safe:
            return {**found, **_without_self_map(device, domid)}
        found["receive-cpu"] = _receive_cpu(device, domid, grant.refs)
        (found["receive-dmabuf"], found["receive-dmabuf-mmap"],
         found["dmabuf-ioctls"]) = _receive_dmabuf(device, domid, grant.refs)
    return found


def _without_self_map(device: GrantDevice, domid: int) -> dict[str, Check]:
    """PVH/HVM: nothing of our own is mapped. CPU receive of another
    domain's grant works in every guest type (lab); whether the DMABUF
    ioctls exist shows from EXP_FROM_REFS of ref 0, which is never granted
    to us (Xen refuses it before mapping anything): ENOTTY means absent."""
    ioctls = _receive_dmabuf(device, domid, [0])[2]
    unknown = ioctls.status is Status.YES
    why = SELF_MAP_UNSAFE + ("; the agent finds out with the first dmabuf "
                             "lease" if unknown else "")
    return {
        "receive-cpu": _check("receive-cpu", Status.YES,
                              SELF_MAP_UNSAFE + "; mapping another qube's "
                              "grant works in every guest type (lab)"),
        "receive-dmabuf": _check(
            "receive-dmabuf", Status.UNTESTED if unknown else Status.NO,
            why if unknown else ioctls.detail),
        "receive-dmabuf-mmap": _check(
            "receive-dmabuf-mmap", Status.UNTESTED if unknown else Status.NO,
            why if unknown else ioctls.detail),
        "dmabuf-ioctls": ioctls,
    }


def _source_check(source: Allocator, device: GrantDevice | None,
                  domid: int | None, why_untested: str,
                  ended: list[int | None]) -> SourceCheck:
    """Allocate one page from ``source``, grant it to ourselves, end the
    grant (nothing maps it: try_end says 0 where the kernel can tell, and
    None where it cannot; appended to ``ended``)."""
    found = source.availability()
    if not found.ok:
        return SourceCheck(source.name, SourceStatus.UNAVAILABLE, found.reason)
    if device is None or domid is None:
        return SourceCheck(source.name, SourceStatus.UNTESTED, why_untested)
    try:
        with source.allocate(PAGE_SIZE) as buf, \
                device.grant_dmabuf(buf.fd, buf.pages, domid) as grant:
            ended.append(grant.try_end())
    except (AllocationError, OSError) as exc:
        return SourceCheck(source.name, SourceStatus.UNAVAILABLE,
                           f"allocation failed: {exc}")
    except GrantError as exc:
        return SourceCheck(source.name, SourceStatus.NOT_GRANTABLE, str(exc))
    detail = "IMP_TO_REFS granted a page of it"
    if found.reason:
        detail += f" ({found.reason})"
    return SourceCheck(source.name, SourceStatus.GRANTABLE, detail)


def _release_query(ended: list[int | None], why_untested: str) -> Check:
    """From the source checks' ends: whether ending a grant reports."""
    if not ended:
        return _check("release-query", Status.UNTESTED,
                      why_untested or "no dma-buf source granted a page to "
                      "try it with (gntalloc pages never report)")
    if all(held == 0 for held in ended):
        return _check("release-query", Status.YES,
                      "IMP_TRY_RELEASE ended a granted page and said none "
                      "was still mapped")
    return _check("release-query", Status.NO,
                  "this kernel cannot say which grants a peer still maps "
                  "(no IMP_TRY_RELEASE): a grant ended while mapped is "
                  "deferred by the kernel, unseen")


def probe(device: GrantDevice | None, domain: Domain,
          sources: Sequence[Allocator], why_no_device: str = "",
          why_no_domid: str = "",
          gntalloc_limit: int | None = None) -> Report:
    """Run every check. ``device`` None means there is no grant device (say
    why in ``why_no_device``); ``domain.domid`` None means this domain's id
    is unknown (``why_no_domid``), so nothing can be granted to ourselves.
    ``gntalloc_limit`` is reported as given (read from /sys by
    :func:`probe_this_domain`)."""
    if device is None:
        checks = {"grant-device": _check("grant-device", Status.NO,
                                         why_no_device),
                  **_untested("no grant device")}
        why_untested = "no grant device"
    elif domain.domid is None:
        checks = {"grant-device": _check("grant-device", Status.YES),
                  **_untested(why_no_domid or "this domain's id is unknown")}
        why_untested = checks["receive-cpu"].detail
    else:
        checks = {"grant-device": _check("grant-device", Status.YES),
                  **_self_grant_checks(
                      device, domain.domid,
                      self_map_safe=domain.guest_type not in NO_SELF_MAP)}
        why_untested = ""
    ended: list[int | None] = []
    source_checks = tuple(_source_check(s, device, domain.domid,
                                        why_untested, ended)
                          for s in sources)
    checks["release-query"] = _release_query(ended, why_untested)
    return Report(
        domain=domain,
        checks=tuple(checks[cid] for cid in QUESTIONS),
        sources=source_checks, gntalloc_limit=gntalloc_limit)


# --- this domain, for real ---------------------------------------------------

def _read_sys(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read(64).strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def read_domain(sys_root: str = "/sys", domid: int | None = None) -> Domain:
    return Domain(hypervisor=_read_sys(f"{sys_root}/hypervisor/type"),
                  guest_type=_read_sys(f"{sys_root}/hypervisor/guest_type"),
                  domid=domid, machine=platform.machine())


def _open_real() -> tuple[GrantDevice | None, int | None, str]:
    """The real grant device and our domid, or None and the reason."""
    if not os.path.exists("/sys/hypervisor/type") and \
            not os.path.exists("/dev/xen/gntdev"):
        return None, None, ("not a Xen domain: no /sys/hypervisor/type and "
                            "no /dev/xen/gntdev")
    try:
        from .grant.gntdev import GntdevDevice
    except ImportError as exc:
        return None, None, f"the native helper is not built ({exc}); run make"
    try:
        device = GntdevDevice()
    except NoGrantDevice as exc:
        return None, None, str(exc)
    try:
        return device, own_domid(), ""
    except NoGrantDevice as exc:
        return device, None, str(exc)


def probe_this_domain(
        open_device: Callable[[], tuple[GrantDevice | None, int | None, str]]
        = _open_real) -> Report:
    """Probe the domain this process runs in, with the real grant device."""
    device, domid, why = open_device()
    sources = alloc.real_sources(devices.scan())
    domain = read_domain(domid=domid)
    limit = this_domain.gntalloc_limit()
    if device is None:
        return probe(None, domain, sources, why_no_device=why,
                     gntalloc_limit=limit)
    with device:
        return probe(device, domain, sources, why_no_domid=why,
                     gntalloc_limit=limit)


# --- rendering ---------------------------------------------------------------

def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in (header, *rows))
              for i in range(len(header) - 1)]
    return ["  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]])
            .rstrip() for r in (header, *rows)]


def render_text(report: Report) -> str:
    """The report for people: this domain, the checks, the sources."""
    d = report.domain
    lines = [f"hypervisor: {d.hypervisor or 'none (not a Xen domain)'}",
             f"guest type: {d.guest_type or 'unknown'}",
             f"domain id:  {'unknown' if d.domid is None else d.domid}",
             f"machine:    {d.machine}", ""]
    lines += _table(("CHECK", "RESULT", "DETAIL"),
                    [(c.question, c.status.value, c.detail)
                     for c in report.checks])
    lines.append("")
    lines += _table(("BUFFER SOURCE", "RESULT", "DETAIL"),
                    [(s.name, s.status.value, s.detail)
                     for s in report.sources])
    limit = report.gntalloc_limit
    lines += ["", "gntalloc limit: " + (
        "unknown (xen-gntalloc not loaded)" if limit is None else
        f"{limit} pages at once (raise it: echo N > "
        f"/sys/module/{this_domain.GNTALLOC_LIMIT_PARAM})")]
    lines += ["", "receive modes: " + (", ".join(report.receive_modes)
                                       or "none"),
              "provide modes: " + (", ".join(report.provide_modes)
                                   or "none")]
    return "\n".join(lines) + "\n"

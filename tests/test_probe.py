"""The capability probe: for real through the CLI on this machine, and its
decisions against a grant device that answers as each kind of kernel does."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from qubes_gpu_share import probe
from qubes_gpu_share.alloc import MemfdAllocator
from qubes_gpu_share.alloc.base import Allocation, Allocator, Availability
from qubes_gpu_share.formats import PAGE_SIZE
from qubes_gpu_share.grant import device as gd
from qubes_gpu_share.grant.errors import (
    DmabufNotSupported, DmabufReceiveRefused, NotGrantable)

CHECK_IDS = ["grant-device", "provide-gntalloc", "receive-cpu",
             "dmabuf-ioctls", "receive-dmabuf", "receive-dmabuf-mmap",
             "release-query"]
IN_XEN = os.path.exists("/dev/xen/gntdev")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c",
         "import sys; from qubes_gpu_share.cli.main import main; "
         "sys.exit(main())", "probe", *args],
        capture_output=True, text=True, timeout=60, check=False)


# --- for real, through the command ------------------------------------------

@pytest.mark.skipif(IN_XEN, reason="this machine has a grant device")
def test_cli_text_says_this_is_not_xen():
    result = run_cli()
    assert result.returncode == 0, result.stderr
    assert "hypervisor: none (not a Xen domain)" in result.stdout
    for question in probe.QUESTIONS.values():
        assert question in result.stdout
    assert "receive modes: none" in result.stdout
    assert "udmabuf" in result.stdout and result.stderr == ""


def test_cli_json_follows_the_schema():
    result = run_cli("--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"schema", "domain", "checks", "sources",
                           "receive_modes", "provide_modes",
                           "gntalloc_limit"}
    assert report["schema"] == probe.SCHEMA_VERSION
    assert set(report["domain"]) == {"hypervisor", "guest_type", "domid",
                                     "machine"}
    assert [c["id"] for c in report["checks"]] == CHECK_IDS
    assert {c["status"] for c in report["checks"]} <= {"yes", "no",
                                                       "untested"}
    assert {s["status"] for s in report["sources"]} <= {
        "grantable", "not-grantable", "unavailable", "untested"}
    assert report["sources"][0]["name"] == "udmabuf"
    if not IN_XEN:
        assert report["checks"][0]["status"] == "no"
        assert "not a Xen domain" in report["checks"][0]["detail"]
        assert report["receive_modes"] == report["provide_modes"] == []


def test_cli_help_lists_probe():
    result = subprocess.run(
        [sys.executable, "-m", "qubes_gpu_share.cli.main", "--help"],
        capture_output=True, text=True, timeout=60, check=True)
    assert "probe" in result.stdout and "exit status" in result.stdout


# --- decisions, against a grant device with chosen answers --------------------

class _Grant(gd.AllocatedGrant):
    def __init__(self, fd: int, domid: int, query: bool = False):
        self.fd, self.domid, self.refs = fd, domid, (8,)
        self._revoked = False
        self._query = query

    def revoke(self) -> None:
        self._revoked = True
        os.close(self.fd)

    def try_end(self):
        """A kernel with IMP_TRY_RELEASE (``query``) says 0 pages held."""
        self.revoke()
        return 0 if self._query else None

    def view(self) -> gd.CpuView:
        return gd.CpuView(self.fd, 0, PAGE_SIZE)


class _ForeignMapping(gd.ForeignMapping):
    def __init__(self, fd: int, domid: int, refs):
        self.fd, self.domid, self.refs = fd, domid, tuple(refs)

    def view(self) -> gd.CpuView:
        return gd.CpuView(self.fd, 0, self.length)

    def close(self) -> None:
        os.close(self.fd)


class _Import(gd.ImportedDmabuf):
    def __init__(self, mappable: bool = False):
        self.fd, self.released = -1, False
        self.mappable = mappable

    def cpu_mappable(self) -> bool:
        return self.mappable

    def release(self, timeout_ms: int) -> None:
        self.released = True

    def close(self) -> None:
        pass


class AnsweringDevice(gd.GrantDevice):
    """Grants one memfd page per call; answers EXP_FROM_REFS and
    IMP_TO_REFS with the exception it was given (None: success)."""

    def __init__(self, receive_error=None, grant_error=None, fixed=False):
        self.receive_error, self.grant_error = receive_error, grant_error
        #: a kernel with the project's series: dma-bufs map, ends report
        self.fixed = fixed
        self.pages: dict[int, int] = {}
        #: maps of our own grants the probe made
        self.self_maps: list = []

    def grant_new_pages(self, pages, to_domid):
        grant = _Grant(MemfdAllocator().allocate(PAGE_SIZE * pages).fd,
                       to_domid)
        self.pages[grant.refs[0]] = grant.fd
        return grant

    def map_grant(self, from_domid, refs, writable=True):
        self.self_maps.append(("map", list(refs)))
        return _ForeignMapping(os.dup(self.pages[refs[0]]), from_domid, refs)

    def import_dmabuf(self, from_domid, refs):
        if list(refs) != [0]:  # ref 0 is never granted to us: maps nothing
            self.self_maps.append(("import", list(refs)))
        if self.receive_error:
            raise self.receive_error
        return _Import(self.fixed)

    def grant_dmabuf(self, dmabuf_fd, pages, to_domid):
        if self.grant_error:
            raise self.grant_error
        return _Grant(os.dup(dmabuf_fd), to_domid, self.fixed)

    def close(self):
        pass


class Missing(Allocator):
    name = "dma-heap:system"

    def availability(self):
        return Availability(False, "/dev/dma_heap/system is missing")

    def allocate(self, size) -> Allocation:
        raise AssertionError("must not be called when unavailable")


#: PV: the guest type where the probe maps its own grant (see PVH below)
DOMAIN = probe.Domain("xen", "PV", 5, "x86_64")


def statuses(report: probe.Report) -> dict[str, str]:
    return {c.id: c.status.value for c in report.checks}


def test_working_kernel_receives_both_ways():
    report = probe.probe(AnsweringDevice(fixed=True), DOMAIN,
                         [MemfdAllocator(), Missing()], gntalloc_limit=1024)
    assert set(statuses(report).values()) == {"yes"}
    assert report.receive_modes == ["dmabuf", "cpu"]
    assert report.provide_modes == ["dmabuf", "gntalloc"]
    assert [s.status.value for s in report.sources] == ["grantable",
                                                         "unavailable"]
    assert report.to_json()["gntalloc_limit"] == 1024
    assert "gntalloc limit: 1024 pages" in probe.render_text(report)
    assert "xen_gntalloc/parameters/limit" in probe.render_text(report)


def test_a_kernel_without_the_series_is_told_by_what_it_does():
    """Same answers but no mmap of the received dma-buf and no report of
    held pages: each is said, by trying, not by a version."""
    report = probe.probe(AnsweringDevice(), DOMAIN, [MemfdAllocator()])
    assert statuses(report)["receive-dmabuf"] == "yes"
    assert statuses(report)["receive-dmabuf-mmap"] == "no"
    assert "no mmap" in report.check("receive-dmabuf-mmap").detail
    assert statuses(report)["release-query"] == "no"
    assert "deferred" in report.check("release-query").detail


@pytest.mark.parametrize("guest_type", ["PVH", "HVM"])
def test_pvh_and_hvm_never_map_their_own_grant(guest_type):
    """The lab saw a PVH kernel corrupted by mapping its own grant: the
    probe only grants there, and learns about the DMABUF ioctls from
    EXP_FROM_REFS of ref 0, which Xen refuses before mapping anything."""
    device = AnsweringDevice(DmabufReceiveRefused("ref 0 is not ours"))
    domain = probe.Domain("xen", guest_type, 5, "x86_64")
    report = probe.probe(device, domain, [MemfdAllocator()])
    assert device.self_maps == []
    assert statuses(report) == {"grant-device": "yes",
                                "provide-gntalloc": "yes",
                                "receive-cpu": "yes", "dmabuf-ioctls": "yes",
                                "receive-dmabuf": "untested",
                                "receive-dmabuf-mmap": "untested",
                                "release-query": "no"}
    assert "corrupts a PVH/HVM kernel" in report.check("receive-cpu").detail
    assert report.receive_modes == ["cpu"]
    enotty = DmabufNotSupported("kernel lacks CONFIG_XEN_GNTDEV_DMABUF")
    report = probe.probe(AnsweringDevice(enotty), domain, [MemfdAllocator()])
    assert statuses(report)["dmabuf-ioctls"] == "no"
    assert statuses(report)["receive-dmabuf"] == "no"


def test_kernel_without_dmabuf_ioctls_says_so():
    enotty = DmabufNotSupported("kernel lacks CONFIG_XEN_GNTDEV_DMABUF")
    report = probe.probe(AnsweringDevice(enotty, enotty), DOMAIN,
                         [MemfdAllocator()])
    assert statuses(report) == {"grant-device": "yes",
                                "provide-gntalloc": "yes",
                                "receive-cpu": "yes", "dmabuf-ioctls": "no",
                                "receive-dmabuf": "no",
                                "receive-dmabuf-mmap": "no",
                                "release-query": "untested"}
    assert "CONFIG_XEN_GNTDEV_DMABUF" in report.check("dmabuf-ioctls").detail
    assert report.sources[0].status is probe.SourceStatus.NOT_GRANTABLE
    assert report.provide_modes == ["gntalloc"]


def test_x86_refusal_keeps_cpu_mode_and_the_reason():
    refusal = DmabufReceiveRefused("PV qube: use cpu mode")
    report = probe.probe(AnsweringDevice(refusal,
                                         NotGrantable("VRAM")), DOMAIN,
                         [MemfdAllocator()])
    assert report.receive_modes == ["cpu"]
    assert report.check("dmabuf-ioctls").status is probe.Status.YES
    assert report.check("receive-dmabuf").detail == "PV qube: use cpu mode"
    assert report.sources[0].detail == "VRAM"


def test_unknown_domid_leaves_everything_untested():
    domain = probe.Domain("xen", "PV", None, "x86_64")
    report = probe.probe(AnsweringDevice(), domain, [MemfdAllocator()],
                         why_no_domid="xenstore-read failed")
    assert statuses(report)["grant-device"] == "yes"
    assert {c.status for c in report.checks[1:]} == {probe.Status.UNTESTED}
    assert report.sources[0].detail == "xenstore-read failed"


def test_text_table_has_one_row_per_check_and_source():
    report = probe.probe(None, probe.read_domain("/nonexistent"),
                         [Missing()], why_no_device="no gntdev here")
    text = probe.render_text(report)
    assert "no gntdev here" in text
    for question in probe.QUESTIONS.values():
        assert text.count(question) == 1
    assert "dma-heap:system  unavailable" in text
    assert json.loads(json.dumps(report.to_json()))["domain"]["domid"] is None


# --- against the grant simulator, per kind of kernel --------------------------

@pytest.fixture(scope="module")
def sim_socket(tmp_path_factory):
    sim = pytest.importorskip("qubes_gpu_share.grant.sim")
    path = str(tmp_path_factory.mktemp("sim") / "hv.sock")
    with sim.hypervisor(path):
        yield path


@pytest.mark.parametrize("domid, traits, receive, ioctls, source, query", [
    (7, "pvh", ["cpu"], "yes", "grantable", "no"),
    # PVH: the probe does not map its own grant, so the fix stays untested
    (8, "pvh,fix", ["cpu"], "yes", "grantable", "no"),
    (9, "pvh,nodmabuf", ["cpu"], "no", "not-grantable", "untested"),
    (10, "pv,fix", ["cpu"], "yes", "not-grantable", "untested"),  # see below
    (11, "pv,swiotlb", ["cpu"], "yes", "grantable", "no"),  # dom0's kind
    # the project's kernel series: PV grants its own frames, ends report
    (13, "pv,fixed", ["cpu"], "yes", "grantable", "yes"),
    (14, "pvh,fixed", ["cpu"], "yes", "grantable", "yes"),
    (15, "pv,swiotlb,fixed", ["cpu"], "yes", "grantable", "yes"),
])
def test_probe_against_the_simulator(sim_socket, domid, traits, receive,
                                     ioctls, source, query):
    """Each simulated domain (one domid per kind: the simulator keeps a
    domain's traits) grants a page to itself and, in PV, receives it."""
    report = _probe_simulated(sim_socket, domid, traits)
    assert report.receive_modes == receive
    assert report.check("dmabuf-ioctls").status.value == ioctls
    assert report.check("provide-gntalloc").status is probe.Status.YES
    assert report.sources[0].status.value == source
    assert report.check("release-query").status.value == query


def test_receive_with_the_series_maps_for_the_cpu(sim_socket):
    """Where the probe may receive its own grant (not PVH/HVM) and the
    kernel could receive (simulated: an HVM-like kind run as guest type
    PV), mmap of the received dma-buf is tried."""
    from qubes_gpu_share.grant.expected import DomainKind, Kernel, VirtMode
    from qubes_gpu_share.grant.sim import SimGrantDevice
    domain = probe.Domain("xen", "PV", 16, "x86_64")
    for domid, kernel, mmap in ((16, Kernel.FIXED, "yes"),
                                (17, Kernel.DMABUF, "no")):
        kind = dataclasses.replace(DomainKind.of(VirtMode.PVH, kernel),
                                   receive_fix=True)
        with SimGrantDevice(sim_socket, domid, kind) as device:
            report = probe.probe(device, dataclasses.replace(
                domain, domid=domid), [MemfdAllocator()])
        assert report.receive_modes == ["dmabuf", "cpu"]
        assert report.check("receive-dmabuf-mmap").status.value == mmap


def test_pv_domu_without_swiotlb_xen_grants_no_dma_buf(sim_socket):
    """IMP_TO_REFS would grant wrong frames there (it reads DMA addresses
    as machine frames): every source is not-grantable, with that reason,
    and the qube still provides gntalloc pages."""
    from qubes_gpu_share.grant.expected import GRANT_REFUSED_PV_DMA
    report = _probe_simulated(sim_socket, 12, "pv")
    assert [(s.status, s.detail) for s in report.sources] == [
        (probe.SourceStatus.NOT_GRANTABLE, GRANT_REFUSED_PV_DMA.reason)]
    assert report.provide_modes == ["gntalloc"]
    assert report.receive_modes == ["cpu"]
    assert "swiotlb-xen" in probe.render_text(report)


def _probe_simulated(socket_path: str, domid: int,
                     traits: str) -> probe.Report:
    from qubes_gpu_share.grant.open import parse_traits
    from qubes_gpu_share.grant.sim import SimGrantDevice
    kind = parse_traits(traits)
    domain = probe.Domain("xen", kind.virt_mode.value.upper(), domid,
                          "x86_64")
    with SimGrantDevice(socket_path, domid, kind) as device:
        return probe.probe(device, domain, [MemfdAllocator()])

"""Packaging: `make install-dom0` / `install-vm` put every file in its place,
the installed tree runs, the units verify, and `make rpm` / `make deb` build
packages holding exactly the expected files (docs/packaging.md).

Where a test runs a program of another part (qvm-gpu-share's --help), it is
skipped while that module does not exist yet; nothing else is.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent
SRC = TOP / "qubes-gpu-share"
SITE = "/usr/lib/python3/site-packages"   # any PYTHON_SITEARCH will do

BROKER_SOCK = "/run/qubes-gpu-share/broker.sock"
AGENT_SOCK = "/run/qubes-gpu-share/agent.sock"
DOM0_SERVICES = ("qubes.GpuLease", "qubes.GpuOffer", "qubes.GpuRelease",
                 "qubes.GpuLeases")
VM_SERVICES = ("qubes.GpuExport", "qubes.GpuDeliver", "qubes.GpuRevoke")


def expected_files(side: str, *, site: str, unitdir: str, presetdir: str,
                   udevdir: str) -> set[str]:
    """Every file and symlink a package or an install of `side` holds,
    the Python package counted as its top-level files only."""
    common = {
        "/usr/bin/qubes-gpu-share", "/usr/bin/qubes-gpu-share-agent",
        f"{site}/qubes_gpu_share/__init__.py",
        f"{site}/qubes_gpu_share/_native.abi3.so",
        "/usr/lib/sysusers.d/qubes-gpu-share.conf",
        f"{presetdir}/70-qubes-gpu-share.preset",
        "/usr/share/man/man1/qubes-gpu-share.1",
    }
    if side == "dom0":
        return common | {
            "/usr/bin/qubes-gpu-share-broker", "/usr/bin/qvm-gpu-share",
            f"{unitdir}/qubes-gpu-share-broker.service",
            f"{unitdir}/qubes-gpu-share-dom0-agent.service",
            "/etc/qubes/policy.d/30-user-gpu-share.policy",
            "/etc/qubes/policy.d/60-gpu-share.policy",
            "/usr/share/man/man1/qvm-gpu-share.1",
        } | {f"/etc/qubes-rpc/{name}" for name in DOM0_SERVICES}
    return common | {
        f"{unitdir}/qubes-gpu-share-agent.service",
        f"{udevdir}/90-qubes-gpu-share.rules",
        "/etc/qubes/post-install.d/50-qubes-gpu-share.sh",
    } | {f"/etc/qubes-rpc/{name}" for name in VM_SERVICES}


FEDORA_PATHS = dict(unitdir="/usr/lib/systemd/system",
                    presetdir="/usr/lib/systemd/system-preset",
                    udevdir="/usr/lib/udev/rules.d")
DEBIAN_PATHS = dict(unitdir="/lib/systemd/system",
                    presetdir="/lib/systemd/system-preset",
                    udevdir="/lib/udev/rules.d")


def top_level(paths: set[str], site: str) -> set[str]:
    """The paths a package holds, without what expected_files leaves out:
    folders, the package's modules below its top (and byte-code), egg-info,
    docs; compressed man pages counted as their page."""
    kept = set()
    for path in paths:
        path = path.removeprefix(".").removesuffix(".gz")
        inside = path.removeprefix(f"{site}/qubes_gpu_share/")
        if path.startswith(("/usr/share/doc/", "/usr/share/licenses/")) \
                or ".egg-info" in path:
            continue
        if inside != path and inside not in ("__init__.py",
                                             "_native.abi3.so"):
            continue
        kept.add(path)
    return kept


def run(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, **kwargs)


# --- fast: the one version --------------------------------------------------

def test_version_file_python_package_and_debian_changelog_agree():
    version = (TOP / "version").read_text().strip()
    init = (SRC / "qubes_gpu_share" / "__init__.py").read_text()
    assert f'__version__ = "{version}"' in init
    changelog = (TOP / "debian" / "changelog").read_text().split("\n")[0]
    assert re.match(rf"qubes-gpu-share \({re.escape(version)}-\d+\) ",
                    changelog), changelog
    spec = (TOP / "rpm_spec" / "qubes-gpu-share.spec.in").read_text()
    assert re.search(r"^Version:\s+@VERSION@$", spec, re.M)


# --- slow: install into a DESTDIR --------------------------------------------

def make_install(side: str, destdir: Path, builddir: Path) -> Path:
    result = run("make", "-s", "-f", str(TOP / "packaging.mk"),
                 f"install-{side}", f"DESTDIR={destdir}",
                 f"PYTHON={sys.executable}", f"PYTHON_SITEARCH={SITE}",
                 f"PKG_BUILDDIR={builddir}")
    assert result.returncode == 0, result.stderr
    return destdir


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    builddir = tmp_path_factory.mktemp("build")
    return {side: make_install(side, tmp_path_factory.mktemp(side), builddir)
            for side in ("dom0", "vm")}


def tree(root: Path) -> set[str]:
    return {"/" + str(path.relative_to(root)) for path in root.rglob("*")
            if path.is_symlink() or not path.is_dir()}


def admin_cli_exists() -> bool:
    return (SRC / "qubes_gpu_share" / "cli" / "admin.py").exists()


@pytest.mark.slow
@pytest.mark.parametrize("side", ["dom0", "vm"])
def test_install_puts_every_file_in_place(installed, side):
    root = installed[side]
    assert top_level(tree(root), SITE) == expected_files(
        side, site=SITE, **FEDORA_PATHS)


@pytest.mark.slow
@pytest.mark.parametrize("side, services, sock", [
    ("dom0", DOM0_SERVICES, BROKER_SOCK), ("vm", VM_SERVICES, AGENT_SOCK)])
def test_each_service_is_a_symlink_to_its_daemon_socket(
        installed, side, services, sock):
    rpc = installed[side] / "etc/qubes-rpc"
    for name in services:
        assert os.readlink(rpc / name) == sock


@pytest.mark.slow
def test_policy_files_are_0664_and_state_dir_0750(installed):
    root = installed["dom0"]
    for policy in (root / "etc/qubes/policy.d").iterdir():
        assert stat.S_IMODE(policy.stat().st_mode) == 0o664, policy
    state = root / "var/lib/qubes-gpu-share"
    assert stat.S_IMODE(state.stat().st_mode) == 0o750


@pytest.mark.slow
@pytest.mark.parametrize("side", ["dom0", "vm"])
def test_installed_package_imports_with_its_compiled_module(installed, side):
    site = installed[side] / SITE.lstrip("/")
    result = run(sys.executable, "-c",
                 "import qubes_gpu_share, qubes_gpu_share._native as n;"
                 "print(qubes_gpu_share.__file__); print(n.__file__)",
                 env={**os.environ, "PYTHONPATH": str(site)}, cwd="/")
    assert result.returncode == 0, result.stderr
    for line in result.stdout.split():
        assert line.startswith(str(site)), line    # not the source tree


def run_installed(root: Path, program: str, *args: str):
    """An installed program, run from the DESTDIR as its own first line
    would, but with our interpreter (cffi) and the DESTDIR's site dir."""
    script = root / "usr/bin" / program
    assert script.read_text().startswith("#!/usr/bin/python3\n")
    return run(sys.executable, str(script), *args, cwd="/",
               env={**os.environ, "PYTHONPATH": str(root / SITE.lstrip("/"))})


@pytest.mark.slow
@pytest.mark.parametrize("side", ["dom0", "vm"])
def test_qubes_gpu_share_help_runs_from_the_installed_tree(installed, side):
    result = run_installed(installed[side], "qubes-gpu-share", "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: qubes-gpu-share" in result.stdout
    assert "probe" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(not admin_cli_exists(),
                    reason="cli/admin.py (qvm-gpu-share) not written yet")
def test_qvm_gpu_share_help_runs_from_the_installed_tree(installed):
    result = run_installed(installed["dom0"], "qvm-gpu-share", "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: qvm-gpu-share" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("man") is None, reason="no man(1) here")
@pytest.mark.parametrize("page", ["qubes-gpu-share", "qvm-gpu-share"])
def test_man_pages_render_without_warnings(installed, page):
    path = installed["dom0"] / "usr/share/man/man1" / f"{page}.1"
    result = run("man", "--warnings", "-l", str(path),
                 env={**os.environ, "MANPAGER": "cat", "MANWIDTH": "80"})
    assert result.returncode == 0 and not result.stderr, result.stderr
    assert page in result.stdout and "OPTIONS" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="no systemd-analyze here")
@pytest.mark.parametrize("side, unit, program", [
    ("dom0", "qubes-gpu-share-broker.service", "qubes-gpu-share-broker"),
    ("dom0", "qubes-gpu-share-dom0-agent.service", "qubes-gpu-share-agent"),
    ("vm", "qubes-gpu-share-agent.service", "qubes-gpu-share-agent")])
def test_systemd_analyze_verify_passes(installed, side, unit, program):
    """The only message allowed is that ExecStart's program is not on this
    machine (it is in the DESTDIR: checked here). --root=DESTDIR would need
    a whole systemd tree there; man pages are checked above."""
    root = installed[side]
    assert os.access(root / "usr/bin" / program, os.X_OK)
    result = run("systemd-analyze", "verify", "--man=no",
                 str(root / FEDORA_PATHS["unitdir"].lstrip("/") / unit))
    missing = (f"{unit}: Command /usr/bin/{program} is not executable: "
               "No such file or directory")
    other = [line for line in result.stderr.splitlines()
             if line.strip() and line.strip() != missing]
    assert not other, result.stderr


# --- slow: the packages ------------------------------------------------------

def build(target: str, builddir: Path) -> subprocess.CompletedProcess:
    return run("make", "-s", "-f", str(TOP / "packaging.mk"), target,
               f"PKG_BUILDDIR={builddir}", cwd=TOP)


@pytest.mark.slow
def test_make_rpm_builds_both_packages_with_the_expected_files(tmp_path):
    if os.geteuid() != 0 and shutil.which("rpmbuild") is None:
        pytest.skip("rpmbuild missing and cannot be installed without root")
    result = build("rpm", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # %{python3_sitearch} of the interpreter the spec builds with
    pyver = run("/usr/bin/python3", "-c", "import sys;print('%d.%d' % "
                "sys.version_info[:2])").stdout.strip()
    site = f"/usr/lib64/python{pyver}/site-packages"
    for side in ("dom0", "vm"):
        [rpm] = (tmp_path / "rpm/RPMS").rglob(f"qubes-gpu-share-{side}-*.rpm")
        query = run("rpm", "-qp", "--qf",
                    "[%{FILENAMES}\t%{FILEMODES:perms}\t%{FILEUSERNAME}\t"
                    "%{FILEGROUPNAME}\t%{FILELINKTOS}\n]", str(rpm))
        assert query.returncode == 0, query.stderr
        entries = {line.split("\t")[0]: line.split("\t")[1:]
                   for line in query.stdout.splitlines()}
        files = {path for path, (perms, *_rest) in entries.items()
                 if not perms.startswith("d")}
        assert top_level(files, site) == expected_files(
            side, site=site, **FEDORA_PATHS)
        version = (TOP / "version").read_text().strip()
        assert (f"/usr/share/licenses/qubes-gpu-share-{side}-{version}/"
                "LICENSE") in files
        sock = BROKER_SOCK if side == "dom0" else AGENT_SOCK
        for path, (perms, user, group, target) in entries.items():
            if path.startswith("/etc/qubes-rpc/"):
                assert target == sock, path
            if path.startswith("/etc/qubes/policy.d/"):
                assert (perms, user, group) == ("-rw-rw-r--", "root",
                                                "qubes"), path
        if side == "dom0":
            assert entries["/var/lib/qubes-gpu-share"][:3] == [
                "drwxr-x---", "qubes-gpu-share", "qubes"]
    conflicts = run("rpm", "-qp", "--conflicts", str(rpm)).stdout
    assert "qubes-gpu-share-dom0" in conflicts


@pytest.mark.slow
def test_make_deb_builds_the_vm_package_with_the_expected_files(tmp_path):
    if os.geteuid() != 0 and shutil.which("dh") is None:
        pytest.skip("debhelper missing and cannot be installed without root")
    result = build("deb", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [deb] = (tmp_path / "deb").glob("qubes-gpu-share-vm_*_*.deb")
    listing = run("dpkg-deb", "-c", str(deb))
    assert listing.returncode == 0, listing.stderr
    files, links = set(), {}
    for line in listing.stdout.splitlines():
        fields = line.split()
        if fields[0].startswith("d"):
            continue
        files.add(fields[5])
        if fields[0].startswith("l"):
            links[fields[5]] = fields[7]
    site = "/usr/lib/python3/dist-packages"
    assert top_level(files, site) == expected_files(
        "vm", site=site, **DEBIAN_PATHS)
    for name in VM_SERVICES:
        assert links[f"./etc/qubes-rpc/{name}"] == AGENT_SOCK
    # the source tree is left as it was (debian/ build products cleaned)
    assert not (TOP / "debian/qubes-gpu-share-vm").exists()

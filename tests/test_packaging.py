"""Packaging: `make install-dom0` / `install-vm` put every file in its place,
the installed tree runs, the units say who runs what with which rights and
verify, `make rpm` / `make deb` build packages holding exactly the expected
files, and the packagers' linters (rpmlint, lintian) find nothing but the
expected warnings listed below, each with its reason (docs/packaging.md).

Where a test runs a program of another part (qvm-gpu-share's --help), it is
skipped while that module does not exist yet; a linter that is not
installed skips its test (`make test` installs both where it can).
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from qubes_gpu_share import client

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
        "/usr/share/man/man8/qubes-gpu-share-agent.8",
    }
    if side == "dom0":
        return common | {
            "/usr/bin/qubes-gpu-share-broker", "/usr/bin/qvm-gpu-share",
            f"{unitdir}/qubes-gpu-share-broker.service",
            f"{unitdir}/qubes-gpu-share-dom0-agent.service",
            f"{unitdir}/qubes-gpu-share-dom0-agent.socket",
            "/usr/lib/sysusers.d/qubes-gpu-share-dom0.conf",
            f"{udevdir}/90-qubes-gpu-share-dom0.rules",
            "/etc/qubes/policy.d/30-user-gpu-share.policy",
            "/etc/qubes/policy.d/60-gpu-share.policy",
            "/usr/share/man/man1/qvm-gpu-share.1",
            "/usr/share/man/man8/qubes-gpu-share-broker.8",
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


# --- fast: who runs what, with which rights (the units) ----------------------

def unit(name: str) -> dict[str, dict[str, list[str]]]:
    """A unit file of systemd/ as section -> key -> values (a key may be
    given more than once; spaces split SupplementaryGroups= and the like
    later, where it matters)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in (TOP / "systemd" / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"),
                                          collections.defaultdict(list))
        else:
            key, _, value = line.partition("=")
            current[key].append(value)
    return sections


def one(section: dict[str, list[str]], key: str) -> str:
    [value] = section[key]
    return value


def ids(service: dict[str, list[str]]) -> set[str]:
    """The user and every group a unit's process runs with."""
    groups = " ".join(service.get("SupplementaryGroups", [])).split()
    return {one(service, "User"), one(service, "Group"), *groups}


BROKER = "qubes-gpu-share-broker.service"
DOM0_AGENT = "qubes-gpu-share-dom0-agent.service"
DOM0_AGENT_SOCKET = "qubes-gpu-share-dom0-agent.socket"
VM_AGENT = "qubes-gpu-share-agent.service"


def test_dom0_agent_runs_as_its_own_user_outside_group_qubes():
    """dom0's agent maps pages from qubes: it must not share a user or a
    group with the broker, whose user owns the registry and whose group
    (qubes) owns broker.sock, admin.sock and qubesd's Admin API."""
    agent = unit(DOM0_AGENT)["Service"]
    broker = unit(BROKER)["Service"]
    assert one(agent, "User") == one(agent, "Group") == "qubes-gpu-share-dom0"
    assert "SupplementaryGroups" not in agent
    assert ids(agent).isdisjoint({"qubes", "qubes-gpu-share", "root"})
    assert ids(agent).isdisjoint({one(broker, "User"), one(broker, "Group")})
    assert not agent.get("ReadWritePaths")       # nothing of the broker's
    assert "--dom0" in one(agent, "ExecStart").split()


def test_registry_and_broker_sockets_are_closed_to_dom0_agent():
    """What the agent could reach of the broker's: the registry folder
    (owner the broker's user, group qubes, 0750: nothing for others) and
    its run folder (0755, so that the agent reaches dom0-agent.sock, the
    only socket there of the agent's group; broker.sock and admin.sock
    are group qubes, 0660)."""
    broker = unit(BROKER)["Service"]
    assert (one(broker, "User"), one(broker, "Group")) == (
        "qubes-gpu-share", "qubes")
    assert one(broker, "StateDirectory") == "qubes-gpu-share"
    assert one(broker, "StateDirectoryMode") == "0750"
    assert one(broker, "RuntimeDirectory") == "qubes-gpu-share"
    assert one(broker, "RuntimeDirectoryMode") == "0755"
    assert one(broker, "UMask") == "0007"          # nothing for others


def test_broker_and_dom0_agent_meet_only_through_the_agents_group():
    broker = unit(BROKER)["Service"]
    agent = unit(DOM0_AGENT)["Service"]
    assert broker["SupplementaryGroups"] == ["qubes-gpu-share-dom0"]
    assert one(agent, "RuntimeDirectory") == "qubes-gpu-share-dom0"
    assert one(agent, "RuntimeDirectoryMode") == "0750"   # the broker: group
    assert one(agent, "UMask") == "0007"


def test_dom0_agent_gets_app_sock_from_systemd_for_group_qubes():
    """The agent cannot give a file to group qubes (it is not in it):
    systemd makes the socket, where applications look for it in dom0."""
    socket_unit = unit(DOM0_AGENT_SOCKET)
    listen = socket_unit["Socket"]
    assert one(listen, "ListenSequentialPacket") == client.DOM0_APP_SOCKET
    assert (one(listen, "SocketGroup"), one(listen, "SocketMode")) == (
        "qubes", "0660")
    agent = unit(DOM0_AGENT)
    for key in ("Requires", "After"):
        assert DOM0_AGENT_SOCKET in " ".join(agent["Unit"][key]).split()
    assert one(agent["Install"], "Also") == DOM0_AGENT_SOCKET
    assert "--app-group" in one(agent["Service"], "ExecStart").split()
    preset = (TOP / "systemd" / "70-qubes-gpu-share.preset").read_text()
    assert f"disable {DOM0_AGENT_SOCKET}" in preset.splitlines()


@pytest.mark.parametrize("name", [BROKER, DOM0_AGENT, VM_AGENT])
def test_services_restart_on_failure_within_a_start_limit(name):
    units = unit(name)
    assert one(units["Service"], "Restart") == "on-failure"
    assert one(units["Unit"], "StartLimitIntervalSec") == "60"
    assert one(units["Unit"], "StartLimitBurst") == "5"


@pytest.mark.parametrize("name, limit", [
    (BROKER, 4096), (DOM0_AGENT, 65536), (VM_AGENT, 65536)])
def test_file_descriptor_limits(name, limit):
    """The broker's over its caps (256 calls in, 64 out), the agents' over
    a provider's default budget of one-page leases (the units say why)."""
    assert int(one(unit(name)["Service"], "LimitNOFILE")) == limit


def test_journald_does_not_undercut_the_brokers_own_audit_rate_limit():
    service = unit(BROKER)["Service"]
    assert one(service, "LogRateLimitIntervalSec") == "10s"
    assert int(one(service, "LogRateLimitBurst")) >= 10_000


def test_each_system_user_has_a_sysusers_entry():
    users = {}
    for name in ("qubes-gpu-share.sysusers", "qubes-gpu-share-dom0.sysusers"):
        for line in (TOP / "systemd" / name).read_text().splitlines():
            if line and not line.startswith("#"):
                kind, who, *_rest = line.split()
                users.setdefault(kind, set()).add(who)
    assert users == {"u": {"qubes-gpu-share", "qubes-gpu-share-dom0"},
                     "g": {"qubes-gpu-share", "qubes-gpu-share-dom0"}}


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


#: every program's man page (cli/manpage.py): commands 1, daemons 8
MAN_PAGES = {"qubes-gpu-share": "1", "qvm-gpu-share": "1",
             "qubes-gpu-share-broker": "8", "qubes-gpu-share-agent": "8"}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("man") is None, reason="no man(1) here")
@pytest.mark.parametrize("page, section", MAN_PAGES.items())
def test_man_pages_render_without_warnings(installed, page, section):
    path = installed["dom0"] / f"usr/share/man/man{section}/{page}.{section}"
    result = run("man", "--warnings", "-l", str(path),
                 env={**os.environ, "MANPAGER": "cat", "MANWIDTH": "80"})
    assert result.returncode == 0 and not result.stderr, result.stderr
    assert page in result.stdout and "OPTIONS" in result.stdout
    assert "%(" not in result.stdout       # argparse's %(default)s filled in


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="no systemd-analyze here")
@pytest.mark.parametrize("side, unit_name, program", [
    ("dom0", BROKER, "qubes-gpu-share-broker"),
    ("dom0", DOM0_AGENT, "qubes-gpu-share-agent"),
    ("dom0", DOM0_AGENT_SOCKET, None),
    ("vm", VM_AGENT, "qubes-gpu-share-agent")])
def test_systemd_analyze_verify_passes(installed, side, unit_name, program):
    """The only message allowed is that ExecStart's program is not on this
    machine (it is in the DESTDIR: checked here). --root=DESTDIR would need
    a whole systemd tree there; man pages are checked above."""
    root = installed[side]
    if program:
        assert os.access(root / "usr/bin" / program, os.X_OK)
    result = run("systemd-analyze", "verify", "--man=no",
                 str(root / FEDORA_PATHS["unitdir"].lstrip("/") / unit_name))
    # a socket unit loads its service beside it
    missing = {f"{name}: Command /usr/bin/{prog} is not executable: "
               "No such file or directory"
               for name, prog in ((unit_name, program),
                                  (DOM0_AGENT, "qubes-gpu-share-agent"))}
    other = [line for line in result.stderr.splitlines()
             if line.strip() and line.strip() not in missing]
    assert not other, result.stderr


# --- slow: the packages, and the packagers' linters on them -------------------

def build(target: str, builddir: Path) -> subprocess.CompletedProcess:
    return run("make", "-s", "-f", str(TOP / "packaging.mk"), target,
               f"PKG_BUILDDIR={builddir}", cwd=TOP)


@pytest.fixture(scope="module")
def rpms(tmp_path_factory) -> dict[str, Path]:
    """`make rpm`'s two packages, by side."""
    if os.geteuid() != 0 and shutil.which("rpmbuild") is None:
        pytest.skip("rpmbuild missing and cannot be installed without root")
    builddir = tmp_path_factory.mktemp("rpm")
    result = build("rpm", builddir)
    assert result.returncode == 0, result.stderr[-3000:]
    found = {}
    for side in ("dom0", "vm"):
        [found[side]] = (builddir / "rpm/RPMS").rglob(
            f"qubes-gpu-share-{side}-*.rpm")
    return found


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    """`make deb`'s package."""
    if os.geteuid() != 0 and shutil.which("dh") is None:
        pytest.skip("debhelper missing and cannot be installed without root")
    builddir = tmp_path_factory.mktemp("deb")
    result = build("deb", builddir)
    assert result.returncode == 0, result.stderr[-3000:]
    [package] = (builddir / "deb").glob("qubes-gpu-share-vm_*_*.deb")
    return package


def rpm_entries(package: Path) -> dict[str, list[str]]:
    """path -> [perms, user, group, link target] of every file."""
    query = run("rpm", "-qp", "--qf",
                "[%{FILENAMES}\t%{FILEMODES:perms}\t%{FILEUSERNAME}\t"
                "%{FILEGROUPNAME}\t%{FILELINKTOS}\n]", str(package))
    assert query.returncode == 0, query.stderr
    return {line.split("\t")[0]: line.split("\t")[1:]
            for line in query.stdout.splitlines()}


def deb_entries(package: Path) -> tuple[set[str], dict[str, str]]:
    """The files (not folders) of a .deb, and its symlinks' targets."""
    listing = run("dpkg-deb", "-c", str(package))
    assert listing.returncode == 0, listing.stderr
    files, links = set(), {}
    for line in listing.stdout.splitlines():
        fields = line.split()
        if fields[0].startswith("d"):
            continue
        files.add(fields[5].removeprefix("."))
        if fields[0].startswith("l"):
            links[fields[5].removeprefix(".")] = fields[7]
    return files, links


@pytest.mark.slow
def test_make_rpm_builds_both_packages_with_the_expected_files(rpms):
    # %{python3_sitearch} of the interpreter the spec builds with
    pyver = run("/usr/bin/python3", "-c", "import sys;print('%d.%d' % "
                "sys.version_info[:2])").stdout.strip()
    site = f"/usr/lib64/python{pyver}/site-packages"
    for side, package in rpms.items():
        entries = rpm_entries(package)
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
    conflicts = run("rpm", "-qp", "--conflicts", str(rpms["vm"])).stdout
    assert "qubes-gpu-share-dom0" in conflicts


@pytest.mark.slow
def test_dom0_rpm_creates_both_users_before_installing(rpms):
    scripts = run("rpm", "-qp", "--scripts", str(rpms["dom0"])).stdout
    pre = scripts.split("preinstall scriptlet")[1].split("scriptlet")[0]
    for user in ("qubes-gpu-share", "qubes-gpu-share-dom0"):
        assert re.search(rf"^u {re.escape(user)} ", pre, re.M), pre


@pytest.mark.slow
def test_make_deb_builds_the_vm_package_with_the_expected_files(deb):
    files, links = deb_entries(deb)
    site = "/usr/lib/python3/dist-packages"
    assert top_level(files, site) == expected_files(
        "vm", site=site, **DEBIAN_PATHS)
    for name in VM_SERVICES:
        assert links[f"/etc/qubes-rpc/{name}"] == AGENT_SOCK
    # the source tree is left as it was (debian/ build products cleaned)
    assert not (TOP / "debian/qubes-gpu-share-vm").exists()


def programs_without_man_page(files: set[str]) -> set[str]:
    pages = {Path(path).name.split(".")[0] for path in files
             if re.match(r"/usr/share/man/man\d/[^/]+\.\d\.gz$", path)}
    return {Path(path).name for path in files
            if path.startswith("/usr/bin/")} - pages


@pytest.mark.slow
def test_every_program_has_its_man_page(rpms, deb):
    for package in rpms.values():
        assert not programs_without_man_page(set(rpm_entries(package)))
    assert not programs_without_man_page(deb_entries(deb)[0])


# The linters' findings we expect, as (tag, regex of the rest of the line,
# why it stays). Anything else they report, error or warning, fails.
SOCKET_SERVICE = r"/etc/qubes-rpc/qubes\.Gpu\w+ /run/qubes-gpu-share/" \
    r"(broker|agent)\.sock"
RPMLINT_EXPECTED = (
    ("symlink-should-be-relative", SOCKET_SERVICE,
     "a socket service is a symlink to its daemon's socket in /run, as "
     "Qubes' admin.* services are to qubesd's (Fedora's rpmlint "
     "configuration filters this tag too)"),
    ("dangling-symlink", SOCKET_SERVICE,
     "the socket exists while its daemon runs"),
    ("non-standard-uid", r"/var/lib/qubes-gpu-share qubes-gpu-share",
     "the registry is the broker's, whose system user the package creates "
     "(sysusers, in %pre)"),
    ("non-standard-gid",
     r"(/etc/qubes/policy\.d/\S+\.policy|/var/lib/qubes-gpu-share) qubes",
     "Qubes' group: policy files are root:qubes 0664 like Qubes' own; the "
     "broker's group reads the registry"),
    ("non-standard-dir-perm", r"/var/lib/qubes-gpu-share 750",
     "the registry is for the broker only (its user, group qubes)"),
    ("no-signature", r"",
     "Qubes' builder signs the packages it publishes (Fedora's rpmlint "
     "configuration filters this tag)"),
    ("no-packager-tag", r"",
     "the build system sets Packager (filtered by Fedora's configuration)"),
    ("no-group-tag", r"",
     "Fedora dropped the Group tag (filtered by Fedora's configuration)"),
    ("invalid-license", r"GPL-2\.0-or-later",
     "an SPDX identifier, which Fedora requires since 2023; Debian 12's "
     "rpmlint 2.4 knows only the old Fedora names"),
    ("manpage-not-compressed", r"bz2 /usr/share/man/man\d/\S+\.gz",
     "Debian's rpmlint wants bz2; Fedora's configuration "
     "(CompressExtension gz) wants the gzip brp-compress made"),
    ("no-manual-page-for-binary",
     r"(qubes-gpu-share|qubes-gpu-share-agent|qubes-gpu-share-broker|"
     r"qvm-gpu-share)",
     "rpmlint 2.4 (Debian 12) matches man pages by section, not by name "
     "(fixed in 2.5); test_every_program_has_its_man_page checks them"),
)
LINTIAN_EXPECTED = (
    ("initial-upload-closes-no-bugs", r"\[usr/share/doc/qubes-gpu-share-vm/"
     r"changelog\.Debian\.gz:\d+\]",
     "not an upload to Debian: there is no ITP bug to close (the package "
     "ships from Qubes' repository)"),
)


def unexpected(findings: list[tuple[str, str]],
               expected: tuple[tuple[str, str, str], ...]) -> list[str]:
    """The (tag, rest) findings that no expected entry explains."""
    return [f"{tag} {rest}".strip() for tag, rest in findings
            if not any(tag == want and re.fullmatch(pattern, rest)
                       for want, pattern, _why in expected)]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("rpmlint") is None,
                    reason="rpmlint is not installed (Debian package rpmlint)")
def test_rpmlint_finds_only_the_expected(rpms):
    result = run("rpmlint", *map(str, rpms.values()))
    findings = re.findall(r"^\S+: [EW]: (\S+)(?: (.*))?$", result.stdout,
                          re.M)
    assert re.search(r"\d+ packages and 0 specfiles checked", result.stdout), \
        result.stdout + result.stderr
    assert not unexpected(findings, RPMLINT_EXPECTED), result.stdout


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("lintian") is None,
                    reason="lintian is not installed (Debian package lintian)")
def test_lintian_finds_only_the_expected(deb):
    result = run("lintian", str(deb))
    assert result.returncode in (0, 1, 2), result.stderr
    findings = re.findall(r"^[EW]: \S+: (\S+)(?: (.*))?$", result.stdout,
                          re.M)
    assert not unexpected(findings, LINTIAN_EXPECTED), result.stdout

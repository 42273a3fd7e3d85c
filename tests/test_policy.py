"""The shipped qrexec policy, checked with Qubes' own linter and parser.

The default denies every call; each commented example in
30-user-gpu-share.policy, uncommented here, allows exactly what its comment
says; and the fallback evaluator (policy_eval.SubsetPolicy) decides like
Qubes' parser on all of them.
"""

import itertools
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from qubes_gpu_share.qrexec.policy_eval import (
    Decision, QubesPolicy, SubsetPolicy, system_info)

POLICY_DIR = pathlib.Path(__file__).resolve().parent.parent / "policy"
USER_FILE = "30-user-gpu-share.policy"
TO_DOM0 = ("qubes.GpuLease", "qubes.GpuOffer", "qubes.GpuRelease",
           "qubes.GpuLeases")
TO_QUBE = ("qubes.GpuExport", "qubes.GpuDeliver", "qubes.GpuRevoke")
SERVICES = TO_DOM0 + TO_QUBE + ("qubes.Filecopy",)
ARGUMENTS = ("", "sys-gpu", "work", "other", "0123456789abcdef0123456789abcdef")
QUBES = {"dom0": [], "work": ["gpu-share"], "sys-gpu": [], "other": [],
         "vault": ["gpu-share"]}
TARGETS = ("@adminvm", "dom0", "sys-gpu", "work", "@default", "missing")
REQUESTS = list(itertools.product(QUBES, SERVICES, ARGUMENTS, TARGETS))
ALLOW_DOM0 = Decision("allow", target="dom0")
DENY = Decision("deny")


def _examples():
    """name -> the example's rule lines, uncommented."""
    text = (POLICY_DIR / USER_FILE).read_text()
    examples, name = {}, None
    for line in text.splitlines():
        match = re.match(r"## Example: (\S+)", line)
        if match:
            name = match.group(1)
            examples[name] = []
        elif name and line.startswith("#qubes."):
            examples[name].append(line[1:])
    return examples


def _policy_files(example=None):
    files = {p.name: p.read_text() for p in POLICY_DIR.glob("*.policy")}
    if example:
        files[USER_FILE] += "\n".join(_examples()[example]) + "\n"
    return files


def _qubes_decisions(qrexec, files, tmp_path):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    import qrexec.policy.parser as parser
    policy = QubesPolicy(parser, tmp_path)
    info = system_info(QUBES)
    return {req: policy.evaluate(info, req[0], req[1], req[2], req[3])
            for req in REQUESTS}


def _to_dom0(target):
    return target in ("@adminvm", "dom0")


def expect_gpu_qube_serves_tag(source, service, argument, target):
    tagged = "gpu-share" in QUBES[source]
    if not _to_dom0(target):
        return DENY
    if service in ("qubes.GpuLease", "qubes.GpuOffer"):
        return ALLOW_DOM0 if tagged and argument == "sys-gpu" else DENY
    if service in ("qubes.GpuRelease", "qubes.GpuLeases"):
        return ALLOW_DOM0 if tagged or source == "sys-gpu" else DENY
    return DENY


def expect_one_pair(source, service, argument, target):
    if not _to_dom0(target) or source != "work":
        return DENY
    if service == "qubes.GpuLease":
        return ALLOW_DOM0 if argument == "sys-gpu" else DENY
    return ALLOW_DOM0 if service in ("qubes.GpuRelease", "qubes.GpuLeases") \
        else DENY


def expect_ask(source, service, argument, target):
    if not _to_dom0(target) or source == "dom0":
        return DENY
    if service == "qubes.GpuLease" and argument == "sys-gpu":
        return Decision("ask", targets_for_ask=("dom0",), default_target="dom0")
    return ALLOW_DOM0 if service in ("qubes.GpuRelease", "qubes.GpuLeases") \
        else DENY


EXPECTED = {"gpu-qube-serves-tag": expect_gpu_qube_serves_tag,
            "one-pair": expect_one_pair, "ask": expect_ask}


def _lint_command(path):
    if shutil.which("qubes-policy-lint"):
        return ["qubes-policy-lint", str(path)]
    return [sys.executable, "-m", "qrexec.tools.qubes_policy_lint", str(path)]


def _lint(qrexec, path):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(
        os.path.dirname(qrexec.__file__)))
    return subprocess.run(_lint_command(path), env=env, capture_output=True,
                          text=True, check=False)


def test_every_example_is_tested():
    assert set(_examples()) == set(EXPECTED)
    assert all(_examples().values())


@pytest.mark.parametrize("example", [None, *EXPECTED])
def test_lint(qrexec, tmp_path, example):
    files = _policy_files(example)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        result = _lint(qrexec, tmp_path / name)
        assert result.returncode == 0, result.stdout + result.stderr


def test_linter_is_not_a_rubber_stamp(qrexec, tmp_path):
    bad = tmp_path / "30-user-bad.policy"
    bad.write_text("qubes.GpuLease +sys/gpu work @adminvm allow\n")
    assert _lint(qrexec, bad).returncode != 0


def test_default_denies_everything(qrexec, tmp_path):
    decisions = _qubes_decisions(qrexec, _policy_files(), tmp_path)
    assert set(decisions.values()) == {DENY}


@pytest.mark.parametrize("example", list(EXPECTED))
def test_example_allows_exactly_what_it_says(qrexec, tmp_path, example):
    decisions = _qubes_decisions(qrexec, _policy_files(example), tmp_path)
    wrong = {req: (got, EXPECTED[example](*req))
             for req, got in decisions.items() if got != EXPECTED[example](*req)}
    assert not wrong
    assert any(d != DENY for d in decisions.values())


@pytest.mark.parametrize("example", [None, *EXPECTED])
def test_subset_evaluator_agrees_with_qubes(qrexec, tmp_path, example):
    files = _policy_files(example)
    expected = _qubes_decisions(qrexec, files, tmp_path)
    subset = SubsetPolicy(files)
    info = system_info(QUBES)
    disagree = {req: (subset.evaluate(info, *req), want)
                for req, want in expected.items()
                if subset.evaluate(info, *req) != want}
    assert not disagree


def test_subset_evaluator_refuses_what_it_does_not_know():
    from qubes_gpu_share.qrexec.policy_eval import PolicyError
    for line in ("!include-dir /etc", "a +b @dispvm:x @adminvm allow",
                 "a +b work @adminvm allow bogus=1", "a +b work @adminvm maybe"):
        with pytest.raises(PolicyError):
            SubsetPolicy({"x.policy": line})

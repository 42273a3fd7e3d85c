"""The shipped qrexec policy, checked against what Qubes' own parser says.

The default denies every call; each commented example in
30-user-gpu-share.policy, uncommented here, allows every call the qubes it
names make in their roles and nothing else; and the project's own evaluator
(policy_eval.SubsetPolicy, which stands in for Qubes' parser where qrexec
is absent) decides like Qubes' parser on all of them.

Qubes' parser is not available in CI (its package may not be committed),
so its verdicts on the request grid below are recorded in
tests/data/policy-verdicts.json, with a digest of the policy texts and of
the grid they were made from: CI compares against the record, and a test
fails when the record is older than the policies. Where the real parser is
present (dom0, or QUBES_GPU_SHARE_QUBES_PATH), the tests marked ``qubes``
also compare live and lint the files. Regenerate the record with
``make policy-verdicts`` (this file run as a program; docs/qrexec.md).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, Iterable, Mapping, Optional, Set, Tuple

import pytest

from qubes_gpu_share.qrexec.policy_eval import (
    Decision, QubesPolicy, SubsetPolicy, qubes_parser, system_info)

TOP = pathlib.Path(__file__).resolve().parent.parent
POLICY_DIR = TOP / "policy"
VERDICTS = TOP / "tests" / "data" / "policy-verdicts.json"
BROKER_LINK = TOP / "qubes-gpu-share" / "qubes_gpu_share" / "agent" / \
    "broker_link.py"
USER_FILE = "30-user-gpu-share.policy"
QREXEC_REPOSITORY = "QubesOS/qubes-core-qrexec"

TO_DOM0 = ("qubes.GpuLease", "qubes.GpuOffer", "qubes.GpuRelease",
           "qubes.GpuLeases")
TO_QUBE = ("qubes.GpuExport", "qubes.GpuDeliver", "qubes.GpuRevoke")
SERVICES = TO_DOM0 + TO_QUBE + ("qubes.Filecopy",)
ARGUMENTS = ("", "sys-gpu", "work", "other", "0123456789abcdef0123456789abcdef")
QUBES = {"dom0": [], "work": ["gpu-share"], "sys-gpu": [], "other": [],
         "vault": ["gpu-share"]}
TARGETS = ("@adminvm", "dom0", "sys-gpu", "work", "@default", "missing")
#: (source, service, argument without '+', target): 1,200 requests
REQUESTS = list(itertools.product(QUBES, SERVICES, ARGUMENTS, TARGETS))
Request = Tuple[str, str, str, str]

ALLOW_DOM0 = Decision("allow", target="dom0")
ASK_DOM0 = Decision("ask", targets_for_ask=("dom0",), default_target="dom0")
DENY = Decision("deny")
DEFAULT = "default"        # the case with no example uncommented


# --- the policies ------------------------------------------------------------

def _examples() -> Dict[str, list]:
    """name -> the example's rule lines, uncommented, in file order."""
    text = (POLICY_DIR / USER_FILE).read_text()
    examples: Dict[str, list] = {}
    name = None
    for line in text.splitlines():
        match = re.match(r"## Example: (\S+)", line)
        if match:
            name = match.group(1)
            examples[name] = []
        elif name and line.startswith("#qubes."):
            examples[name].append(line[1:])
    return examples


def policy_files(case: str = DEFAULT) -> Dict[str, str]:
    """The policy directory of *case*: the shipped files, with the example
    of that name uncommented at the end of the admin's file."""
    files = {p.name: p.read_text() for p in POLICY_DIR.glob("*.policy")}
    if case != DEFAULT:
        files[USER_FILE] += "\n".join(_examples()[case]) + "\n"
    return files


def cases() -> list:
    return [DEFAULT, *_examples()]


def _sha256(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()


def policy_digest(files: Mapping[str, str]) -> str:
    """What a record of verdicts was made from: every file's name and text."""
    return _sha256(*itertools.chain.from_iterable(
        (name, files[name]) for name in sorted(files)))


def grid_digest() -> str:
    return _sha256(json.dumps({"qubes": QUBES, "services": SERVICES,
                               "arguments": ARGUMENTS, "targets": TARGETS},
                              sort_keys=True))


# --- what each example must allow: the roles of the qubes it names ----------

LEASE, PROVIDE, OFFER, RECEIVE = "lease", "provide", "offer", "receive"


def role_calls(role: str, peer: Optional[str] = None) -> Set[Tuple[str, str]]:
    """The calls (service, argument) an agent makes in *role*
    (agent/broker_link.py; daemon.py, reconcile.py and releases.py call
    it). Every agent lists its leases at start (its reconciler) and
    releases the leases it holds or lent (an application letting go, a
    failed offer withdrawn, a lease nobody here knows); a consumer leases
    from its provider; a qube offering a buffer calls GpuOffer with the
    consumer's name."""
    calls = {("qubes.GpuRelease", ""), ("qubes.GpuLeases", "")}
    if role == LEASE:
        calls.add(("qubes.GpuLease", peer))
    elif role == OFFER:
        calls.add(("qubes.GpuOffer", peer))
    return calls


#: example -> qube -> its roles, as the example's comment describes them
ROLES: Dict[str, Dict[str, Set[Tuple[str, Optional[str]]]]] = {
    "gpu-qube-serves-tag": {
        "work": {(LEASE, "sys-gpu"), (OFFER, "sys-gpu")},
        "vault": {(LEASE, "sys-gpu"), (OFFER, "sys-gpu")},
        "sys-gpu": {(PROVIDE, None), (RECEIVE, None)}},
    "one-pair": {"work": {(LEASE, "sys-gpu")},
                 "sys-gpu": {(PROVIDE, None)}},
    # any qube may ask (sys-gpu too: the policy does not tell it apart)
    "ask": {**{qube: {(LEASE, "sys-gpu")} for qube in QUBES if qube != "dom0"},
            "sys-gpu": {(LEASE, "sys-gpu"), (PROVIDE, None)}},
}
#: example -> the services it answers with `ask` instead of `allow`
ASKED = {"ask": {"qubes.GpuLease"}}


def calls_of(case: str, qube: str) -> Set[Tuple[str, str]]:
    roles = ROLES.get(case, {}).get(qube, set())
    return set().union(*(role_calls(*role) for role in roles))


def expected(case: str, source: str, service: str, argument: str,
             target: str) -> Decision:
    """The decision *case* must give: its qubes' calls to dom0 allowed (or
    asked), everything else denied. GpuRelease and GpuLeases are allowed
    with any argument (the examples write `*`; the broker ignores it)."""
    calls = calls_of(case, source)
    if target not in ("@adminvm", "dom0") or not calls:
        return DENY
    if service in ("qubes.GpuRelease", "qubes.GpuLeases"):
        argument = ""
    if (service, argument) not in calls:
        return DENY
    return ASK_DOM0 if service in ASKED.get(case, ()) else ALLOW_DOM0


# --- verdicts: Qubes' parser, live or as recorded ----------------------------

def real_verdicts(parser, files: Mapping[str, str]) -> Dict[Request, Decision]:
    """Qubes' parser's decision on every request of the grid."""
    info = system_info(QUBES)
    with tempfile.TemporaryDirectory() as folder:
        for name, text in files.items():
            (pathlib.Path(folder) / name).write_text(text)
        policy = QubesPolicy(parser, pathlib.Path(folder))
        return {request: policy.evaluate(info, *request)
                for request in REQUESTS}


def subset_verdicts(files: Mapping[str, str]) -> Dict[Request, Decision]:
    policy, info = SubsetPolicy(files), system_info(QUBES)
    return {request: policy.evaluate(info, *request) for request in REQUESTS}


def _row(request: Request, decision: Decision) -> list:
    return [*request, decision.action, decision.target,
            list(decision.targets_for_ask), decision.default_target]


def _decision(row: list) -> Tuple[Request, Decision]:
    source, service, argument, target, action, to, ask, default = row
    return ((source, service, argument, target),
            Decision(action, to, tuple(ask), default))


def git_blob_id(path: pathlib.Path) -> str:
    """The id git gives the file's content: `git rev-parse COMMIT:PATH` in
    the upstream repository names the same file."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def record_text(parser, commit: str) -> str:
    """The verdicts file: one case per uncommented example (and none),
    the decisions that are not `deny` one per line, sorted."""
    cases_text = []
    for case in cases():
        files = policy_files(case)
        rows = sorted(json.dumps(_row(request, decision))
                      for request, decision in
                      real_verdicts(parser, files).items()
                      if decision != DENY)
        cases_text.append(
            f'  {json.dumps(case)}: {{\n'
            f'   "policy_sha256": "{policy_digest(files)}",\n'
            f'   "not_denied": [' + (
                "\n    " + ",\n    ".join(rows) + "\n   " if rows else "")
            + "]}")
    head = {
        "about": "Qubes' own qrexec policy parser's verdicts on the request "
                 "grid of tests/test_policy.py, for CI, which has no "
                 "parser; every request not listed was denied",
        "regenerate": "make policy-verdicts (docs/qrexec.md)",
        "qrexec": {"repository": QREXEC_REPOSITORY, "commit": commit,
                   "qrexec/policy/parser.py": git_blob_id(
                       pathlib.Path(parser.__file__))},
        "grid_sha256": grid_digest(),
    }
    text = json.dumps(head, indent=1)[:-2]
    return text + ',\n "cases": {\n' + ",\n".join(cases_text) + "\n }\n}\n"


def load_record(path: pathlib.Path = VERDICTS) -> dict:
    """The record as {case: (policy digest, {request: decision})} plus its
    head."""
    data = json.loads(path.read_text())
    data["cases"] = {
        case: (entry["policy_sha256"],
               dict(_decision(row) for row in entry["not_denied"]))
        for case, entry in data["cases"].items()}
    return data


def recorded(case: str) -> Dict[Request, Decision]:
    _digest, not_denied = load_record()["cases"][case]
    return {request: not_denied.get(request, DENY) for request in REQUESTS}


def _show(decision: Decision) -> str:
    if decision.action == "ask":
        return (f"ask {'/'.join(decision.targets_for_ask)} "
                f"(default {decision.default_target})")
    return f"{decision.action} {decision.target or ''}".strip()


def _differences(got: Mapping[Request, Decision],
                 want: Mapping[Request, Decision]) -> list:
    """One readable line per request decided otherwise than *want*."""
    return [f"{source} {service}+{argument} to {target}: "
            f"{_show(got[request])}, expected {_show(want[request])}"
            for request in sorted(want)
            for source, service, argument, target in [request]
            if got[request] != want[request]]


# --- always (CI): the record ---------------------------------------------------

def test_every_example_is_tested():
    assert set(_examples()) == set(ROLES)
    assert all(_examples().values())


def test_verdicts_record_is_current():
    """A change to policy/ or to the grid needs a new record (made with
    Qubes' parser): until then the comparisons below would check an old
    policy."""
    record = load_record()
    stale = [case for case in cases()
             if case not in record["cases"]
             or record["cases"][case][0] != policy_digest(policy_files(case))]
    stale += [case for case in record["cases"] if case not in cases()]
    if record["grid_sha256"] != grid_digest():
        stale.append("the request grid")
    assert not stale, (
        f"{VERDICTS.relative_to(TOP)} is stale for {', '.join(stale)}: run "
        f"`make policy-verdicts` where Qubes' qrexec package is available "
        f"(docs/qrexec.md)")
    assert re.fullmatch(r"[0-9a-f]{40}", record["qrexec"]["commit"])


def test_roles_name_every_service_the_agent_calls():
    """The role table above is the agent's: the services BrokerLink calls
    are exactly those the roles name."""
    called = set(re.findall(r'"(qubes\.Gpu\w+)', BROKER_LINK.read_text()))
    named = {service for role in (LEASE, PROVIDE, OFFER, RECEIVE)
             for service, _arg in role_calls(role, "peer")}
    assert called == named


@pytest.mark.parametrize("case", cases())
def test_qubes_parser_allows_exactly_what_the_example_says(case):
    want = {request: expected(case, *request) for request in REQUESTS}
    assert not _differences(recorded(case), want)
    assert (case == DEFAULT) == all(d == DENY for d in want.values())


@pytest.mark.parametrize("case", list(ROLES))
def test_example_allows_every_call_its_qubes_make(case):
    """Per qube and role, the calls its agent makes (a missing one shows
    in the agent's log at every start, e.g. "cannot reconcile leases with
    dom0 ... refused by qrexec policy"), by Qubes' parser and by ours."""
    verdicts = {"qubes": recorded(case),
                "subset": subset_verdicts(policy_files(case))}
    refused = [f"{evaluator}: {qube} {service}+{argument}: {got.action}"
               for qube in ROLES[case]
               for service, argument in sorted(calls_of(case, qube))
               for evaluator, got in
               ((e, v[(qube, service, argument, "@adminvm")])
                for e, v in verdicts.items())
               if got == DENY]
    assert not refused


@pytest.mark.parametrize("case", list(ROLES))
def test_example_denies_calls_its_qubes_must_not_make(case):
    """A sample of what the example must not allow: a qube it does not
    name, a lease or offer with another peer, a qube calling another qube,
    and dom0's own services called by a qube."""
    verdicts = recorded(case)
    bystander = [q for q in QUBES if q != "dom0" and q not in ROLES[case]]
    must_not = [(qube, service, "sys-gpu", "@adminvm")
                for qube in bystander for service in TO_DOM0]
    for qube in ROLES[case]:
        must_not += [(qube, "qubes.GpuLease", "other", "@adminvm"),
                     (qube, "qubes.GpuOffer", "other", "@adminvm"),
                     (qube, "qubes.GpuLease", "sys-gpu", "sys-gpu"),
                     (qube, "qubes.GpuLeases", "", "work")]
        must_not += [(qube, service, "", target) for service in TO_QUBE
                     for target in ("@adminvm", "sys-gpu", "work")]
    must_not += [("dom0", service, "sys-gpu", "@adminvm")
                 for service in TO_DOM0]
    assert {request: verdicts[request] for request in must_not
            if verdicts[request] != DENY} == {}


@pytest.mark.parametrize("case", cases())
def test_subset_evaluator_agrees_with_recorded_verdicts(case):
    assert not _differences(subset_verdicts(policy_files(case)),
                            recorded(case))


def test_subset_evaluator_refuses_what_it_does_not_know():
    from qubes_gpu_share.qrexec.policy_eval import PolicyError
    for line in ("!include-dir /etc", "a +b @dispvm:x @adminvm allow",
                 "a +b work @adminvm allow bogus=1", "a +b work @adminvm maybe"):
        with pytest.raises(PolicyError):
            SubsetPolicy({"x.policy": line})


# --- where Qubes' qrexec is present: live ---------------------------------------

def _lint_command(path):
    if shutil.which("qubes-policy-lint"):
        return ["qubes-policy-lint", str(path)]
    return [sys.executable, "-m", "qrexec.tools.qubes_policy_lint", str(path)]


def _lint(qrexec, path):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(
        os.path.dirname(qrexec.__file__)))
    return subprocess.run(_lint_command(path), env=env, capture_output=True,
                          text=True, check=False)


@pytest.mark.qubes
@pytest.mark.parametrize("case", cases())
def test_lint(qrexec, tmp_path, case):
    for name, text in policy_files(case).items():
        (tmp_path / name).write_text(text)
        result = _lint(qrexec, tmp_path / name)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.qubes
def test_linter_is_not_a_rubber_stamp(qrexec, tmp_path):
    bad = tmp_path / "30-user-bad.policy"
    bad.write_text("qubes.GpuLease +sys/gpu work @adminvm allow\n")
    assert _lint(qrexec, bad).returncode != 0


@pytest.mark.qubes
@pytest.mark.parametrize("case", cases())
def test_qubes_parser_gives_the_recorded_verdicts(qrexec, case):
    import qrexec.policy.parser as parser
    live = real_verdicts(parser, policy_files(case))
    blob = load_record()["qrexec"]["qrexec/policy/parser.py"]
    assert not _differences(live, recorded(case)), (
        f"this parser (blob {git_blob_id(pathlib.Path(parser.__file__))}, "
        f"the record's {blob}) decides otherwise: `make policy-verdicts`")


@pytest.mark.qubes
@pytest.mark.parametrize("case", cases())
def test_subset_evaluator_agrees_with_qubes(qrexec, case):
    import qrexec.policy.parser as parser
    files = policy_files(case)
    assert not _differences(subset_verdicts(files),
                            real_verdicts(parser, files))


# --- `make policy-verdicts` --------------------------------------------------

def _commit_of(package_dir: pathlib.Path) -> Optional[str]:
    """HEAD of the git checkout holding the package, if it is one."""
    result = subprocess.run(["git", "-C", str(package_dir), "rev-parse",
                             "HEAD"], capture_output=True, text=True,
                            check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def main(argv: Optional[Iterable[str]] = None) -> int:
    options = argparse.ArgumentParser(
        description="Record Qubes' qrexec policy parser's verdicts on this "
                    "module's request grid (for CI, which has no parser).")
    options.add_argument("--write-verdicts", action="store_true",
                         required=True)
    options.add_argument("--qrexec-commit", metavar="SHA1",
                         help=f"the commit of {QREXEC_REPOSITORY} the qrexec "
                              "package was copied from (default: HEAD of its "
                              "git checkout)")
    options.add_argument("--output", type=pathlib.Path, default=VERDICTS)
    args = options.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)   # its "target does not exist"
    parser = qubes_parser()
    if parser is None:
        sys.exit("Qubes' qrexec package is not importable: point "
                 "QUBES_GPU_SHARE_QUBES_PATH at a folder holding a copy of "
                 f"the `qrexec` package of {QREXEC_REPOSITORY} (outside this "
                 "repository; docs/qrexec.md), or run this in dom0")
    package = pathlib.Path(parser.__file__).resolve().parents[2]
    commit = args.qrexec_commit or _commit_of(package)
    if not commit or not re.fullmatch(r"[0-9a-f]{40}", commit):
        sys.exit(f"which commit of {QREXEC_REPOSITORY} is the qrexec package "
                 f"in {package}? Give all 40 hex digits: make policy-verdicts "
                 f"QREXEC_COMMIT=... (got {commit!r})")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(record_text(parser, commit))
    print(f"wrote {args.output} (qrexec {commit[:12]}, parser "
          f"{parser.__file__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

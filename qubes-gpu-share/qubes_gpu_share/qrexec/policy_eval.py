"""Evaluating a qrexec call against a policy directory.

The simulated router asks "may SOURCE call SERVICE+ARG on TARGET, and where
does it go?" and gets a :class:`Decision`. The answer comes from Qubes' own
policy parser (``qrexec.policy.parser``) whenever it is importable, from the
system (dom0) or from the folder QUBES_GPU_SHARE_QUBES_PATH names (a
developer's copy, never committed: tests/conftest.py). Elsewhere (CI, a
developer's machine) :class:`SubsetPolicy` stands in, so that ``make demo``
and the simulated system run: it understands the part of the policy
language the project's policies use (plain rules, ``*``, names, ``@anyvm``,
``@adminvm``, ``@tag:``, ``@type:``, ``@default``; allow/deny/ask with
``target=``, ``default_target=``, ``notify=``, ``autostart=``, ``user=``)
and refuses a file that uses anything else. tests/test_policy.py checks
that it decides like Qubes' parser on every shipped and example policy:
against the parser's verdicts recorded in tests/data/policy-verdicts.json
always, and live where the parser is present.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pathlib
import sys
import uuid
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

DOM0_UUID = "00000000-0000-0000-0000-000000000000"
_DOM0_NAMES = ("@adminvm", "dom0", "uuid:" + DOM0_UUID)
_ACTIONS = ("allow", "deny", "ask")
_PARAMS = {"allow": {"target", "user", "notify", "autostart"},
           "deny": {"notify"},
           "ask": {"target", "default_target", "user", "notify", "autostart"}}


class PolicyError(ValueError):
    """A policy this evaluator cannot read (syntax or unsupported feature)."""


@dataclasses.dataclass(frozen=True)
class Decision:
    """What the policy says: the action and where the call goes.

    ``target`` is set for allow; ``targets_for_ask``/``default_target`` for
    ask (what qrexec would offer the user).
    """

    action: str
    target: Optional[str] = None
    targets_for_ask: Tuple[str, ...] = ()
    default_target: Optional[str] = None


def system_info(qubes: Mapping[str, Iterable[str]]) -> dict:
    """Qubes' system-info structure for running qubes, name -> tags.

    dom0 is the AdminVM, every other qube a running AppVM; uuids are
    derived from names so that results are reproducible.
    """
    domains: Dict[str, dict] = {}
    for name, tags in qubes.items():
        is_dom0 = name == "dom0"
        entry = {"name": name, "tags": sorted(tags),
                 "type": "AdminVM" if is_dom0 else "AppVM",
                 "template_for_dispvms": False, "default_dispvm": None,
                 "icon": "", "power_state": "Running",
                 "uuid": DOM0_UUID if is_dom0 else
                 str(uuid.uuid5(uuid.NAMESPACE_DNS, name))}
        domains[name] = entry
        domains["uuid:" + entry["uuid"]] = entry
    return {"domains": domains}


@dataclasses.dataclass(frozen=True)
class _Rule:
    service: Optional[str]
    argument: Optional[str]
    source: str
    target: str
    action: str
    params: Mapping[str, str]


class SubsetPolicy:
    """The fallback evaluator (see the module docstring)."""

    def __init__(self, files: Mapping[str, str]):
        """*files*: file name -> text, read in name order as qrexec does."""
        self._rules: List[_Rule] = []
        for name in sorted(files):
            for lineno, line in enumerate(files[name].splitlines(), 1):
                rule = _parse_line(line, f"{name}:{lineno}")
                if rule:
                    self._rules.append(rule)

    @classmethod
    def from_dir(cls, policy_dir: pathlib.Path) -> "SubsetPolicy":
        return cls({p.name: p.read_text(encoding="ascii")
                    for p in pathlib.Path(policy_dir).glob("*.policy")})

    def evaluate(self, info: dict, source: str, service: str, argument: str,
                 target: str) -> Decision:
        """Decide for SOURCE calling SERVICE+ARGUMENT (ARGUMENT without '+')."""
        domains = info["domains"]
        if not target:
            target = "@default"
        elif not target.startswith("@") and target not in domains:
            target = "@default"
        argument = "+" + argument
        for rule in self._rules:
            if (_matches_but_target(rule, domains, service, argument, source)
                    and _token_match(rule.target, target, domains)):
                return self._apply(rule, domains, service, argument, source,
                                   target)
        return Decision("deny")

    def _apply(self, rule: _Rule, domains: dict, service: str, argument: str,
               source: str, target: str) -> Decision:
        if rule.action == "deny":
            return Decision("deny")
        if rule.action == "allow":
            actual = rule.params.get("target", target)
            if actual == "@default":
                return Decision("deny")
            return Decision("allow", target="dom0" if actual in _DOM0_NAMES
                            else actual)
        if "target" in rule.params:
            choices = {"dom0" if rule.params["target"] in _DOM0_NAMES
                       else rule.params["target"]}
        else:
            choices = self._targets_for_ask(domains, service, argument, source)
        if not choices:
            return Decision("deny")
        default = rule.params.get("default_target")
        if default in _DOM0_NAMES:
            default = "dom0"
        return Decision("ask", targets_for_ask=tuple(sorted(choices)),
                        default_target=default if default in choices else None)

    def _targets_for_ask(self, domains: dict, service: str, argument: str,
                         source: str) -> set:
        """qrexec's collect_targets_for_ask, for the tokens supported."""
        targets: set = set()
        for rule in reversed(self._rules):
            if not _matches_but_target(rule, domains, service, argument, source):
                continue
            token = rule.params.get("target", rule.target) \
                if rule.action != "deny" else rule.target
            expansion = _expand(token, domains)
            if rule.action == "deny":
                targets -= expansion
            else:
                targets |= expansion
        targets.discard(source)
        return targets


def _parse_line(line: str, where: str) -> Optional[_Rule]:
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    if line.startswith("!"):
        raise PolicyError(f"{where}: directive not supported: {line.split()[0]}")
    fields = line.split()
    if len(fields) < 5:
        raise PolicyError(f"{where}: expected at least 5 fields")
    service, argument, source, target, action, *raw_params = fields
    if action not in _ACTIONS:
        raise PolicyError(f"{where}: invalid action {action!r}")
    params = dict(p.split("=", 1) for p in raw_params if "=" in p)
    if len(params) != len(raw_params) or not set(params) <= _PARAMS[action]:
        raise PolicyError(f"{where}: unsupported parameters {raw_params}")
    for token in (source, target, *[params[k] for k in ("target", "default_target")
                                     if k in params]):
        if token.startswith("@") and not token.startswith(
                ("@anyvm", "@adminvm", "@tag:", "@type:", "@default")):
            raise PolicyError(f"{where}: unsupported token {token!r}")
    return _Rule(None if service == "*" else service,
                 None if argument == "*" else argument,
                 source, target, action, params)


def _matches_but_target(rule: _Rule, domains: dict, service: str,
                        argument: str, source: str) -> bool:
    return ((rule.service is None or rule.service == service)
            and (rule.argument is None or rule.argument == argument)
            and _token_match(rule.source, source, domains))


def _token_match(token: str, other: str, domains: dict) -> bool:
    """Whether policy *token* matches the request's *other* (source/target)."""
    if token == "*":
        return True
    if token == "@anyvm":
        return other not in _DOM0_NAMES
    if token in _DOM0_NAMES:
        return other in _DOM0_NAMES
    for prefix, key in (("@tag:", "tags"), ("@type:", "type")):
        if token.startswith(prefix):
            value = token[len(prefix):]
            info = domains.get(other)
            return info is not None and (value in info[key] if key == "tags"
                                         else value == info[key])
    return token == other


def _expand(token: str, domains: dict) -> set:
    """The qube names a token stands for, as a choice for 'ask'."""
    names = {n for n in domains if not n.startswith("uuid:")}
    if token in _DOM0_NAMES:
        return {"dom0"}
    if token == "@default":
        return set()
    if token in ("*", "@anyvm"):
        return {n for n in names if token == "*" or n not in _DOM0_NAMES}
    if token.startswith(("@tag:", "@type:")):
        return {n for n in names if _token_match(token, n, domains)}
    return {token} if token in names else set()


class QubesPolicy:
    """Qubes' own parser and evaluator over a policy directory."""

    def __init__(self, parser_module, policy_dir: pathlib.Path):
        self._parser = parser_module
        self._policy = parser_module.FilePolicy(
            policy_path=pathlib.Path(policy_dir))

    def evaluate(self, info: dict, source: str, service: str, argument: str,
                 target: str) -> Decision:
        return evaluate_with_parser(self._parser, self._policy, info, source,
                                    service, argument, target)


def evaluate_with_parser(parser, policy, info: dict, source: str, service: str,
                         argument: str, target: str) -> Decision:
    """Evaluate with a policy object of ``qrexec.policy.parser``."""
    from qrexec.exc import AccessDenied  # pylint: disable=import-outside-toplevel
    try:
        request = parser.Request(service, "+" + argument, source, target,
                                 system_info=info)
        resolution = policy.evaluate(request)
    except AccessDenied:
        return Decision("deny")
    if isinstance(resolution, parser.AskResolution):
        return Decision("ask", targets_for_ask=tuple(sorted(
            resolution.targets_for_ask)),
            default_target=resolution.default_target)
    return Decision("allow", target=str(resolution.target))


def qubes_parser():
    """``qrexec.policy.parser`` from the system, or from the folder named by
    QUBES_GPU_SHARE_QUBES_PATH (the Makefile passes on the developer's);
    None without both."""
    try:
        return importlib.import_module("qrexec.policy.parser")
    except ImportError:
        extra = os.environ.get("QUBES_GPU_SHARE_QUBES_PATH", "")
        if not extra or extra in sys.path:
            return None
        sys.path.append(extra)
        try:
            return importlib.import_module("qrexec.policy.parser")
        except ImportError:
            return None


def load_policy(policy_dir: pathlib.Path):
    """The best evaluator available for *policy_dir*."""
    parser = qubes_parser()
    if parser is None:
        return SubsetPolicy.from_dir(policy_dir)
    return QubesPolicy(parser, policy_dir)

"""The simulated qrexec: routes calls between local service sockets.

For tests and ``make demo`` the qubes are processes on one machine, each
with a directory of service sockets (what /etc/qubes-rpc is in a qube).
A call goes the way qrexec takes it:

1. a call from a qube is evaluated against the policy directory (Qubes'
   own parser where available, :mod:`.policy_eval`); deny, or an ``ask``
   nobody can answer, gives status 126 like ``qrexec-client-vm``. A call
   from dom0 is not evaluated: dom0 calls qubes with ``qrexec-client``
   straight through qrexec-daemon (qubesadmin's ``vm.run_service``), which
   never consults policy.
2. the service is looked up in the target's directory as ``NAME+ARG``,
   then ``NAME``; it must be a socket (status 127 when absent);
3. the router connects and writes the descriptor qrexec writes (dom0 form
   when the target is dom0, qube form otherwise), then the caller's bytes,
   shutting down the write side at the caller's EOF, and returns the answer
   with status 0 as qrexec does for socket services.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import stat
from typing import Iterable, Mapping, Optional

from .. import unixserver
from ..names import DOM0
from . import call
from .descriptor import ServiceDescriptor
from .policy_eval import Decision, load_policy, system_info


class Router:
    """Routes calls among *service_dirs* (qube name -> socket directory,
    dom0 included) under the policy in *policy_dir*.

    *tags* gives the qubes' tags (for ``@tag:`` rules). *assume_yes_for_ask*
    answers ``ask`` with its default target, as qrexec-policy-exec's option
    of that name does; otherwise ``ask`` is denied (nobody to ask).
    """

    def __init__(self, policy_dir: os.PathLike | str,
                 service_dirs: Mapping[str, os.PathLike | str], *,
                 tags: Optional[Mapping[str, Iterable[str]]] = None,
                 assume_yes_for_ask: bool = False, policy=None):
        #: qube name -> its directory of service sockets
        self.service_dirs = {name: pathlib.Path(d)
                             for name, d in service_dirs.items()}
        tags = tags or {}
        self._info = system_info({name: tags.get(name, ())
                                  for name in self.service_dirs})
        self._policy = policy or load_policy(pathlib.Path(policy_dir))
        self._assume_yes = assume_yes_for_ask

    @classmethod
    def from_root(cls, root: os.PathLike | str, *,
                  assume_yes_for_ask: bool = False) -> "Router":
        """The router of the simulated system under *root* (simsys/layout.py
        has the layout), built the same way by every process of it: policy
        from ROOT/policy; one service directory ROOT/NAME/rpc per qube of
        ROOT/qubes.json (dom0 always), tags from there. Without qubes.json
        (tests with a stand-in broker) every ROOT/NAME/rpc found is a qube
        without tags."""
        root = pathlib.Path(root)
        tags = _model_tags(root / "qubes.json")
        if tags is None:
            tags = {path.parent.name: () for path in root.glob("*/rpc")}
        names = {DOM0, *tags}
        return cls(root / "policy", {name: root / name / "rpc"
                                     for name in names},
                   tags=tags, assume_yes_for_ask=assume_yes_for_ask)

    def caller(self, source: str) -> "RoutedCaller":
        """A :class:`.call.DuplexCaller` making calls as *source*."""
        return RoutedCaller(self, source)

    def resolve(self, source: str, service_with_arg: str,
                target: str) -> Optional[str]:
        """The qube the call goes to, or None when policy refuses it."""
        service, _plus, argument = service_with_arg.partition("+")
        if source == DOM0:
            return DOM0 if target in ("@adminvm", DOM0) else target
        decision = self._policy.evaluate(self._info, source, service, argument,
                                         target)
        return self._target_of(decision)

    def _target_of(self, decision: Decision) -> Optional[str]:
        if decision.action == "allow":
            return decision.target
        if decision.action == "ask" and self._assume_yes:
            return decision.default_target
        return None

    def find_service(self, target: str, service_with_arg: str) -> Optional[pathlib.Path]:
        """``NAME+ARG`` then ``NAME`` in the target's directory, if a socket."""
        directory = self.service_dirs.get(target)
        if directory is None:
            return None
        name = service_with_arg.partition("+")[0]
        for candidate in (service_with_arg, name):
            path = directory / candidate
            try:
                if stat.S_ISSOCK(path.stat().st_mode):
                    return path
            except OSError:
                continue
        return None

    async def open(self, source: str, target: str,
                   service_with_arg: str) -> call.Conversation:
        """Open the call as qrexec would; failures become exit statuses."""
        if "+" not in service_with_arg:
            service_with_arg += "+"
        resolved = self.resolve(source, service_with_arg, target)
        if resolved is None:
            return _failed(target, service_with_arg, call.EXIT_REFUSED)
        if resolved == source:
            # qrexec cannot connect a domain to itself (qubes-issues #951).
            return _failed(target, service_with_arg, call.EXIT_PROBLEM)
        path = self.find_service(resolved, service_with_arg)
        if path is None:
            return _failed(target, service_with_arg, call.EXIT_NOT_FOUND)
        try:
            reader, writer = await unixserver.open_unix_connection(str(path))
        except OSError:
            return _failed(target, service_with_arg, call.EXIT_PROBLEM)
        writer.write(self.descriptor(source, target, resolved,
                                     service_with_arg).encode())
        return call.Conversation(target, service_with_arg, reader, writer,
                                 _exit_zero)

    @staticmethod
    def descriptor(source: str, intended: str, resolved: str,
                   service_with_arg: str) -> ServiceDescriptor:
        """The descriptor qrexec writes for this call (qrexec-daemon.c)."""
        service, _plus, argument = service_with_arg.partition("+")
        if resolved != DOM0:
            return ServiceDescriptor(service, argument, source)
        if intended.startswith("@"):
            return ServiceDescriptor(service, argument, source,
                                     "keyword", intended[1:])
        return ServiceDescriptor(service, argument, source, "name", intended)


class RoutedCaller(call.ConversationCaller):
    """Calls made by one simulated qube through the router."""

    def __init__(self, router: Router, source: str):
        self._router = router
        self.source = source

    async def open_service(self, target: str,
                           service_with_arg: str) -> call.Conversation:
        return await self._router.open(self.source, target, service_with_arg)


#: qubes.json is written by the simulation itself, but read bounded anyway
_MAX_MODEL = 1 << 20


def _model_tags(path: pathlib.Path) -> Optional[dict[str, tuple[str, ...]]]:
    """qube name -> tags from a simulated qubes.json, None if absent."""
    try:
        with open(path, "rb") as file:
            data = file.read(_MAX_MODEL + 1)
    except FileNotFoundError:
        return None
    if len(data) > _MAX_MODEL:
        raise ValueError(f"{path}: larger than {_MAX_MODEL} bytes")
    return {str(qube["name"]): tuple(map(str, qube.get("tags", ())))
            for qube in json.loads(data)["qubes"]}


async def _exit_zero() -> int:
    return 0


def _failed(target: str, service_with_arg: str, status: int) -> call.Conversation:
    """A call that ended before reaching a service: no output, *status*."""
    reader = asyncio.StreamReader()
    reader.feed_eof()

    async def wait_status() -> int:
        return status

    return call.Conversation(target, service_with_arg, reader, None, wait_status)

"""The service descriptor qrexec writes first to a socket service.

qrexec connects to the service socket and, before the caller's bytes, writes
one NUL-terminated line (qubes-core-qrexec, libqrexec/exec.c: "send part
after 'QUBESRPC ', including trailing NUL"; the line itself is built by
daemon/qrexec-daemon.c and qrexec_policy_exec.py):

- target dom0: ``SERVICE+ARG SOURCE TARGET_TYPE TARGET`` where TARGET_TYPE is
  ``name`` (the caller named ``dom0``) or ``keyword`` (the caller named a
  ``@token``; the ``@`` is stripped, e.g. ``keyword adminvm``);
- target a qube: ``SERVICE+ARG SOURCE``.

qrexec always appends ``+`` when the call had no argument. The source is set
by qrexec and cannot be forged by the caller, so it is the only place a
service learns who called; the argument, however, is the caller's choice.
The parser is strict (one space between fields, qrexec's character set,
valid qube names) and bounded; :func:`encode` writes the same bytes, for the
simulated router.
"""

from __future__ import annotations

import dataclasses
import re
import string
from typing import Optional

from ..names import DOM0, InvalidName, parse_qube_name

#: Longest descriptor accepted, NUL included. qrexec allows 65000 bytes for
#: SERVICE+ARG; every call of this project fits in far less (a service name,
#: a qube name or lease id, a qube name and a target), so anything longer is
#: refused before it is looked at.
MAX_DESCRIPTOR_LEN = 256
#: qrexec's limit on the service name part (NAME_MAX, it is a file name).
MAX_SERVICE_LEN = 64

#: qrexec's RPCNAME_ALLOWED_CHARSET: what service names and arguments may hold.
RPC_CHARSET = frozenset(string.ascii_letters + string.digits + "+-._")
_SERVICE = re.compile(r"[A-Za-z0-9._-]{1,%d}" % MAX_SERVICE_LEN)
_ARGUMENT = re.compile(r"[A-Za-z0-9+._-]*")
#: Keywords qrexec may write after ``keyword`` for a call that reached dom0.
_DOM0_KEYWORDS = frozenset({"adminvm", "default"})
#: The target of ``name`` type qrexec accepts as meaning dom0 besides "dom0".
_DOM0_UUID = "uuid:00000000-0000-0000-0000-000000000000"
TARGET_TYPES = ("name", "keyword")


def is_service_call(name: str) -> bool:
    """Whether ``name`` is ``SERVICE`` or ``SERVICE+ARG`` as qrexec names a
    call: the same rules as the descriptor's first field (what a caller
    asks qrexec for is what the service will be told)."""
    service, _plus, argument = name.partition("+")
    return bool(_SERVICE.fullmatch(service) and _ARGUMENT.fullmatch(argument))


class DescriptorError(ValueError):
    """A service descriptor that is not what qrexec writes."""


@dataclasses.dataclass(frozen=True)
class ServiceDescriptor:
    """A parsed descriptor: who called which service with what argument.

    ``target_type``/``target`` are set only in the dom0 form.
    """

    service: str
    argument: str
    source: str
    target_type: Optional[str] = None
    target: Optional[str] = None

    def __post_init__(self) -> None:
        # Construction and parsing share one set of rules.
        _check_service(self.service)
        _check_argument(self.argument)
        _check_source(self.source)
        _check_target(self.target_type, self.target)

    @property
    def service_with_arg(self) -> str:
        """``SERVICE+ARG`` as qrexec names the call (``+`` always present)."""
        return f"{self.service}+{self.argument}"

    @property
    def to_dom0(self) -> bool:
        """Whether this is the dom0 form (the call was addressed to dom0)."""
        return self.target_type is not None

    def encode(self) -> bytes:
        """The bytes qrexec writes, trailing NUL included."""
        fields = [self.service_with_arg, self.source]
        if self.to_dom0:
            fields += [self.target_type, self.target]
        return " ".join(fields).encode("ascii") + b"\0"


def parse_descriptor(untrusted_line: bytes) -> ServiceDescriptor:
    """Parse one descriptor, with or without its trailing NUL.

    Raises :class:`DescriptorError` (one line, no echo of long input) on
    anything qrexec would not have written.
    """
    if len(untrusted_line) > MAX_DESCRIPTOR_LEN:
        raise DescriptorError(
            f"service descriptor longer than {MAX_DESCRIPTOR_LEN} bytes")
    if untrusted_line.endswith(b"\0"):
        untrusted_line = untrusted_line[:-1]
    if b"\0" in untrusted_line:
        raise DescriptorError("NUL inside service descriptor")
    try:
        untrusted_text = untrusted_line.decode("ascii")
    except UnicodeDecodeError:
        raise DescriptorError("service descriptor is not ASCII") from None
    untrusted_fields = untrusted_text.split(" ")
    if len(untrusted_fields) not in (2, 4):
        raise DescriptorError(
            f"service descriptor has {len(untrusted_fields)} fields, "
            "expected 2 (qube) or 4 (dom0)")
    untrusted_call, untrusted_source = untrusted_fields[:2]
    untrusted_service, _plus, untrusted_argument = untrusted_call.partition("+")
    target_type = target = None
    if len(untrusted_fields) == 4:
        target_type, target = untrusted_fields[2:]
    return ServiceDescriptor(service=untrusted_service,
                             argument=untrusted_argument,
                             source=untrusted_source,
                             target_type=target_type, target=target)


def _check_service(untrusted_service: str) -> None:
    if not _SERVICE.fullmatch(untrusted_service):
        raise DescriptorError(f"invalid service name {untrusted_service[:40]!r}")


def _check_argument(untrusted_argument: str) -> None:
    if not _ARGUMENT.fullmatch(untrusted_argument):
        raise DescriptorError(
            f"invalid service argument {untrusted_argument[:40]!r}")


def _check_source(untrusted_source: str) -> None:
    try:
        parse_qube_name(untrusted_source)
    except InvalidName as exc:
        raise DescriptorError(f"invalid source: {exc}") from None


def _check_target(untrusted_type: Optional[str],
                  untrusted_target: Optional[str]) -> None:
    if untrusted_type is None and untrusted_target is None:
        return
    if untrusted_type == "keyword":
        if untrusted_target not in _DOM0_KEYWORDS:
            raise DescriptorError(
                f"unexpected target keyword {str(untrusted_target)[:40]!r}")
    elif untrusted_type == "name":
        if untrusted_target not in (DOM0, _DOM0_UUID):
            raise DescriptorError(
                f"dom0 form names target {str(untrusted_target)[:40]!r}, "
                "not dom0")
    else:
        raise DescriptorError(
            f"invalid target type {str(untrusted_type)[:40]!r}")

"""The protocol's values: every range and charset in one place, the
errors, the enumerated values, and the reading of untrusted header
fields.

Every message checks its own fields on construction with these helpers
(the ``_check_*`` functions), and every decoder takes its header's
``key=value`` pairs through :class:`_Fields`, so a range or a charset is
written once, whichever message carries the value. Whatever goes wrong
is a :class:`ProtocolError` with a one-line reason, the only exception a
decoder raises.
"""

from __future__ import annotations

import contextlib
import enum
import re
from collections.abc import Iterator

from .. import names, uint
from ..formats import InvalidLayout
from ..oneline import MAX_LEN

MAX_DOMID = names.MAX_DOMID
MAX_TTL = 365 * 24 * 3600
MAX_DEADLINE = 2**40
#: An error message or a busy reason: one line (see :mod:`..oneline`).
MAX_TEXT = MAX_LEN

_TOKEN = re.compile(r"[a-z][a-z0-9-]{0,39}")
_TEXT = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,%d}[\x21-\x7e])?"
                   % (MAX_TEXT - 2))


class ProtocolError(ValueError):
    """A message that is not well formed; ``str()`` is one line."""

    #: the Error reason code an answering service sends for it
    code = "malformed"


class Role(str, enum.Enum):
    """Which side of a lease a qube is on."""

    CONSUMER = "consumer"
    PROVIDER = "provider"


class RevokeStatus(str, enum.Enum):
    """An agent's answer to a revoke request."""

    RELEASED = "released"
    BUSY = "busy"


# --- value checks (one place for every range and charset) -----------------

@contextlib.contextmanager
def _reason_as_protocol_error() -> Iterator[None]:
    """Names and layouts have their own checks; report them as ours."""
    try:
        yield
    except (InvalidLayout, names.InvalidName) as exc:
        raise ProtocolError(str(exc)) from None


def _check_uint(what: str, value: int, high: int, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{what} must be an integer")
    if not low <= value <= high:
        raise ProtocolError(f"{what} {value} is outside {low}..{high}")
    return value


def _check_pattern(what: str, pattern: re.Pattern, value: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ProtocolError(f"invalid {what} {str(value)[:40]!r}")
    return value


def _check_enum(enum_cls: type[enum.Enum], value,
                label: str | None = None) -> enum.Enum:
    try:
        return enum_cls(value)
    except ValueError:
        raise ProtocolError(
            f"invalid {label or 'value'} {str(value)[:20]!r}: not a "
            f"{enum_cls.__name__}") from None


def _set_enum(message, name: str, enum_cls: type[enum.Enum]) -> None:
    """Check an enum field of a frozen message and store the enum member,
    so that "cpu" and ReceiveMode.CPU make the same message."""
    object.__setattr__(message, name,
                       _check_enum(enum_cls, getattr(message, name), name))


def _check_qube(value: str) -> str:
    with _reason_as_protocol_error():
        return names.parse_qube_name(value)


def _check_lease(value: str) -> str:
    with _reason_as_protocol_error():
        return names.parse_lease_id(value)


# --- untrusted header fields ----------------------------------------------

def _parse_uint(what: str, untrusted_value: str) -> int:
    """Syntax only (digits, no sign, no leading zero, no blanks); ranges
    are checked by the message the number goes into."""
    value = uint.parse_uint(untrusted_value)
    if value is None:
        raise ProtocolError(
            f"{what} is not a plain decimal number: {untrusted_value[:24]!r}")
    return value


class _Fields:
    """The key=value pairs of one header, taken out one by one so that a key
    nobody asked for is caught at the end (:meth:`finish`)."""

    def __init__(self, untrusted_items: dict[str, str]):
        self._untrusted = untrusted_items

    def text(self, key: str) -> str:
        """The raw value, still untrusted: the message's checks validate."""
        try:
            return self._untrusted.pop(key)
        except KeyError:
            raise ProtocolError(f"missing key {key!r}") from None

    def has(self, key: str) -> bool:
        return key in self._untrusted

    def uint(self, key: str) -> int:
        return _parse_uint(key, self.text(key))

    def finish(self) -> None:
        if self._untrusted:
            raise ProtocolError(
                f"unknown key {sorted(self._untrusted)[0]!r}")

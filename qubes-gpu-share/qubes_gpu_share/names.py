"""Validation of names that arrive from qubes: qube names and lease ids.

One place for the two identifiers that every layer passes around. Each
``parse_*`` takes an ``untrusted_`` value and returns the validated one or
raises :class:`InvalidName` with a one-line reason.
"""

from __future__ import annotations

import re
import secrets

#: Qubes' own rule for qube names (qubes.vm.validate_name): a letter first,
#: then letters, digits, '_', '.', '-'; at most 31 characters.
_QUBE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}")
#: Names Qubes refuses although they match the pattern.
_RESERVED = frozenset({"none", "default", "Domain-0"})
DOM0 = "dom0"

#: Xen's DOMID_FIRST_RESERVED: ids from here on are Xen's own (DOMID_SELF,
#: DOMID_IO...) and name no real domain; MAX_DOMID is the largest real one.
DOMID_FIRST_RESERVED = 0x7FF0
MAX_DOMID = DOMID_FIRST_RESERVED - 1

LEASE_ID_BYTES = 16
_LEASE_ID = re.compile(r"[0-9a-f]{32}")


class InvalidName(ValueError):
    """A qube name or lease id that is not well formed."""


def parse_qube_name(untrusted_name: str | bytes) -> str:
    """Return a syntactically valid qube name (existence is checked later)."""
    if isinstance(untrusted_name, bytes):
        try:
            untrusted_name = untrusted_name.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidName("qube name is not ASCII") from None
    if not _QUBE_NAME.fullmatch(untrusted_name):
        raise InvalidName(f"invalid qube name {untrusted_name[:40]!r}")
    if untrusted_name in _RESERVED or untrusted_name.endswith("."):
        raise InvalidName(f"reserved qube name {untrusted_name!r}")
    return untrusted_name


def new_lease_id() -> str:
    """128 random bits as 32 lowercase hex digits."""
    return secrets.token_hex(LEASE_ID_BYTES)


def parse_lease_id(untrusted_id: str | bytes) -> str:
    """Return a lease id in its one canonical form (32 lowercase hex)."""
    if isinstance(untrusted_id, bytes):
        try:
            untrusted_id = untrusted_id.decode("ascii")
        except UnicodeDecodeError:
            raise InvalidName("lease id is not ASCII") from None
    if not _LEASE_ID.fullmatch(untrusted_id):
        raise InvalidName("lease id must be 32 lowercase hex digits")
    return untrusted_id

"""What every message is: a type line and a frozen dataclass that checks
itself on construction.

The message modules (:mod:`.qube_calls`, :mod:`.agent_calls`,
:mod:`.lease_list`, :mod:`.replies`) subclass :class:`_Message`, each
saying how its fields become header pairs and a payload and back;
:mod:`.wire` frames them. Because a message cannot be built illegal,
whatever encodes also decodes, to an equal message.
"""

from __future__ import annotations

import enum
from typing import ClassVar

from .fields import _Fields


class MessageType(str, enum.Enum):
    """The second line of every message."""

    LEASE_REQUEST = "lease-request"
    OFFER_REQUEST = "offer-request"
    EXPORT_REQUEST = "export-request"
    EXPORT_ANSWER = "export-answer"
    LEASE_ANSWER = "lease-answer"
    RELEASE_REQUEST = "release-request"
    REVOKE_REQUEST = "revoke-request"
    REVOKE_ANSWER = "revoke-answer"
    LIST_REQUEST = "list-request"
    LEASE_LIST = "lease-list"
    OK = "ok"
    ERROR = "error"


class _Message:
    """Base of every message: a frozen dataclass that checks itself."""

    TYPE: ClassVar[MessageType]
    #: header key holding the payload count: "refs" (binary u32 array),
    #: "leases" (text lines), or None (no payload)
    COUNT_KEY: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        self._check()

    def _check(self) -> None:
        """Raise ProtocolError unless every field is legal."""

    def _fields(self) -> list[tuple[str, object]]:
        return []

    def _payload(self) -> bytes:
        return b""

    @classmethod
    def _parse(cls, fields: _Fields, untrusted_payload: bytes):
        return cls()

"""The two answers any call may get: done (:class:`Ok`), or refused
(:class:`Error`, a stable code for programs and one line for people).

Every service answers a request it refuses with an Error, whoever the
caller, so the refusal has one form: :meth:`Error.of` makes any text,
an exception's included, a legal one-line message (:mod:`..oneline`).
"""

from __future__ import annotations

import dataclasses

from ..oneline import one_line
from .fields import _TEXT, _TOKEN, MAX_TEXT, _check_pattern
from .message import MessageType, _Message


@dataclasses.dataclass(frozen=True)
class Ok(_Message):
    """The request was done."""

    TYPE = MessageType.OK


@dataclasses.dataclass(frozen=True)
class Error(_Message):
    """The request was refused: a stable reason code for programs and a
    one-line message for people."""

    TYPE = MessageType.ERROR
    code: str
    message: str

    def _check(self) -> None:
        _check_pattern("error code", _TOKEN, self.code)
        _check_pattern("error message", _TEXT, self.message)

    @classmethod
    def of(cls, code: str, message: str) -> Error:
        """An Error from any text (e.g. an exception's), made one line."""
        return cls(code, one_line(message, limit=MAX_TEXT))

    def _fields(self):
        return [("code", self.code), ("message", self.message)]

    @classmethod
    def _parse(cls, fields, untrusted_payload):
        return cls(fields.text("code"), fields.text("message"))

"""How a socket service tells its caller whether the call succeeded.

An executable qrexec service reports its exit status to the caller
(``qrexec-client-vm`` exits with it). A socket service cannot: qrexec has no
process to wait for and always reports 0 (libqrexec/process_io.c sends exit
code 0 when there is no local process). So, like qubesd's Admin API answers
(``0\\0`` + payload on success), the status travels in-band, first in the
answer:

- success: ``0\\0`` followed by the service's payload;
- refusal: ``1\\0`` followed by one line of ASCII reason.

Non-zero exit statuses then mean only what qrexec itself says (126 policy
denied, 125 qrexec trouble, 127 no such service), see :mod:`.call`.
"""

from __future__ import annotations

from ..oneline import MAX_LEN, one_line

OK_PREFIX = b"0\0"
ERROR_PREFIX = b"1\0"
#: Longest reason passed on; a reason is one line for a log and a terminal.
MAX_REASON_LEN = MAX_LEN


class ServiceRefused(Exception):
    """The service answered with a refusal; str() is its one-line reason."""


class BadReply(ValueError):
    """The answer does not start with a status this convention defines."""


def ok_reply(payload: bytes = b"") -> bytes:
    """The answer for a successful call."""
    return OK_PREFIX + payload


def error_reply(reason: str) -> bytes:
    """The answer for a refused call: one line of printable ASCII."""
    return ERROR_PREFIX + _one_line(reason).encode("ascii") + b"\n"


def parse_reply(untrusted_output: bytes) -> bytes:
    """Return the payload of a successful answer.

    Raises :class:`ServiceRefused` with the (sanitised) reason on a refusal,
    :class:`BadReply` on anything else.
    """
    if untrusted_output.startswith(OK_PREFIX):
        return untrusted_output[len(OK_PREFIX):]
    if untrusted_output.startswith(ERROR_PREFIX):
        untrusted_reason = untrusted_output[len(ERROR_PREFIX):]
        raise ServiceRefused(_one_line(
            untrusted_reason.decode("ascii", "replace")))
    raise BadReply("answer does not start with a status")


def _one_line(text: str) -> str:
    """Printable ASCII only, one line, bounded: safe to log and print."""
    return one_line(text, limit=MAX_REASON_LEN, mark="_", empty="refused")

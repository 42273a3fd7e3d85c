"""Unsigned decimal integers read from untrusted text (pure).

Feature values (:mod:`.limits`) and protocol header fields
(:mod:`.protocol`) carry numbers as text written by a qube or an admin.
Both read them the same strict way: ASCII digits only, no sign, no blanks,
no leading zero (one spelling per number, so that two readers cannot
disagree about a value), and at most :data:`MAX_DIGITS` digits, so that
nobody converts a megabyte of digits. Ranges are the caller's to check.
"""

from __future__ import annotations

import re

#: Enough for any u64 (18446744073709551615 has 20 digits).
MAX_DIGITS = 20
PATTERN = re.compile(r"0|[1-9][0-9]{0,%d}" % (MAX_DIGITS - 1))


def parse_uint(untrusted_text: object) -> int | None:
    """The number ``untrusted_text`` spells, or None unless it is a string
    in the strict form above."""
    if not isinstance(untrusted_text, str) or \
            not PATTERN.fullmatch(untrusted_text):
        return None
    return int(untrusted_text)

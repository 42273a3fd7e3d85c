"""The two shared readers of untrusted text: oneline.one_line (what goes
into logs, errors and replies) and uint.parse_uint (numbers in features
and protocol headers)."""

import pytest

from qubes_gpu_share.oneline import MAX_LEN, one_line
from qubes_gpu_share.uint import MAX_DIGITS, parse_uint


@pytest.mark.parametrize("text, kwargs, line", [
    ("plain", {}, "plain"),
    ("  two\nlines\x1b[31m \n", {}, "two?lines?[31m"),
    ("two\nlines", {"mark": "_"}, "two_lines"),
    ("caf\u00e9", {}, "caf?"),
    (" \n\t ", {}, "error"),
    ("", {"empty": "refused"}, "refused"),
    (ValueError("bad\nvalue"), {}, "bad?value"),
    ("x" * 10 + " " + "y" * 10, {"limit": 11}, "x" * 10),
])
def test_one_line(text, kwargs, line):
    assert one_line(text, **kwargs) == line


def test_one_line_is_bounded_printable_ascii():
    line = one_line("\x00\u2028" + "z" * 1000)
    assert len(line) == MAX_LEN and line.isascii() and line.isprintable()


@pytest.mark.parametrize("text, value", [
    ("0", 0), ("7", 7), ("18446744073709551615", 2**64 - 1),
    ("9" * MAX_DIGITS, 10**MAX_DIGITS - 1), ("9" * (MAX_DIGITS + 1), None),
    ("", None), ("01", None), ("+1", None), ("-1", None), (" 1", None),
    ("1 ", None), ("1_000", None), ("\u0661", None), ("0x10", None),
    (1, None), (None, None), (b"1", None),
])
def test_parse_uint(text, value):
    assert parse_uint(text) == value

"""The audit trail (broker/audit.py): values a qube wrote cannot forge a
field, one qube's flood is counted instead of drowning the others, and the
journal gets the lines with their identifier and fields."""

from __future__ import annotations

import logging
import os
import shlex
import socket

import pytest
from hypothesis import given, strategies as st

from qubes_gpu_share.broker import audit

LOGGER = "qubes_gpu_share.audit"


@pytest.fixture(autouse=True)
def fresh_limit(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(audit, "LIMIT", audit.PerQubeLimit(
        burst=5, window=10.0, clock=lambda: clock[0]))
    return clock


def lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def fields_of(line: str) -> dict[str, str]:
    """The key=value words of a line as a shell-style reader splits them
    (quotes and backslash escapes honoured)."""
    event, *words = shlex.split(line)
    return {"event": event,
            **dict(word.split("=", 1) for word in words)}


def test_a_value_from_a_qube_cannot_forge_a_field(caplog):
    lie = 'busy" consumer=victim provider=dom0 lease=x\nforged line'
    with caplog.at_level("INFO", logger=LOGGER):
        audit.decision("busy", reason=f"provider said: {lie}",
                       consumer="work", provider="evil", pages=3,
                       lease_id="ab" * 16)
    (line,) = lines(caplog)
    assert "\n" not in line
    fields = fields_of(line)
    assert (fields["consumer"], fields["provider"], fields["lease"]) == \
        ("work", "evil", "ab" * 16)
    assert fields["reason"].endswith("forged line")


@given(st.text(max_size=80))
def test_quote_is_one_word_that_reads_back(text):
    quoted = audit.quote(text)
    assert "\n" not in quoted and quoted.isascii()
    (word,) = shlex.split(quoted) if quoted != "" else [""]
    if text.isascii() and text.isprintable():
        assert word == text[:400]


def test_a_flooding_qube_is_counted_not_written(caplog, fresh_limit):
    with caplog.at_level("INFO", logger=LOGGER):
        for _ in range(1000):
            audit.decision("refused", reason="quota", consumer="work",
                           charged="work")
        audit.decision("granted", reason="ok", consumer="mail",
                       provider="gpu", charged="mail")
        fresh_limit[0] = 11.0  # the window is over
        audit.decision("refused", reason="quota", consumer="work",
                       charged="work")
    written = lines(caplog)
    assert sum(1 for l in written if l.startswith("refused")) == 5 + 1
    assert any(l.startswith("granted") and "consumer=mail" in l
               for l in written)  # the bystander's line is there
    (summary,) = [l for l in written if "suppressed" in l]
    assert summary == "work: 995 audit lines suppressed in 10 s (refused 995)"


def test_idle_windows_are_forgotten(fresh_limit):
    limit = audit.LIMIT
    for qube in ("a", "b", "c"):
        limit.allow(qube, "refused")
    fresh_limit[0] = 20.0
    limit.forget_idle()
    assert limit._windows == {}


def test_journal_gets_identifier_and_fields(tmp_path, monkeypatch):
    path = str(tmp_path / "journal.socket")
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(path)
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    logger = logging.getLogger(LOGGER)
    handlers, propagate = list(logger.handlers), logger.propagate
    try:
        assert audit.to_journal(path)
        logger.setLevel(logging.INFO)
        audit.decision("granted", reason='a "quoted" reason',
                       consumer="work", provider="sys-gpu", pages=2,
                       lease_id="cd" * 16)
        datagram = journal.recv(65536).decode()
    finally:
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers, logger.propagate = handlers, propagate
        journal.close()
    fields = dict(line.split("=", 1) for line in datagram.splitlines())
    assert fields["SYSLOG_IDENTIFIER"] == "qubes-gpu-share-audit"
    assert fields["GPU_SHARE_CONSUMER"] == "work"
    assert fields["GPU_SHARE_EVENT"] == "granted"
    assert fields["MESSAGE"].startswith("granted lease=" + "cd" * 16)


def test_no_journal_no_handler(monkeypatch, tmp_path):
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert not audit.to_journal(str(tmp_path / "none"))
    assert os.environ.get("JOURNAL_STREAM") is None

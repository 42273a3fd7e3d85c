"""ClientVmCaller: qrexec-client-vm's stderr becomes one log line per call,
bounded and named after the call (a stand-in program plays qrexec-client-vm,
as in tests/test_qrexec_router.py)."""

import asyncio
import logging

import pytest

from qubes_gpu_share.qrexec import call

LOGGER = "qubes_gpu_share.qrexec.call"


def fake_client_vm(tmp_path, body: str) -> call.ClientVmCaller:
    """A qrexec-client-vm whose shell *body* runs after its stdin was read
    and answered like a socket service (``0\\0`` then the input)."""
    fake = tmp_path / "qrexec-client-vm"
    fake.write_text('#!/bin/sh\n[ "$1 $2 $3" = "-- @adminvm qubes.GpuLeases+" ]'
                    f' || exit 99\nprintf "0\\0"; cat\n{body}\n')
    fake.chmod(0o755)
    return call.ClientVmCaller(str(fake))


def run_call(caller, payload=b"in"):
    return asyncio.run(caller.call_service("@adminvm", "qubes.GpuLeases+",
                                           payload, 100))


def records(caplog):
    return [r for r in caplog.records if r.name == LOGGER]


def test_failed_call_logs_its_stderr_once_as_a_warning_naming_the_call(
        tmp_path, caplog):
    caller = fake_client_vm(tmp_path, 'echo "Request refused" >&2; exit 126')
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        with pytest.raises(call.PolicyDenied):
            asyncio.run(call.call(caller, "@adminvm", "qubes.GpuLeases+",
                                  b"", 100))
    [record] = records(caplog)
    assert record.levelno == logging.WARNING
    assert record.getMessage() == ("qrexec-client-vm qubes.GpuLeases+ to "
                                   "@adminvm: exit status 126: Request refused")


def test_stderr_of_a_call_that_worked_is_debug(tmp_path, caplog):
    caller = fake_client_vm(tmp_path, 'echo "just chatting" >&2; exit 0')
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert run_call(caller) == (0, b"0\0in")
    [record] = records(caplog)
    assert record.levelno == logging.DEBUG
    assert record.getMessage().endswith(": exit status 0: just chatting")


def test_silent_call_logs_nothing(tmp_path, caplog):
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert run_call(fake_client_vm(tmp_path, "exit 0")) == (0, b"0\0in")
    assert records(caplog) == []


def test_lines_are_joined_and_control_characters_replaced(tmp_path, caplog):
    caller = fake_client_vm(
        tmp_path, r"printf 'process_io.c:355: Error\twhile vchan send\r\n\n"
                  r"\033[31mred\001\n' >&2; exit 125")
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert run_call(caller)[0] == 125
    [record] = records(caplog)
    assert record.getMessage().endswith(
        ": exit status 125: process_io.c:355: Error while vchan send | "
        "?[31mred?")


def test_a_flood_on_stderr_is_drained_bounded_and_counted(tmp_path, caplog):
    """1 MiB written to stderr before the answer: the program does not
    block on a full pipe, and the log line keeps STDERR_KEPT bytes."""
    caller = call.ClientVmCaller(str(tmp_path / "qrexec-client-vm"))
    (tmp_path / "qrexec-client-vm").write_text(
        "#!/bin/sh\nhead -c 1048576 /dev/zero | tr '\\0' x >&2\n"
        "printf '0\\0'; cat; exit 1\n")
    (tmp_path / "qrexec-client-vm").chmod(0o755)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        assert run_call(caller) == (1, b"0\0in")
    [record] = records(caplog)
    message = record.getMessage()
    assert "x" * call.STDERR_KEPT in message
    assert "x" * (call.STDERR_KEPT + 1) not in message
    assert message.endswith(f" | ({1048576 - call.STDERR_KEPT} more bytes "
                            "dropped)")


@pytest.mark.parametrize("data, dropped, line", [
    (b"", 0, ""),
    (b"\n \n", 0, ""),
    (b"one\ntwo\r\nthree", 0, "one | two | three"),
    ("caf\u00e9\n".encode(), 0, "caf??"),
    (b"a", 7, "a | (7 more bytes dropped)"),
])
def test_stderr_line(data, dropped, line):
    assert call.stderr_line(data, dropped) == line


def test_dom0_calls_a_qube_through_qrexec_client(tmp_path, caplog):
    """QrexecClientCaller: ``qrexec-client -d QUBE 'DEFAULT:QUBESRPC
    SERVICE+ARG dom0'``, stdin in, stdout out, its status; its stderr one
    line naming the call."""
    fake = tmp_path / "qrexec-client"
    fake.write_text(
        '#!/bin/sh\n'
        '[ "$1|$2|$3" = "-d|work|DEFAULT:QUBESRPC qubes.GpuRevoke+ dom0" ]'
        ' || exit 99\nprintf "0\\0"; cat\necho "vchan closed" >&2\nexit 3\n')
    fake.chmod(0o755)
    caller = call.QrexecClientCaller(str(fake))
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        status, output = asyncio.run(caller.call_service(
            "work", "qubes.GpuRevoke+", b"payload", 100))
    assert (status, output) == (3, b"0\0payload")
    (record,) = records(caplog)
    assert record.levelno == logging.WARNING
    assert record.getMessage() == ("qrexec-client qubes.GpuRevoke+ to work: "
                                   "exit status 3: vchan closed")

"""Processes of the simulated system: start, wait for a socket, stop, log.

Every part of the simulation (the grant hypervisor, the broker, one agent
per qube) is a separate process, as on Qubes, so that killing one is what a
crash is. Each writes stdout and stderr to its own log file, which a test
reads when something went wrong.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent() -> None:
    """In the child: be killed when the process that started us dies, so a
    test runner that crashes or is killed leaves no simulated qube behind
    (each child has its own session, so no signal reaches it otherwise)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class SimProcessError(RuntimeError):
    """A simulated process did not come up; the message ends with its log."""


class SimProcess:
    """One running process of the simulation, logging to *log_path*."""

    def __init__(self, name: str, argv: Sequence[str],
                 log_path: os.PathLike | str, env: dict[str, str] | None = None):
        self.name = name
        self.argv = list(argv)
        self.log_path = pathlib.Path(log_path)
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=subprocess.STDOUT, env=env, start_new_session=True,
                preexec_fn=_die_with_parent)
        log.debug("started %s (pid %d): %s", name, self.proc.pid,
                  " ".join(self.argv))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_socket(self, path: os.PathLike | str, timeout: float = 10.0) -> None:
        """Return once *path* accepts connections; raise if the process
        exits or the time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise SimProcessError(
                    f"{self.name} exited with {self.proc.returncode} before "
                    f"listening on {path}\n{self.log_tail()}")
            if _accepts(path):
                return
            time.sleep(0.02)
        raise SimProcessError(f"{self.name} did not listen on {path} in "
                              f"{timeout:g} s\n{self.log_tail()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send *sig* (a crash by default) and reap the process."""
        if sig in (signal.SIGSTOP, signal.SIGCONT):
            raise ValueError("a stopped process is not reaped: use pause()")
        if self.running():
            self.proc.send_signal(sig)
        self.proc.wait()

    def pause(self, paused: bool = True) -> None:
        """Freeze the process (SIGSTOP) or let it go on (SIGCONT): a domain
        that hangs mid-call, which a test then may kill()."""
        if self.running():
            self.proc.send_signal(signal.SIGSTOP if paused
                                  else signal.SIGCONT)

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, then SIGKILL after *timeout*; returns the exit status."""
        if self.running():
            self.proc.terminate()
            self.proc.send_signal(signal.SIGCONT)  # if paused: act on it
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s ignored SIGTERM for %g s: killed",
                            self.name, timeout)
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_text(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.log_path.read_text(errors="replace")
        return ""

    def log_tail(self, lines: int = 30) -> str:
        tail = self.log_text().splitlines()[-lines:]
        return "\n".join(f"  {self.name}| {line}" for line in tail)


def _accepts(path: os.PathLike | str) -> bool:
    """Whether a stream (qrexec) or packet (app.sock) socket listens."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET):
        with socket.socket(socket.AF_UNIX, kind) as probe:
            if probe.connect_ex(str(path)) == 0:
                return True
    return False


def python_module(module: str, *args: str) -> list[str]:
    """argv running ``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a simulated process: ours (so that
    QUBES_GPU_SHARE_QUBES_PATH reaches it), minus any grant-device choice
    of our own, plus *extra*."""
    env = dict(os.environ)
    env.pop("QUBES_GPU_SHARE_GRANT", None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def signal_name(status: int | None) -> str:
    """``exit 3`` or ``killed by SIGKILL``, for reports."""
    if status is None:
        return "running"
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return f"exit {status}"

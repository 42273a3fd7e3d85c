"""``qubes-gpu-share lease``: borrow a buffer from another qube, and hold it.

A lease lives as long as the application's connection to the agent: the
agent releases everything a connection holds when it closes. A command that
printed a lease and exited would hand out a lease that is already gone, so
this command holds the lease while it runs: until interrupted, until
``--hold SECONDS`` elapsed, or, with ``--exec``, as long as the command it
starts (which inherits the buffer's fd). A revoke notice from dom0 ends the
hold early, in the order DESIGN.md demands (the child first, then the
release).

The options and helpers shared by the other application commands (offer,
list, release) live here too, so that they spell things the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..client import (APP_SOCKET, DOM0_APP_SOCKET, ENV_SOCKET, Client,
                      ClientError, LeasedBuffer)
from ..formats import (BLOB, MAX_DIMENSION, MAX_LEASE_BYTES, PAGE_SIZE,
                       BlobSpec, BufferMeta, BufferSpec, ImageSpec,
                       ReceiveMode, check_spec)
from ..protocol import MAX_TTL

NAME = "lease"
SUMMARY = "borrow a buffer from another qube and hold it while running"

DESCRIPTION = """\
Ask this qube's agent for a new buffer from the qube PROVIDER (a pull
lease): an image of --size and --format, or --bytes of plain memory. dom0's
qrexec policy (qubes.GpuLease+PROVIDER) and the broker's quotas decide; a
refusal is printed as one line with its reason.

A lease lives only as long as the connection to the agent, so the command
holds it while it runs:

  * by default it prints the lease and waits until interrupted (Ctrl-C,
    SIGTERM) or, with --hold, for SECONDS; then it releases the lease;
  * with --exec, it starts COMMAND with the buffer's fd inherited and its
    description in the environment, and releases the lease when COMMAND
    exits (the exit status is COMMAND's).

If dom0 revokes the lease meanwhile (its deadline passed, the provider shut
down, the admin revoked it), the command lets go at once: it sends COMMAND
SIGTERM and waits for it to exit (the pages must be unmapped before the
provider may reuse them), releases, says so on stderr and exits 3.

Environment of COMMAND: QUBES_GPU_SHARE_FD (the fd number), _LEASE, _MODE
('cpu': mmap LENGTH bytes at OFFSET; 'dmabuf': import the fd into a GPU
driver), _OFFSET, _LENGTH, and QUBES_GPU_SHARE_INFO, the --json object."""

EPILOG = f"""\
exit status:
  0 the lease was granted, held and released;
  1 the agent or dom0 refused (the reason is on stderr), or the agent is
    unreachable; 2 wrong usage; 3 dom0 revoked the lease while it was held;
  with --exec, COMMAND's exit status (128+N if killed by signal N)

files:
  {APP_SOCKET}  the agent's application socket, in a qube
  {DOM0_APP_SOCKET}  in dom0, the socket of dom0's own agent
    (opt-in; systemd's qubes-gpu-share-dom0-agent.socket holds it)
  --socket PATH or ${ENV_SOCKET} picks another

examples:
  qubes-gpu-share lease --from sys-gpu --size 1920x1080 --format XR24
  qubes-gpu-share lease --from sys-gpu --bytes 1048576 --hold 60 --json
  qubes-gpu-share lease --from sys-gpu --size 640x480 --exec my-viewer -v
    (--exec takes every argument after it: put it last)"""

#: exit status when dom0 revoked a lease the command held
EXIT_REVOKED = 3

_SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")
_FOURCC = re.compile(r"[A-Za-z0-9 _]{4}")


# --- options shared by the application commands ------------------------------

def add_socket_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket", metavar="PATH", default=None,
        help=f"the agent's application socket (default ${ENV_SOCKET}, "
             f"else {DOM0_APP_SOCKET} in dom0 (its opt-in agent), else "
             f"{APP_SOCKET})")


def add_json_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true",
                        help=f"print {what} as JSON for scripts")


def size_arg(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT``, both within the limits of formats.py."""
    match = _SIZE.fullmatch(text)
    if not match or not all(1 <= int(n) <= MAX_DIMENSION
                            for n in match.groups()):
        raise argparse.ArgumentTypeError(
            f"expected WIDTHxHEIGHT, each 1..{MAX_DIMENSION}, not {text!r}")
    return int(match[1]), int(match[2])


def _fourcc_arg(text: str) -> str:
    if not _FOURCC.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected a DRM fourcc such as "
                                         f"XR24 or NV12, not {text!r}")
    return text


def _bounded_int(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"expected an integer in {low}..{high}, not {text!r}")
        return value
    return parse


def add_buffer_options(parser: argparse.ArgumentParser, *,
                       required: bool) -> None:
    """--size/--format/--modifier or --bytes, and --ttl."""
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--size", type=size_arg, metavar="WxH",
                       help="an image of WIDTH x HEIGHT pixels")
    group.add_argument("--bytes", type=_bounded_int(1, MAX_LEASE_BYTES),
                       metavar="N", dest="nbytes",
                       help="N bytes of plain memory (fourcc BLOB), whole "
                            "pages granted")
    parser.add_argument("--format", type=_fourcc_arg, default="XR24",
                        metavar="FOURCC",
                        help="DRM fourcc of the image (default XR24, "
                             "i.e. XRGB8888)")
    parser.add_argument("--modifier", type=_bounded_int(0, 2**64 - 1),
                        default=0, metavar="N",
                        help="DRM format modifier (default 0, LINEAR)")
    parser.add_argument("--ttl", type=_bounded_int(1, MAX_TTL), default=3600,
                        metavar="SECONDS",
                        help="ask dom0 to end the lease after SECONDS "
                             "(default 3600)")


def buffer_spec(args: argparse.Namespace) -> BufferSpec | None:
    """The buffer the options describe, checked (None: not described)."""
    if args.nbytes is not None:
        return check_spec(BlobSpec(args.nbytes))
    if args.size is None:
        return None
    if args.format.upper() == BLOB:
        raise ValueError("--format BLOB goes with --bytes, not --size")
    return check_spec(ImageSpec(*args.size, args.format, args.modifier))


def spec_kwargs(spec: BufferSpec) -> dict[str, Any]:
    """The keyword arguments of Client.lease/offer for *spec*."""
    if isinstance(spec, BlobSpec):
        return {"nbytes": spec.nbytes}
    return {"width": spec.width, "height": spec.height,
            "fourcc": spec.fourcc, "modifier": spec.modifier}


def connect(args: argparse.Namespace) -> Client:
    return Client(args.socket)


def refused(args: argparse.Namespace, exc: ClientError) -> int:
    """The one-line refusal every application command prints."""
    print(f"qubes-gpu-share {args.command}: {exc} ({exc.code})",
          file=sys.stderr)
    return 1


def describe(meta: BufferMeta) -> str:
    if meta.fourcc == BLOB:
        return f"{meta.pages * PAGE_SIZE} bytes"
    return f"{meta.width}x{meta.height} {meta.fourcc}"


def when(deadline: int) -> str:
    """A deadline (Unix time) for people."""
    if deadline <= 0:
        return "none"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(deadline))


# --- holding a lease ----------------------------------------------------------

@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends a hold the way Ctrl-C does (both release the lease)."""
    def interrupt(_signum, _frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_for_event(agent: Client, extra_fds: tuple[int, ...] = (),
                   timeout: float | None = None) -> list[int]:
    """Wait until the agent sends something (collected: a revoke notice
    lands in ``agent.revoked``) or one of *extra_fds* is readable; returns
    the readable extra fds. ClientError when the agent went away."""
    readable, _, _ = select.select([agent, *extra_fds], [], [], timeout)
    if agent in readable:
        agent.take_event()
    return [fd for fd in readable if fd in extra_fds]


def hold(agent: Client, lease: str, seconds: float | None) -> bool:
    """Hold until interrupted, *seconds* passed or dom0 revoked *lease*;
    True when it was revoked."""
    deadline = None if seconds is None else time.monotonic() + seconds
    with sigterm_interrupts():
        try:
            while lease not in agent.revoked:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                wait_for_event(agent, timeout=left)
        except KeyboardInterrupt:
            return False
    return True


def _child_env(buf: LeasedBuffer, info: dict[str, Any]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(QUBES_GPU_SHARE_FD=str(buf.fd),
               QUBES_GPU_SHARE_LEASE=buf.lease,
               QUBES_GPU_SHARE_MODE=buf.mode.value,
               QUBES_GPU_SHARE_OFFSET=str(buf.info.offset),
               QUBES_GPU_SHARE_LENGTH=str(buf.info.length),
               QUBES_GPU_SHARE_INFO=json.dumps(info))
    return env


def run_child(agent: Client, buf: LeasedBuffer, command: list[str],
              info: dict[str, Any]) -> tuple[int, bool]:
    """Run *command* with the buffer's fd; (its status, revoked?). On a
    revoke notice or an interrupt the child gets SIGTERM and is waited for:
    its mapping must be gone before the lease is released."""
    try:
        child = subprocess.Popen(command, pass_fds=(buf.fd,),
                                 env=_child_env(buf, info))
    except OSError as exc:
        raise RuntimeError(f"cannot run {command[0]}: {exc.strerror}") \
            from None
    pidfd = os.pidfd_open(child.pid)
    try:
        with sigterm_interrupts():
            try:
                while buf.lease not in agent.revoked:
                    if wait_for_event(agent, (pidfd,)):
                        break
            except KeyboardInterrupt:
                pass
            if child.poll() is None:
                child.terminate()
            status = child.wait()
    finally:
        os.close(pidfd)
    return (128 - status if status < 0 else status,
            buf.lease in agent.revoked)


def lease_json(buf: LeasedBuffer) -> dict[str, Any]:
    """What --json prints: the agent's lease reply without its kind."""
    reply = buf.info.to_reply()
    del reply["reply"]
    return reply


# --- the command --------------------------------------------------------------

def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="provider", required=True,
                        metavar="PROVIDER",
                        help="the qube that provides the buffer")
    add_buffer_options(parser, required=True)
    parser.add_argument("--mode", choices=[m.value for m in ReceiveMode],
                        default=ReceiveMode.CPU.value,
                        help="cpu: an fd to mmap (works on every qube); "
                             "dmabuf: a dma-buf for a GPU driver (needs "
                             "the kernel fix, see 'qubes-gpu-share probe')")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--hold", type=float, metavar="SECONDS",
                     help="release after SECONDS instead of waiting for an "
                          "interrupt")
    how.add_argument("--exec", nargs=argparse.REMAINDER, metavar="COMMAND",
                     dest="command_line",
                     help="run COMMAND (all further arguments) with the "
                          "buffer's fd; release when it exits")
    add_json_option(parser, "the lease")
    add_socket_option(parser)


def _print_lease(args: argparse.Namespace, buf: LeasedBuffer) -> None:
    if args.json:
        print(json.dumps(lease_json(buf)), flush=True)
        return
    info = buf.info
    print(f"lease {info.lease} from {info.peer}: {describe(info.meta)}, "
          f"{info.meta.pages} pages, {info.mode.value} mode, fd offset "
          f"{info.offset} length {info.length}, ends {when(info.deadline)}",
          flush=True)


def run(args: argparse.Namespace) -> int:
    if args.command_line == []:
        raise ValueError("--exec needs a COMMAND")
    if args.hold is not None and not 0 <= args.hold < 2**31:
        raise ValueError("--hold must be a number of seconds >= 0")
    spec = buffer_spec(args)
    assert spec is not None
    try:
        with connect(args) as agent:
            buf = agent.lease(args.provider, mode=args.mode, ttl=args.ttl,
                              **spec_kwargs(spec))
            try:
                if args.command_line:
                    status, revoked = run_child(agent, buf, args.command_line,
                                                lease_json(buf))
                else:
                    _print_lease(args, buf)
                    status, revoked = 0, hold(agent, buf.lease, args.hold)
            finally:
                let_go(agent, buf)
    except ClientError as exc:
        return refused(args, exc)
    if revoked:
        print(f"qubes-gpu-share lease: dom0 revoked lease {buf.lease}; "
              f"let go of it", file=sys.stderr)
        return EXIT_REVOKED
    return status


def let_go(agent: Client, buf: LeasedBuffer) -> None:
    """Close the fd, then release: the agent confirms a revoke only after
    that. dom0 may already have ended a revoked lease, so its refusal of
    that release is no failure."""
    try:
        buf.close()
    except ClientError:
        if buf.lease not in agent.revoked:
            raise

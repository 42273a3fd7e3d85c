"""``qubes-gpu-share release``: end one of this qube's leases."""

from __future__ import annotations

import argparse

from ..client import ClientError
from ..names import InvalidName, parse_lease_id
from .lease import add_socket_option, connect, refused

NAME = "release"
SUMMARY = "release a lease of this qube that no program here holds"

DESCRIPTION = """\
Ask this qube's agent to release lease ID. The agent lets a connection
release only what it holds: a lease that a running program (such as
'qubes-gpu-share lease') holds is released by ending that program, so that
the buffer is unmapped before the provider reuses its pages; asking here
is refused with the reason. Use this for a lease no program here holds."""

EPILOG = """\
exit status:
  0 released; 1 refused (the reason is on stderr: not this qube's lease,
  held by a running program, unknown) or the agent is unreachable;
  2 wrong usage

examples:
  qubes-gpu-share release 0123456789abcdef0123456789abcdef"""


def _lease_id(text: str) -> str:
    try:
        return parse_lease_id(text)
    except InvalidName as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lease", type=_lease_id, metavar="ID",
                        help="the lease id, as 'list' shows it")
    add_socket_option(parser)


def run(args: argparse.Namespace) -> int:
    try:
        with connect(args) as agent:
            agent.release(args.lease)
    except ClientError as exc:
        return refused(args, exc)
    print(f"released lease {args.lease}")
    return 0

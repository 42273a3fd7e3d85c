"""``qubes-gpu-share list``: this qube's leases, as dom0 keeps them."""

from __future__ import annotations

import argparse
import json

from ..client import ClientError
from ..protocol import LeaseEntry
from .lease import add_json_option, add_socket_option, connect, refused, when

NAME = "list"
SUMMARY = "list this qube's leases (both directions)"

DESCRIPTION = """\
List the leases this qube takes part in, as consumer or provider, with
their state in dom0's registry (qubes.GpuLeases; a qube sees only its own
leases). Ended leases are not listed."""

EPILOG = """\
exit status:
  0 the list was printed (it may be empty); 1 the agent or dom0 refused
  (the reason is on stderr) or the agent is unreachable; 2 wrong usage

examples:
  qubes-gpu-share list
  qubes-gpu-share list --json | jq -r '.[] | select(.role=="consumer") | .lease'

--json prints a list of objects with the keys lease, role (this qube's
side), peer, state, pages, mode and deadline (Unix time)."""

_COLUMNS = ("LEASE", "ROLE", "PEER", "STATE", "PAGES", "MODE", "ENDS")


def configure(parser: argparse.ArgumentParser) -> None:
    add_json_option(parser, "the leases")
    add_socket_option(parser)


def entry_json(entry: LeaseEntry) -> dict:
    return {"lease": entry.lease, "role": entry.role.value,
            "peer": entry.peer, "state": entry.state.value,
            "pages": entry.pages, "mode": entry.mode.value,
            "deadline": entry.deadline}


def table(entries: list[LeaseEntry]) -> str:
    """Columns sized to their contents, like qvm-ls."""
    rows = [_COLUMNS] + [
        (e.lease, e.role.value, e.peer, e.state.value, str(e.pages),
         e.mode.value, when(e.deadline)) for e in entries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return "".join("  ".join(cell.ljust(width) for cell, width
                             in zip(row, widths)).rstrip() + "\n"
                   for row in rows)


def run(args: argparse.Namespace) -> int:
    try:
        with connect(args) as agent:
            entries = agent.list()
    except ClientError as exc:
        return refused(args, exc)
    if args.json:
        print(json.dumps([entry_json(e) for e in entries], indent=1))
    else:
        print(table(entries), end="")
    return 0

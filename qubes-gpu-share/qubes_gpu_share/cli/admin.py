"""``qvm-gpu-share``: the dom0 admin tool for GPU buffer leases.

In the style of Qubes' qvm-* tools (argparse, subcommands, ``--help`` that
reads like a man page, exit status 0 success, 1 failure, 2 usage). It asks
the running broker over its admin socket and never opens the database
itself, so a revoke goes through the same ordered revocation as any other.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

DEFAULT_SOCKET = "/run/qubes-gpu-share/admin.sock"
MAX_ANSWER = 16 << 20

DESCRIPTION = """\
Show and manage the GPU buffer leases the qubes-gpu-share broker granted
between qubes: list live leases, show one with its history, revoke leases,
show each provider's page budget and each consumer's quota, and show the
qvm-features that steer a qube."""

EPILOG = """\
commands:
  list [--vm VM] [--state STATE] [--all]
                    live leases (--all: ended ones too)
  show ID           one lease and every state it went through
  revoke ID | --vm VM
                    end a lease, or every lease of a qube, in the safe
                    order (the consumer lets go first); a lease whose
                    consumer does not confirm stays 'revoking' and keeps
                    its pages until it does. Answers after --wait seconds
                    (default 5) at most, with each lease as it is then
                    and why it waits; the broker goes on ending it
  budgets           pages used and left per provider, leases and pages
                    per consumer against its quota (its own requests;
                    leases offered to it count apart); STILL-MAPPED: pages
                    of ended leases a consumer still maps, by its
                    provider's kernel (they stay charged)
  settings VM       the features of VM this service reads, with defaults
  stats [--reset]   what the broker costs: commits, qubesd calls, calls to
                    qubes pending, the event loop's lag (--lag-monitor)

exit status:
  0 success; 1 the broker refused or could not be reached (reason on
  stderr); 2 wrong usage

files:
  /run/qubes-gpu-share/admin.sock   the broker's admin socket

examples:
  qvm-gpu-share list --vm sys-gpu
  qvm-gpu-share revoke --vm work
  qvm-features sys-gpu gpu-share-budget-pages 32768"""


class BrokerError(Exception):
    """The broker refused or could not be asked."""


def ask(path: str, request: dict[str, Any]) -> dict[str, Any]:
    """One request to the admin socket, one JSON answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError as exc:
            raise BrokerError(f"cannot reach the broker at {path}: "
                              f"{exc.strerror or exc}") from None
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while len(data) <= MAX_ANSWER:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    answer = json.loads(data or b"{}")
    if not answer.get("ok"):
        raise BrokerError(answer.get("error", "no answer from the broker"))
    return answer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qvm-gpu-share", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--admin-socket", default=DEFAULT_SOCKET,
                        metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true",
                        help="print the broker's answer as JSON")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                required=True)
    p = sub.add_parser("list", help="list leases")
    p.add_argument("--vm", metavar="VM", help="only leases of this qube")
    p.add_argument("--state", help="only leases in this state")
    p.add_argument("--all", action="store_true", help="ended leases too")
    p = sub.add_parser("show", help="show one lease with its history")
    p.add_argument("id", metavar="ID")
    p = sub.add_parser("revoke", help="revoke a lease or a qube's leases")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("id", metavar="ID", nargs="?")
    group.add_argument("--vm", metavar="VM")
    p.add_argument("--wait", type=float, default=5.0, metavar="SECONDS",
                   help="wait at most this long (0-60, default 5) for the "
                        "leases to end, then show them as they are; the "
                        "ending goes on in the broker")
    sub.add_parser("budgets", help="budgets of providers, quotas of "
                                   "consumers")
    p = sub.add_parser("settings", help="the features steering a qube")
    p.add_argument("vm", metavar="VM")
    p = sub.add_parser("stats", help="what the broker costs: commits, "
                                     "qubesd calls, event loop lag")
    p.add_argument("--reset", action="store_true",
                   help="start the lag's samples anew")
    return parser


def request_of(args: argparse.Namespace) -> dict[str, Any]:
    if args.command == "list":
        request = {"op": "list", "all": args.all}
        if args.vm:
            request["qube"] = args.vm
        if args.state:
            request["state"] = args.state
        return request
    if args.command == "show":
        return {"op": "show", "id": args.id}
    if args.command == "revoke":
        return {"op": "revoke", "wait": args.wait,
                **({"id": args.id} if args.id else {"qube": args.vm})}
    if args.command == "settings":
        return {"op": "settings", "qube": args.vm}
    if args.command == "stats":
        return {"op": "stats", "reset": args.reset}
    return {"op": "budgets"}


def _table(rows: list[list[Any]], header: list[str]) -> str:
    rows = [header] + [["-" if c is None else str(c) for c in r]
                       for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths))
                     .rstrip() for r in rows)


def _leases(leases: list[dict]) -> str:
    now = time.time()
    table = _table([[l["id"], l["provider"], l["consumer"], l["state"],
                     l["pages"], l.get("held_pages") or "-", l["mode"],
                     max(0, int(l["deadline"] - now))] for l in leases],
                   ["ID", "PROVIDER", "CONSUMER", "STATE", "PAGES",
                    "STILL-MAPPED", "MODE", "TTL-LEFT"])
    waiting = [f"{l['id'][:8]}: waiting: {l['waiting']}" for l in leases
               if l.get("waiting")]
    return "\n".join([table, *waiting])


def render(command: str, answer: dict[str, Any]) -> str:
    if command in ("list", "revoke"):
        return _leases(answer["leases"])
    if command == "show":
        lease = answer["lease"]
        head = "\n".join(f"{k}: {v}" for k, v in lease.items())
        return head + "\nhistory:\n" + _table(
            [[time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"])),
              e["from"], e["to"], e["reason"]] for e in answer["history"]],
            ["TIME", "FROM", "TO", "REASON"])
    if command == "budgets":
        providers = _table([[p["qube"], p.get("pages_used"),
                             p.get("budget_pages"), p.get("pages_left"),
                             p.get("held_pages")]
                            for p in answer["providers"]],
                           ["PROVIDER", "PAGES-USED", "BUDGET", "LEFT",
                            "STILL-MAPPED"])
        consumers = _table([[c["qube"], c["leases"], c["quota_leases"],
                             c["pages"], c["quota_pages"],
                             c.get("offered_leases"),
                             c.get("offered_pages"), c.get("held_pages")]
                            for c in answer["consumers"]],
                           ["CONSUMER", "LEASES", "QUOTA", "PAGES",
                            "QUOTA-PAGES", "OFFERED", "OFFERED-PAGES",
                            "STILL-MAPPED"])
        return providers + "\n\n" + consumers
    if command == "stats":
        lag = answer.get("loop_lag") or {}
        return "\n".join([
            f"commits: {answer['commits']}",
            f"qubesd calls: {answer['qubesd_calls']}",
            f"calls to qubes pending: {answer['agent_calls_pending'] or 0}",
            "event loop lag: " + (
                f"p50 {lag['p50_ms']} ms, p99 {lag['p99_ms']} ms, max "
                f"{lag['max_ms']} ms ({lag['samples']} samples)" if lag
                else "not measured (broker without --lag-monitor)")])
    return _table([[s["feature"], s["value"], s["default"]]
                   for s in answer["settings"]],
                  ["FEATURE", "VALUE", "DEFAULT"])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        answer = ask(args.admin_socket, request_of(args))
    except (BrokerError, ValueError) as exc:
        print(f"qvm-gpu-share: error: {exc}", file=sys.stderr)
        return 1
    answer.pop("ok", None)
    print(json.dumps(answer, indent=2) if args.json
          else render(args.command, answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())

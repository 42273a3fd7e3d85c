"""The ``qubes-gpu-share`` command: one argparse subcommand per module.

Each subcommand lives in its own module of this package (``probe.py``, later
``lease.py``, ``offer.py``, ``list.py``, ``release.py``) and provides:

* ``NAME``: the subcommand word;
* ``SUMMARY``: one line for the command list;
* ``DESCRIPTION`` and ``EPILOG``: the man-page text of its ``--help``
  (description, then EXIT STATUS, FILES, EXAMPLES);
* ``configure(parser)``: adds its options;
* ``run(args) -> int``: does the work, returns the exit status.

To add one, write the module and list it in :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from .. import __version__

#: modules of this package that are subcommands, in --help order
SUBCOMMANDS = ("probe", "lease", "offer", "list", "release")

DESCRIPTION = """\
Share GPU and other dma-buf buffers between Qubes OS qubes without copying,
over Xen grants: a dom0 broker hands out leases, an agent in each qube
grants or maps the buffer pages."""

EPILOG = """\
Run 'qubes-gpu-share COMMAND --help' for the options of one command.

exit status:
  0 success; 1 the command failed (the reason is on stderr);
  2 wrong usage"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qubes-gpu-share", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND",
                                     title="commands", required=True)
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"{__package__}.{name}")
        sub = commands.add_parser(
            module.NAME, help=module.SUMMARY,
            description=module.DESCRIPTION, epilog=module.EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        module.configure(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (| head): say nothing more, not even at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"qubes-gpu-share {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

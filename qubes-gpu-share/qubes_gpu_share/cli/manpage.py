"""Man pages generated from the argparse parsers themselves.

The ``--help`` text of each command is the one source: the man page shows
the same description, options and epilog, so the two cannot drift apart.
Epilog lines like ``exit status:`` or ``examples:`` (a lower-case heading
alone on its line, as our epilogs and Qubes' tools write them) become man
sections (``EXIT STATUS``, ``EXAMPLES``).

Used at build time by ``make man`` (packaging.mk)::

    python3 -m qubes_gpu_share.cli.manpage OUTDIR [PROGRAM...]

writes OUTDIR/PROGRAM.SECTION for every program below (or only for the
programs named after OUTDIR): the commands in section 1, the two daemons
(broker and agent, run by their systemd units) in section 8.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import re
import sys
from collections.abc import Iterable, Sequence

from .. import __version__

#: (program, module with build_parser(), man section, one line for NAME)
PAGES = (
    ("qubes-gpu-share", "qubes_gpu_share.cli.main", "1",
     "share GPU buffers between Qubes OS qubes without copying"),
    ("qvm-gpu-share", "qubes_gpu_share.cli.admin", "1",
     "inspect and revoke GPU buffer leases between qubes (dom0)"),
    ("qubes-gpu-share-broker", "qubes_gpu_share.broker.main", "8",
     "the dom0 daemon that decides, records and revokes GPU buffer leases"),
    ("qubes-gpu-share-agent", "qubes_gpu_share.agent.main", "8",
     "the daemon that grants and maps GPU buffers in a qube (or dom0)"),
)

_HEADING = re.compile(r"^([a-z][a-z ]*):$")


def _escape(text: str) -> str:
    """Make plain text safe for roff: backslashes, and control characters
    at the start of a line."""
    text = text.replace("\\", "\\e")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in text.split("\n"))


def _bold(text: str) -> str:
    # options and commands are typed literally: bold, with real hyphens
    return "\\fB" + _escape(text).replace("-", "\\-") + "\\fR"


def _paragraphs(text: str) -> list[str]:
    """Text as the parser holds it (RawDescriptionHelpFormatter: lines kept)
    as roff, with blank lines turned into paragraph breaks and indented
    lines kept as they are (no-fill)."""
    out: list[str] = []
    for block in re.split(r"\n\s*\n", text.strip("\n")):
        lines = block.split("\n")
        if any(line.startswith(" ") for line in lines):
            out += [".PP", ".nf", _escape(block), ".fi"]
        else:
            out += [".PP", _escape(block)]
    return out


def _epilog(text: str | None) -> list[str]:
    """The epilog, its ``heading:`` lines turned into sections."""
    if not text:
        return []
    out: list[str] = []
    body: list[str] = []

    def flush() -> None:
        if "".join(body).strip():
            out.extend(_paragraphs("\n".join(body)))
        body.clear()

    for line in text.split("\n"):
        match = _HEADING.match(line)
        if match:
            flush()
            out.append(f'.SH "{match.group(1).upper()}"')
        else:
            body.append(line)
    flush()
    return out


def _usage(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_usage().split()).removeprefix("usage: ")


def _help(action: argparse.Action, prog: str) -> str:
    """The option's help as --help prints it: ``%(default)s`` and the
    like filled in (argparse.HelpFormatter._expand_help does the same)."""
    text = action.help or ""
    if "%" not in text:
        return text
    params = {name: value for name, value in vars(action).items()
              if value is not argparse.SUPPRESS}
    params["prog"] = prog
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    return text % params


def _options(actions: Iterable[argparse.Action], prog: str) -> list[str]:
    out: list[str] = []
    for action in actions:
        if isinstance(action, argparse._SubParsersAction) \
                or action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            names = ", ".join(_bold(name) for name in action.option_strings)
            if action.nargs != 0:
                metavar = action.metavar or action.dest.upper()
                names += " \\fI" + _escape(str(metavar)) + "\\fR"
        else:
            names = "\\fI" + _escape(str(action.metavar or action.dest)) \
                + "\\fR"
        out += [".TP", names, _escape(_help(action, prog))]
    return out


def _subcommands(parser: argparse.ArgumentParser) -> list[str]:
    out: list[str] = []
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        out.append(".SH COMMANDS")
        for name, sub in action.choices.items():
            out += [f".SS {_bold(name)}", ".PP", _bold(_usage(sub))]
            out += _paragraphs(sub.description or "")
            out += _options(sub._actions, sub.prog)
            # a subcommand's epilog is text, not top-level sections
            if sub.epilog:
                out += _paragraphs(sub.epilog)
    return out


def render(parser: argparse.ArgumentParser, summary: str, *,
           section: str = "1", date: str = "") -> str:
    """The man page of ``parser``'s program, in roff (man macros)."""
    prog = parser.prog
    lines = [
        f'.TH "{prog.upper()}" "{section}" "{date}" '
        f'"qubes-gpu-share {__version__}" "Qubes OS"',
        ".SH NAME",
        f"{_escape(prog).replace('-', chr(92) + '-')} \\- {_escape(summary)}",
        ".SH SYNOPSIS",
        _bold(_usage(parser)),
        ".SH DESCRIPTION",
        *_paragraphs(parser.description or ""),
        ".SH OPTIONS",
        *_options(parser._actions, prog),
        *_subcommands(parser),
        *_epilog(parser.epilog),
    ]
    return "\n".join(lines) + "\n"


def build_date() -> str:
    """SOURCE_DATE_EPOCH's date (dpkg and rpmbuild set it: reproducible
    builds), else today's."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = (datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc)
            if epoch else datetime.datetime.now(datetime.timezone.utc))
    return when.strftime("%Y-%m-%d")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m qubes_gpu_share.cli.manpage",
        description="write the man pages of the project's commands")
    parser.add_argument("outdir", help="folder to write NAME.1 files into")
    known = [prog for prog, *_ in PAGES]
    # no `choices`: argparse (before 3.12) checks an empty list against them
    parser.add_argument("programs", nargs="*", metavar="PROGRAM",
                        help=f"only these pages (default: all of "
                             f"{', '.join(known)})")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.programs) - set(known))
    if unknown:
        parser.error(f"no page for {', '.join(unknown)}")
    os.makedirs(args.outdir, exist_ok=True)
    date = build_date()
    for prog, module, section, summary in PAGES:
        if args.programs and prog not in args.programs:
            continue
        command = importlib.import_module(module).build_parser()
        if command.prog != prog:
            raise SystemExit(f"{module}.build_parser() has prog "
                             f"{command.prog!r}, expected {prog!r}")
        page = render(command, summary, section=section, date=date)
        with open(os.path.join(args.outdir, f"{prog}.{section}"), "w",
                  encoding="utf-8") as out:
            out.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())

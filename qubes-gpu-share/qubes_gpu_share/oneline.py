"""One line of text for a log, an error or a reply (pure).

Text that reaches a log line, an exception or an answer to another domain
often comes from somewhere else: an exception's message, a reason a qube
wrote, an error qubesd sent. Written as it is, it could break the line
(a newline forges the next log line or ends a header), carry terminal
escapes, or be as long as its writer liked. :func:`one_line` is the one
place that makes any such text safe to pass on; the protocol's Error
messages, the qrexec status line of a refusal and the Qubes-facts errors
all go through it.
"""

from __future__ import annotations

#: Longest line passed on: fits a terminal line, a log line, an Error.
MAX_LEN = 200


def one_line(text: object, *, limit: int = MAX_LEN, mark: str = "?",
             empty: str = "error") -> str:
    """``str(text)`` as one line of printable ASCII: outer blanks dropped,
    every other character outside space..tilde replaced by ``mark``, cut
    to ``limit`` characters with no blank at either end; ``empty`` when
    nothing is left."""
    clean = "".join(c if " " <= c <= "~" else mark
                    for c in str(text).strip())
    return clean[:limit].strip() or empty

"""This domain's Xen domain id: 0 in dom0, else xenstore's ``domid``.

The real grant device needs it to grant to itself (gntdev.py) and the
probe to receive its own grant (probe.py); the simulator is told its id.
dom0 is recognised by ``control_d`` in /proc/xen/capabilities. In a domU
the toolstack writes /local/domain/N/domid; the relative read
(``xenstore-read domid``) is what libxenvchan, and so Qubes' qrexec and
GUI agent, use, and it follows a save/restore. QubesDB has no domid key.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable

from ..names import DOMID_FIRST_RESERVED
from . import this_domain
from .errors import NoGrantDevice


def own_domid(proc_root: str | None = None,
              run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
              ) -> int:
    """This domain's id: 0 in dom0, else xenstore's relative key ``domid``
    (NoGrantDevice when it cannot be learnt)."""
    if this_domain.is_dom0(proc_root or this_domain.PROC_ROOT):
        return 0
    try:
        result = run(["xenstore-read", "domid"], capture_output=True,
                     text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NoGrantDevice(
            f"cannot learn this domain's id: xenstore-read failed ({exc}); "
            f"install xenstore-utils (Debian) or xen-runtime (Fedora)"
        ) from exc
    return parse_domid(result.stdout if result.returncode == 0 else "",
                       result.stderr)


def parse_domid(untrusted_text: str, why: str = "") -> int:
    """Validate xenstore's answer: a decimal domain id below the reserved."""
    text = untrusted_text.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 5) or \
            int(text) >= DOMID_FIRST_RESERVED:
        raise NoGrantDevice(
            f"cannot learn this domain's id from xenstore key 'domid' "
            f"({why.strip() or repr(untrusted_text)}): not in a Xen domain?")
    return int(text)

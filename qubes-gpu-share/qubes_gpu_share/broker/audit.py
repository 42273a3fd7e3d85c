"""The audit trail in the journal: one line per decision of the broker.

An admin reading ``journalctl -u qubes-gpu-share-broker`` must be able to
answer "who got which buffer from whom, and why was that refused": every
line names both qubes, the lease id (``-`` when none was made), the pages
and the reason; every refusal a qube gets has its line (services.py writes
it where the refusal is answered, with the service and the caller), as ``key=value`` words that grep and awk can take apart.
The registry keeps the same history per lease (``qvm-gpu-share show``);
this is the time-ordered view across all leases.
"""

from __future__ import annotations

import logging

log = logging.getLogger("qubes_gpu_share.audit")


def decision(event: str, *, reason: str, consumer: str = "-",
             provider: str = "-", pages: int = 0, lease_id: str = "-") -> None:
    """Log one decision: ``event`` is a word like granted, refused, active,
    released, revoked, expired, failed, busy. ``-`` (or 0 pages) stands for
    what a refusal came before knowing (a malformed request names no
    lease)."""
    log.info("%s lease=%s consumer=%s provider=%s pages=%d reason=%s",
             event, lease_id, consumer, provider, pages, reason)

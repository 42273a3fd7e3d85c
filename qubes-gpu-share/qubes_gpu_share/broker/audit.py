"""The audit trail in the journal: one line per decision of the broker.

An admin reading ``journalctl -u qubes-gpu-share-broker`` must be able to
answer "who got which buffer from whom, and why was that refused": every
line names both qubes, the lease id (``-`` when none was made), the pages
and the reason, as ``key=value`` words that grep and awk can take apart.
The registry keeps the same history per lease (``qvm-gpu-share show``);
this is the time-ordered view across all leases.
"""

from __future__ import annotations

import logging

log = logging.getLogger("qubes_gpu_share.audit")


def decision(event: str, *, consumer: str, provider: str, pages: int,
             reason: str, lease_id: str = "-") -> None:
    """Log one decision: ``event`` is a word like granted, refused, active,
    released, revoked, expired, failed, busy."""
    log.info("%s lease=%s consumer=%s provider=%s pages=%d reason=%s",
             event, lease_id, consumer, provider, pages, reason)

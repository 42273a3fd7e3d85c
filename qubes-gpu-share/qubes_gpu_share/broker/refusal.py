"""What the broker answers a request it says no to.

Raised by admission (:mod:`.admission`), by the lease flows
(:mod:`.core`) and by the services' own checks (:mod:`.services`), which
answer every refusal and log it to the audit trail.
"""

from __future__ import annotations

from ..oneline import one_line
from ..lease import Lease
from .audit import lease_fields


class Refused(Exception):
    """A request the broker says no to: a stable code and one line.

    ``about`` is what the audit line of the refusal names, as far as the
    broker got (audit.decision's keywords: consumer, provider, pages,
    lease_id); services.py logs it, where every refusal is answered.
    """

    def __init__(self, code: str, message: str, *, lease: Lease | None = None,
                 **about):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = one_line(message)
        self.about = lease_fields(lease) if lease is not None else about

"""Which roles this qube's agent plays: the qube's Qubes services.

``gpu-share`` enables the consumer, ``gpu-share-provider`` the provider
(``qvm-service QUBE NAME on`` in dom0). They are read at each request,
from QubesDB's live value where ``qubesdb-read`` answers, so that the
admin's toggles apply without a restart; the boot-time files in
/run/qubes-service are the fallback. dom0's agent has no such services:
the broker checks dom0's roles (its features) on every call it routes.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import subprocess

from ..protocol import Role

SERVICE_FOR_ROLE = {Role.CONSUMER: "gpu-share",
                    Role.PROVIDER: "gpu-share-provider"}


class Roles:
    """Which roles the qube's services enable: QubesDB's live value when
    ``qubesdb`` is set and answers, else the boot-time file."""

    def __init__(self, services_dir: str | os.PathLike,
                 qubesdb: str | None = None):
        self._dir = pathlib.Path(services_dir)
        self._qubesdb = qubesdb

    @classmethod
    def with_qubesdb(cls, services_dir: str | os.PathLike) -> Roles:
        return cls(services_dir, shutil.which("qubesdb-read"))

    @classmethod
    def decided_by_broker(cls) -> Roles:
        """Every role: for dom0's agent, whose roles the broker checks."""
        return _AllRoles()

    def enabled(self, role: Role) -> bool:
        service = SERVICE_FOR_ROLE[role]
        if self._qubesdb:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                result = subprocess.run(
                    [self._qubesdb, f"/qubes-service/{service}"],
                    capture_output=True, timeout=5, check=False)
                if result.returncode == 0:
                    return result.stdout.strip() == b"1"
        return (self._dir / service).exists()


class _AllRoles(Roles):
    def __init__(self):
        super().__init__(os.devnull)

    def enabled(self, role: Role) -> bool:
        return True

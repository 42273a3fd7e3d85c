"""The simulated hypervisor's state: grant tables, grants, mappings, exports.

No sockets here: the hypervisor's I/O layer (sim_hv.py) calls these after
parsing a request. Sizes and costs follow Xen: one table of refs per domain
(allocated all-or-nothing, ENOSPC when full), a maptrack bound per mapping
domain, and the pages of a grant are the pages of the memfd the provider
passed (the simulation's dma-buf), so every mapping aliases them.

Work is per run of refs, not per page: a grant of consecutive refs is one
segment in its domain's table.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import stat

from ..formats import PAGE_SIZE
from . import errors
from .expected import (DEFAULT_GRANT_ENTRIES, DEFAULT_MAPTRACK_ENTRIES,
                       RESERVED_GRANT_REFS, DomainKind)
from .sim_proto import SimulatorLimit

Runs = list[tuple[int, int]]


class Backing:
    """The memory behind grants: one memfd held open by the hypervisor
    while any grant, mapping or export uses it."""

    def __init__(self, fd: int):
        self.fd = fd
        self.users = 0

    def hold(self) -> Backing:
        self.users += 1
        return self

    def drop(self) -> None:
        self.users -= 1
        if self.users == 0:
            os.close(self.fd)
            self.fd = -1


@dataclasses.dataclass(eq=False)
class Grant:
    """Pages of one domain granted to another (IMP_TO_REFS or gntalloc)."""

    gid: int
    granter: Domain
    grantee: int
    backing: Backing
    first_page: int
    pages: int
    what: str
    runs: Runs = dataclasses.field(default_factory=list)
    ended: bool = False
    #: mappings and exports that use some of its pages
    users: int = 0


@dataclasses.dataclass(eq=False)
class Mapped:
    """Refs mapped into a domain: a CPU mapping or an exported dma-buf."""

    mid: int
    domain: Domain
    grants: list[Grant]
    backing: Backing
    first_page: int
    pages: int


class RefTable:
    """One domain's grant table: free ranges and the segments in use."""

    def __init__(self, entries: int):
        self.size = entries
        self.used = 0
        self._free: Runs = [(RESERVED_GRANT_REFS, entries)]
        self._starts: list[int] = []
        self._segments: dict[int, tuple[int, Grant, int]] = {}

    def allocate(self, grant: Grant) -> Runs:
        """Refs for every page of ``grant``, or GrantTableFull (nothing is
        taken then, like gnttab_alloc_grant_references)."""
        wanted = grant.pages
        if self.size - RESERVED_GRANT_REFS - self.used < wanted:
            raise errors.GrantTableFull(
                f"grant table of domain {grant.granter.domid} is full "
                f"({self.used} of {self.size - RESERVED_GRANT_REFS} refs in "
                f"use, {wanted} wanted)")
        runs: Runs = []
        page = grant.first_page
        while wanted:
            start, end = self._free.pop(0)
            take = min(wanted, end - start)
            if start + take < end:
                self._free.insert(0, (start + take, end))
            bisect.insort(self._starts, start)
            self._segments[start] = (start + take, grant, page)
            runs.append((start, take))
            page += take
            wanted -= take
        self.used += grant.pages
        return runs

    def free(self, runs: Runs) -> None:
        for start, count in runs:
            del self._starts[bisect.bisect_left(self._starts, start)]
            del self._segments[start]
            self._free.append((start, start + count))
            self.used -= count
        self._free.sort()
        merged: Runs = []
        for start, end in self._free:
            if merged and merged[-1][1] == start:
                merged[-1] = (merged[-1][0], end)
            else:
                merged.append((start, end))
        self._free = merged

    def resolve(self, runs: Runs) -> list[tuple[Grant, int, int]]:
        """(grant, first page, count) for each piece of the refs, or
        MapRefused for a ref that is not in use."""
        pieces = []
        for start, count in runs:
            while count:
                i = bisect.bisect_right(self._starts, start) - 1
                seg = self._segments.get(self._starts[i]) if i >= 0 else None
                if seg is None or start >= seg[0]:
                    raise errors.MapRefused(f"grant ref {start} is not in use")
                end, grant, page = seg
                take = min(count, end - start)
                pieces.append((grant, page + start - self._starts[i], take))
                start += take
                count -= take
        return pieces


class Domain:
    """A simulated domain: its kernel's traits and its grant table."""

    def __init__(self, domid: int, kind: DomainKind,
                 table_entries: int = DEFAULT_GRANT_ENTRIES,
                 maptrack_entries: int = DEFAULT_MAPTRACK_ENTRIES):
        self.domid = domid
        self.kind = kind
        self.table = RefTable(table_entries)
        self.maptrack_entries = maptrack_entries
        self.mapped_pages = 0

    def describes(self, kind: DomainKind, table_entries: int,
                  maptrack_entries: int) -> bool:
        return (kind, table_entries, maptrack_entries) == (
            self.kind, self.table.size, self.maptrack_entries)


def resolve_mapping(mapper: Domain, granter: Domain, runs: Runs,
                    mid: int) -> Mapped:
    """Check that ``mapper`` may map these refs of ``granter`` and that they
    form one view; take the maptrack entries. Raises MapRefused,
    GrantTableFull or SimulatorLimit."""
    pieces = granter.table.resolve(runs)
    for grant, _, _ in pieces:
        if grant.ended:
            raise errors.MapRefused(
                f"grant {grant.gid} of domain {granter.domid} was ended")
        if grant.grantee != mapper.domid:
            raise errors.MapRefused(
                f"refs of domain {granter.domid} are granted to domain "
                f"{grant.grantee}, not to domain {mapper.domid}")
    first, page = pieces[0][0], pieces[0][1]
    pages = 0
    for grant, gpage, count in pieces:
        if (grant.backing is not first.backing
                or grant.first_page + gpage != first.first_page + page + pages):
            raise SimulatorLimit(
                "the simulator maps only refs that are consecutive pages of "
                "one buffer (the real device maps any refs)")
        pages += count
    if mapper.mapped_pages + pages > mapper.maptrack_entries:
        raise errors.GrantTableFull(
            f"maptrack of domain {mapper.domid} is full")
    grants = list(dict.fromkeys(grant for grant, _, _ in pieces))
    for grant in grants:
        grant.users += 1
    mapper.mapped_pages += pages
    return Mapped(mid, mapper, grants, first.backing.hold(),
                  first.first_page + page, pages)


def unmap(mapped: Mapped) -> None:
    """Drop a mapping or export; complete the deferred end of grants that
    were revoked while it still used them."""
    mapped.domain.mapped_pages -= mapped.pages
    for grant in mapped.grants:
        grant.users -= 1
        if grant.ended and grant.users == 0:
            _free_grant(grant)
    mapped.backing.drop()


def end_grant(grant: Grant) -> str | None:
    """End a grant; return a hazard description if a peer still uses it.

    The real IMP_RELEASE cannot end a ref the peer maps: gnttab defers the
    end, but the dma-buf is dropped at once, so the owner may reuse pages the
    peer still sees. Here the refs stay in the table until the last user is
    gone (the deferred end), and the hazard is reported.
    """
    if grant.ended:
        raise errors.AlreadyReleased(f"grant {grant.gid} was already revoked")
    grant.ended = True
    if grant.users == 0:
        _free_grant(grant)
        return None
    return (f"{grant.what} grant {grant.gid} of domain "
            f"{grant.granter.domid} ({grant.pages} pages) ended while "
            f"domain {grant.grantee} still maps it ({grant.users} users)")


def _free_grant(grant: Grant) -> None:
    grant.granter.table.free(grant.runs)
    grant.runs = []
    grant.backing.drop()


def memfd_pages(fd: int, pages: int) -> None:
    """Refuse a provider's fd that is not exactly ``pages`` pages of memory
    (IMP_TO_REFS compares the dma-buf's size with the count)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise errors.NotGrantable(
            "not a dma-buf (the simulator takes memfds as dma-bufs)")
    if st.st_size != pages * PAGE_SIZE:
        raise errors.NotGrantable(
            f"dma-buf has {st.st_size} bytes, not {pages} pages "
            f"({pages * PAGE_SIZE} bytes)")

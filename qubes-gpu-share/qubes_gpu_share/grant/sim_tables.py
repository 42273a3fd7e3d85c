"""The simulated hypervisor's state: grant tables, grants, mappings, exports.

No sockets here: the hypervisor's I/O layer (sim_hv.py) calls these after
parsing a request. Sizes and costs follow Xen: one table of refs per domain
(allocated all-or-nothing, ENOSPC when full), a maptrack bound per mapping
domain, and the pages of a grant are the pages of the memfd the provider
passed (the simulation's dma-buf), so every mapping aliases them.

Work is per run of refs, not per page: a grant of consecutive refs is one
segment in its domain's table.

Ending a grant follows the kernel (drivers/xen/grant-table.c): a page the
peer still maps cannot be ended. What the peer maps stays granted (the peer
may even map it again), its ref allocated and its page held, until the peer
unmaps it or its domain dies; only then is the grant freed. After a revoke
(IMP_RELEASE, gntalloc's dealloc) that happens by itself, as the kernel's
deferred list does; after a try_end (IMP_TRY_RELEASE) the provider asks
again. The simulator frees a grant's refs together once no page of it is
held; the kernel frees each ref as its page is unmapped (and its deferred
list at most 10 refs a second, free_per_iteration).
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import stat

from ..formats import PAGE_SIZE
from . import errors
from .expected import (DEFAULT_GRANT_ENTRIES, DEFAULT_MAPTRACK_ENTRIES,
                       GNTALLOC_DEFAULT_LIMIT, RESERVED_GRANT_REFS,
                       DomainKind)
from .sim_proto import SimulatorLimit

Runs = list[tuple[int, int]]
#: page ranges [start, end) within a grant, sorted and disjoint
Spans = list[tuple[int, int]]


def merge_spans(ranges) -> Spans:
    """The union of [start, end) ranges, sorted and disjoint."""
    merged: Spans = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def intersect_spans(a: Spans, b: Spans) -> Spans:
    out: Spans = []
    for a0, a1 in a:
        for b0, b1 in b:
            lo, hi = max(a0, b0), min(a1, b1)
            if lo < hi:
                out.append((lo, hi))
    return merge_spans(out)


def covers(spans: Spans, start: int, end: int) -> bool:
    return any(s0 <= start and end <= s1 for s0, s1 in spans)


def span_pages(spans: Spans) -> int:
    return sum(end - start for start, end in spans)


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
    #: revoked by its provider (IMP_RELEASE, dealloc): what is still held
    #: is the kernel's deferred end
    ended: bool = False
    #: pages mapped or exported by the peer, one range per mapping
    maps: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    #: None while every page is granted; else the pages still granted
    #: because the peer held them when the grant was (partly) ended
    granted: Spans | None = None
    #: the grant's refs and page are freed
    freed: bool = False

    @property
    def users(self) -> int:
        return len(self.maps)

    def mapped_spans(self) -> Spans:
        return merge_spans(self.maps)

    def held_pages(self) -> int:
        """Pages still granted although the provider ended the grant."""
        return 0 if self.granted is None else span_pages(self.granted)

    def may_map(self, start: int, end: int) -> bool:
        return self.granted is None or covers(self.granted, start, end)

    def end_unmapped(self) -> int:
        """End every page the peer does not map now; the pages it still
        holds stay granted. Returns their number."""
        held = self.mapped_spans()
        if self.granted is not None:
            held = intersect_spans(held, self.granted)
        self.granted = held
        return span_pages(held)


@dataclasses.dataclass(eq=False)
class Mapped:
    """Refs mapped into a domain: a CPU mapping or an exported dma-buf."""

    mid: int
    domain: Domain
    #: (grant, first page within it, pages) for each piece of the refs
    pieces: list[tuple[Grant, int, int]]
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
        #: every grant of this domain not freed yet
        self.live: set[Grant] = set()
        #: xen-gntalloc's accounting: pages allocated and not deallocated
        #: (a dealloc counts at once, however long the end is deferred)
        self.gntalloc_pages = 0
        self.gntalloc_limit = GNTALLOC_DEFAULT_LIMIT

    def deferred(self) -> tuple[int, int]:
        """(grants, pages) revoked while the peer held them, still held:
        the kernel's deferred ends."""
        grants = [g for g in self.live if g.ended]
        return len(grants), sum(g.held_pages() for g in grants)

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
    for grant, gpage, count in pieces:
        start = gpage - grant.first_page
        if not grant.may_map(start, start + count):
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
    relative = [(grant, gpage - grant.first_page, count)
                for grant, gpage, count in pieces]
    for grant, start, count in relative:
        grant.maps.append((start, start + count))
    mapper.mapped_pages += pages
    return Mapped(mid, mapper, relative, first.backing.hold(),
                  first.first_page + page, pages)


def unmap(mapped: Mapped) -> None:
    """Drop a mapping or export; the pages of revoked grants it held are
    ended now (the kernel's deferred end), and a grant none of whose pages
    is held any more is freed."""
    mapped.domain.mapped_pages -= mapped.pages
    for grant, start, count in mapped.pieces:
        grant.maps.remove((start, start + count))
        if grant.ended and not grant.freed:
            if grant.end_unmapped() == 0:
                _free_grant(grant)
    mapped.backing.drop()


def end_grant(grant: Grant) -> str | None:
    """Revoke a grant (IMP_RELEASE, dealloc): the pages the peer still maps
    stay granted and held, their end deferred until it unmaps them or dies
    (as the kernel does); return a line describing the deferral, None when
    nothing was held."""
    if grant.ended:
        raise errors.AlreadyReleased(f"grant {grant.gid} was already revoked")
    grant.ended = True
    if grant.what == "gntalloc":
        grant.granter.gntalloc_pages -= grant.pages
    held = grant.end_unmapped()
    if held == 0:
        _free_grant(grant)
        return None
    return (f"{grant.what} grant {grant.gid} of domain "
            f"{grant.granter.domid} ({grant.pages} pages) ended while "
            f"domain {grant.grantee} still maps {held} of its pages: their "
            f"end is deferred")


def try_end_grant(grant: Grant) -> int:
    """IMP_TRY_RELEASE: end the pages the peer does not map, keep the
    others granted; free the grant once none is held. Returns the pages
    still held."""
    if grant.ended or grant.freed:
        raise errors.AlreadyReleased(f"grant {grant.gid} was already ended")
    held = grant.end_unmapped()
    if held == 0:
        grant.ended = True
        _free_grant(grant)
    return held


def _free_grant(grant: Grant) -> None:
    grant.freed = True
    grant.granter.table.free(grant.runs)
    grant.granter.live.discard(grant)
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

"""The simulated hypervisor: one asyncio process owning every grant table.

Each simulated grant device (one per process, like an open /dev/xen/gntdev)
connects to its Unix socket, says which domain it is in and what its kernel
can do, and then sends one frame per operation. Memory crosses as fds:
providers pass memfds (the simulation's dma-bufs) with SCM_RIGHTS, mappers
get the same memfd back with the offset of their pages, so both sides see
the very same pages.

A simulated EXP_FROM_REFS hands out, in a domain whose kernel's exporter
has no mmap, one end of a socketpair: like the real exported dma-buf it
cannot be mmapped, and when every copy of it is closed the hypervisor reads
EOF on the other end, which is "the last user let go" for
EXP_WAIT_RELEASED. Where the kernel's exporter has mmap (kernel/0002), it
hands out a new open file of the pages' memfd instead, which maps them, and
holds an OFD lock on it: the lock goes when the last copy of that open file
is closed and the last mapping of it is gone (a mapping holds the file, as
a real dma-buf's mapping does), which the hypervisor polls for. Granting
either on is recognised (by its inode, in the domain that received it) and
refused, as Xen refuses to grant pages that are grant mappings.

Closing a connection is closing /dev/xen/gntdev: the process's mappings go,
its grants end (deferred, and a line in the hazard log, if a peer still
maps them). DESTROY is a domain dying: Xen drops its mappings, so the
deferred ends of its peers' grants complete.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import itertools
import os
import socket
import struct
from collections.abc import Awaitable, Callable

from ..formats import PAGE_SIZE
from ..names import DOMID_FIRST_RESERVED
from . import errors
from .device import check_page_count
from .expected import (DEFAULT_GRANT_ENTRIES, DEFAULT_MAPTRACK_ENTRIES,
                       NO_DMABUF_IOCTLS, RECEIVED_DMABUF, RESERVED_GRANT_REFS,
                       expected)
from .sim_proto import (ANCILLARY_SIZE, DOMID, EXPORT, GRANT, HELD, ID, LIMIT,
                        MAP, MAPPED, PEEKED, STATS, STATS_REPLY, STATUS_ERROR,
                        STATUS_OK, WAIT, FrameReader, Op, ProtocolError,
                        SimulatorLimit, decode_hello, decode_runs,
                        encode_error, encode_runs, frame, rights, split_fixed)
from .sim_tables import (Backing, Domain, Grant, Mapped, end_grant,
                         memfd_pages, resolve_mapping, try_end_grant, unmap)

#: Where the OFD locks that track mmap-able exports live: far beyond any
#: memfd's size (a lock needs no data there), one byte per export.
_LOCK_BASE = 1 << 50
#: struct flock (x86-64 and every 64-bit Linux): type, whence, start, len,
#: pid; for F_OFD_SETLK / F_OFD_GETLK, whose pid must be 0.
_FLOCK = struct.Struct("hh4xqqi4x")
#: how often the hypervisor looks whether mmap-able exports were released
_REAP_SECONDS = 0.02


@dataclasses.dataclass
class Reply:
    payload: bytes = b""
    fd: int = -1
    #: close ``fd`` here once it was sent (a dup made for this reply)
    close_fd: bool = False


@dataclasses.dataclass(eq=False)
class Connection:
    """One simulated device: a process's open /dev/xen/gntdev."""

    domain: Domain | None = None
    grants: dict[int, Grant] = dataclasses.field(default_factory=dict)
    mappings: dict[int, Mapped] = dataclasses.field(default_factory=dict)
    #: its domain was destroyed: every further request is refused
    dead: bool = False


@dataclasses.dataclass(eq=False)
class Export:
    """A dma-buf made by EXP_FROM_REFS; alive until its last fd is closed
    (and, where it can be mmapped, its last mapping is gone)."""

    mapped: Mapped
    #: the socketpair end whose EOF says released (no-mmap kinds), or None
    watch: socket.socket | None
    inode: tuple[int, int]
    released: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    #: the byte whose OFD lock says the export is alive (mmap kinds)
    lock_at: int = -1


class Hypervisor:
    """Every domain's grant table, and the hazards seen so far."""

    def __init__(self, table_entries: int = DEFAULT_GRANT_ENTRIES,
                 maptrack_entries: int = DEFAULT_MAPTRACK_ENTRIES):
        self.table_entries = table_entries
        self.maptrack_entries = maptrack_entries
        self.domains: dict[int, Domain] = {}
        self.hazards: list[str] = []
        self._ids = itertools.count(1)
        self._exports: dict[int, Export] = {}
        self._export_inodes: dict[tuple[int, int], list[Export]] = {}
        self._handlers: dict[int, Callable[..., Reply | Awaitable[Reply]]] = {
            Op.HELLO: self._hello, Op.GRANT_DMABUF: self._grant_dmabuf,
            Op.GRANT_NEW: self._grant_new, Op.REVOKE: self._revoke,
            Op.MAP: self._map, Op.UNMAP: self._unmap,
            Op.EXPORT: self._export, Op.WAIT: self._wait,
            Op.HAZARDS: self._hazards, Op.STATS: self._stats,
            Op.PEEK: self._peek, Op.TRY_END: self._try_end,
            Op.DESTROY: self._destroy,
            Op.GNTALLOC_LIMIT: self._gntalloc_limit}
        #: open devices per domain id (to refuse them once it died)
        self._conns: dict[int, set[Connection]] = {}

    # -- I/O --------------------------------------------------------------

    async def serve(self, path: str) -> None:
        """Listen on ``path`` until cancelled."""
        loop = asyncio.get_running_loop()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.setblocking(False)
        server.bind(path)
        server.listen(64)
        tasks: set[asyncio.Task] = set()
        reaper = asyncio.create_task(self._reap_forever())
        try:
            while True:
                sock, _ = await loop.sock_accept(server)
                task = asyncio.create_task(self._serve_connection(sock))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            server.close()
            reaper.cancel()
            for task in tasks:
                task.cancel()

    async def _serve_connection(self, sock: socket.socket) -> None:
        conn = Connection()
        try:
            while True:
                request = await _recv_frame(sock)
                if request is None:
                    return
                reply = await self._dispatch(conn, *request)
                await _send_frame(sock, reply)
        except (ProtocolError, ConnectionError):
            return
        finally:
            sock.close()
            self._drop_connection(conn)

    async def _dispatch(self, conn: Connection, op: int, payload: bytes,
                        fds: list[int]) -> Reply:
        try:
            handler = self._handlers.get(op)
            if handler is None:
                raise ProtocolError(f"unknown operation {op}")
            if op != Op.HELLO and conn.domain is None:
                raise ProtocolError("say HELLO first")
            if conn.dead and op not in (Op.HAZARDS, Op.STATS):
                raise errors.NoGrantDevice(
                    f"domain {conn.domain.domid} was destroyed")
            reply = handler(conn, payload, fds)
            if asyncio.iscoroutine(reply):
                reply = await reply
            return dataclasses.replace(
                reply, payload=frame(STATUS_OK, reply.payload))
        except errors.GrantError as exc:
            return Reply(frame(STATUS_ERROR, encode_error(exc)))
        finally:
            for fd in fds:
                os.close(fd)

    def _drop_connection(self, conn: Connection) -> None:
        """Closing /dev/xen/gntdev: mappings go, grants end."""
        for mapped in conn.mappings.values():
            unmap(mapped)
        for grant in conn.grants.values():
            self._note(end_grant(grant), "provider closed its device: ")
        conn.mappings.clear()
        conn.grants.clear()
        if conn.domain is not None:
            self._conns.get(conn.domain.domid, set()).discard(conn)

    def _note(self, hazard: str | None, prefix: str = "") -> None:
        if hazard:
            self.hazards.append(prefix + hazard)

    # -- operations -------------------------------------------------------

    def _hello(self, conn: Connection, payload: bytes,
               fds: list[int]) -> Reply:
        domid, kind, table, maptrack = decode_hello(payload)
        if conn.domain is not None:
            raise ProtocolError("HELLO twice")
        if domid >= DOMID_FIRST_RESERVED:
            raise ProtocolError(f"domain id {domid} is reserved by Xen")
        table = table or self.table_entries
        maptrack = maptrack or self.maptrack_entries
        if table <= RESERVED_GRANT_REFS:
            raise ProtocolError(f"grant table of {table} entries")
        domain = self.domains.get(domid)
        if domain is None:
            domain = self.domains[domid] = Domain(domid, kind, table,
                                                  maptrack)
        elif not domain.describes(kind, table, maptrack):
            raise ProtocolError(
                f"domain {domid} exists with other traits: {domain.kind}")
        conn.domain = domain
        self._conns.setdefault(domid, set()).add(conn)
        return Reply()

    def _grant_dmabuf(self, conn: Connection, payload: bytes,
                      fds: list[int]) -> Reply:
        (pages, to_domid), _ = split_fixed(payload, GRANT)
        refusal = expected(conn.domain.kind).grant_dmabuf
        if refusal:
            raise refusal.exception()
        check_page_count(pages)
        if len(fds) != 1:
            raise ProtocolError("GRANT_DMABUF needs one fd")
        if self._export_of(fds[0], conn.domain) is not None:
            raise RECEIVED_DMABUF.exception()
        memfd_pages(fds[0], pages)  # any other fd is refused
        grant = Grant(next(self._ids), conn.domain, to_domid,
                      Backing(fds[0]), 0, pages, "dma-buf")
        grant.runs = conn.domain.table.allocate(grant)
        fds.pop()  # kept by the grant (the attachment IMP_TO_REFS makes)
        grant.backing.hold()
        conn.domain.live.add(grant)
        conn.grants[grant.gid] = grant
        return Reply(ID.pack(grant.gid) + encode_runs(grant.runs))

    def _export_of(self, fd: int, domain: Domain | None = None
                   ) -> Export | None:
        """The dma-buf this hypervisor exported (EXP_FROM_REFS) to
        ``domain`` (any domain: None) that ``fd`` is a copy of, if it is
        one. An mmap-able export shares its inode with the granted memfd,
        so only the domain that received it is asked about."""
        st = os.fstat(fd)
        for export in self._export_inodes.get((st.st_dev, st.st_ino), ()):
            if domain is None or export.mapped.domain is domain:
                return export
        return None

    def _grant_new(self, conn: Connection, payload: bytes,
                   fds: list[int]) -> Reply:
        (pages, to_domid), _ = split_fixed(payload, GRANT)
        check_page_count(pages)
        domain = conn.domain
        if domain.gntalloc_pages + pages > domain.gntalloc_limit:
            raise errors.GrantTableFull(
                f"ALLOC_GREF: no room for {pages} pages (ENOSPC): "
                f"xen-gntalloc's limit of {domain.gntalloc_limit} pages is "
                f"reached ({domain.gntalloc_pages} in use; "
                f"/sys/module/xen_gntalloc/parameters/limit)")
        fd = os.memfd_create("sim-gntalloc", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, pages * PAGE_SIZE)
            grant = Grant(next(self._ids), domain, to_domid,
                          Backing(fd), 0, pages, "gntalloc")
            grant.runs = domain.table.allocate(grant)
        except BaseException:
            os.close(fd)
            raise
        grant.backing.hold()
        domain.live.add(grant)
        domain.gntalloc_pages += pages
        conn.grants[grant.gid] = grant
        return Reply(ID.pack(grant.gid) + encode_runs(grant.runs), fd)

    def _revoke(self, conn: Connection, payload: bytes,
                fds: list[int]) -> Reply:
        (gid,), _ = split_fixed(payload, ID)
        grant = conn.grants.pop(gid, None)
        if grant is None:
            raise errors.AlreadyReleased(f"no grant {gid} (already revoked)")
        self._note(end_grant(grant))
        return Reply()

    def _try_end(self, conn: Connection, payload: bytes,
                 fds: list[int]) -> Reply:
        """IMP_TRY_RELEASE (kernel/0004): dma-buf grants of a kernel that
        has it; anything else answers as that kernel would (ENOTTY)."""
        (gid,), _ = split_fixed(payload, ID)
        self._reap_exports()
        grant = conn.grants.get(gid)
        if grant is None:
            raise errors.AlreadyReleased(f"no grant {gid} (already ended)")
        kind = conn.domain.kind
        if grant.what != "dma-buf" or not kind.dmabuf_ioctls \
                or not kind.release_query:
            raise errors.DmabufNotSupported(
                NO_DMABUF_IOCTLS.reason if not kind.dmabuf_ioctls else
                "IMP_TRY_RELEASE: this kernel cannot say which grants the "
                "peer still maps (ENOTTY)" if grant.what == "dma-buf" else
                "gntalloc pages: no kernel says which the peer still maps")
        held = try_end_grant(grant)
        if held == 0:
            del conn.grants[gid]
        return Reply(HELD.pack(held))

    def _destroy(self, conn: Connection, payload: bytes,
                 fds: list[int]) -> Reply:
        """A domain died (xl destroy): Xen drops every mapping it had, its
        grants end, its devices answer nothing more."""
        (domid,), _ = split_fixed(payload, DOMID)
        for victim in list(self._conns.pop(domid, ())):
            self._drop_connection(victim)
            victim.dead = True
        for export in list(self._exports.values()):
            if export.mapped.domain.domid == domid:
                self._release_export(export)
        self.domains.pop(domid, None)
        return Reply()

    def _gntalloc_limit(self, conn: Connection, payload: bytes,
                        fds: list[int]) -> Reply:
        """xen-gntalloc's ``limit`` of this domain: read it (-1), or set it
        as an admin writes /sys/module/xen_gntalloc/parameters/limit."""
        (limit,), _ = split_fixed(payload, LIMIT)
        if limit >= 0:
            conn.domain.gntalloc_limit = limit
        return Reply(HELD.pack(conn.domain.gntalloc_limit))

    def _resolve(self, conn: Connection, from_domid: int,
                 runs_data: bytes) -> Mapped:
        granter = self.domains.get(from_domid)
        runs = decode_runs(runs_data)
        if granter is None:
            raise errors.MapRefused(f"domain {from_domid} granted nothing")
        return resolve_mapping(conn.domain, granter, runs, next(self._ids))

    def _map(self, conn: Connection, payload: bytes,
             fds: list[int]) -> Reply:
        (from_domid, writable), runs = split_fixed(payload, MAP)
        self._reap_exports()
        mapped = self._resolve(conn, from_domid, runs)
        conn.mappings[mapped.mid] = mapped
        reply = MAPPED.pack(mapped.mid, mapped.first_page * PAGE_SIZE)
        if writable:
            return Reply(reply, mapped.backing.fd)
        return _read_only(reply, mapped)

    def _unmap(self, conn: Connection, payload: bytes,
               fds: list[int]) -> Reply:
        (mid,), _ = split_fixed(payload, ID)
        mapped = conn.mappings.pop(mid, None)
        if mapped is None:
            raise errors.AlreadyReleased(f"no mapping {mid}")
        unmap(mapped)
        return Reply()

    def _export(self, conn: Connection, payload: bytes,
                fds: list[int]) -> Reply:
        (from_domid,), runs = split_fixed(payload, EXPORT)
        refusal = expected(conn.domain.kind).receive_dmabuf
        if refusal:
            raise refusal.exception()
        try:
            mapped = self._resolve(conn, from_domid, runs)
        except (errors.MapRefused, errors.GrantTableFull) as exc:
            raise errors.DmabufReceiveRefused(f"EXP_FROM_REFS: {exc}") from None
        if conn.domain.kind.dmabuf_mmap:
            try:
                export, fd = self._mappable_export(mapped)
            except BaseException:
                unmap(mapped)
                raise
        else:
            watch, given = socket.socketpair()
            st = os.fstat(given.fileno())
            export = Export(mapped, watch, (st.st_dev, st.st_ino))
            watch.setblocking(False)
            asyncio.get_running_loop().add_reader(
                watch, self._export_readable, export)
            fd = given.detach()
        self._exports[mapped.mid] = export
        self._export_inodes.setdefault(export.inode, []).append(export)
        return Reply(ID.pack(mapped.mid), fd, close_fd=True)

    def _mappable_export(self, mapped: Mapped) -> tuple[Export, int]:
        """A new open file of the pages' memfd, read-write, holding an OFD
        read lock on this export's byte: (the export, the fd to hand out)."""
        if mapped.first_page != 0:
            raise SimulatorLimit(
                "the simulator exports an mmap-able dma-buf only of refs "
                "that start at the first page of a grant")
        fd = os.open(f"/proc/self/fd/{mapped.backing.fd}",
                     os.O_RDWR | os.O_CLOEXEC)
        lock_at = _LOCK_BASE + mapped.mid
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK,
                        _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, lock_at, 1, 0))
        except BaseException:
            os.close(fd)
            raise
        st = os.fstat(fd)
        return Export(mapped, None, (st.st_dev, st.st_ino),
                      lock_at=lock_at), fd

    def _export_alive(self, export: Export) -> bool:
        """Whether a copy of an mmap-able export's file is still open or
        mapped somewhere: its OFD lock is still there."""
        answer = fcntl.fcntl(
            export.mapped.backing.fd, fcntl.F_OFD_GETLK,
            _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, export.lock_at, 1, 0))
        return _FLOCK.unpack(answer)[0] != fcntl.F_UNLCK

    def _reap_exports(self) -> None:
        """Release every mmap-able export nobody holds any more."""
        for export in list(self._exports.values()):
            if export.watch is None and not self._export_alive(export):
                self._release_export(export)

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(_REAP_SECONDS)
            self._reap_exports()

    def _export_readable(self, export: Export) -> None:
        try:
            if export.watch.recv(4096):
                return  # someone wrote into the "dma-buf": ignore
        except BlockingIOError:
            return
        except OSError:
            pass
        self._release_export(export)

    def _release_export(self, export: Export) -> None:
        """The last user let go (or its domain died): unmap its pages."""
        if export.watch is not None:
            asyncio.get_running_loop().remove_reader(export.watch)
            export.watch.close()
        del self._exports[export.mapped.mid]
        same = self._export_inodes[export.inode]
        same.remove(export)
        if not same:
            del self._export_inodes[export.inode]
        unmap(export.mapped)
        export.released.set()

    async def _wait(self, conn: Connection, payload: bytes,
                    fds: list[int]) -> Reply:
        (eid, timeout_ms), _ = split_fixed(payload, WAIT)
        self._reap_exports()
        export = self._exports.get(eid)
        if export is None or export.mapped.domain is not conn.domain:
            raise errors.AlreadyReleased(f"no exported dma-buf {eid}")
        try:
            await asyncio.wait_for(export.released.wait(), timeout_ms / 1000)
        except asyncio.TimeoutError:
            raise errors.ReleaseTimeout(
                f"exported dma-buf {eid} is still in use after "
                f"{timeout_ms} ms") from None
        return Reply()

    def _peek(self, conn: Connection, payload: bytes,
              fds: list[int]) -> Reply:
        """Simulator only: the pages behind one of this domain's exports,
        read-only (what a GPU driver importing the dma-buf would read)."""
        if len(fds) != 1:
            raise ProtocolError("PEEK needs one fd")
        export = self._export_of(fds[0], conn.domain)
        if export is None:
            raise errors.GrantError(
                "not a dma-buf this domain received from the simulator")
        mapped = export.mapped
        return _read_only(PEEKED.pack(mapped.pages,
                                      mapped.first_page * PAGE_SIZE), mapped)

    def _hazards(self, conn: Connection, payload: bytes,
                 fds: list[int]) -> Reply:
        return Reply("\n".join(self.hazards).encode()[-60000:])

    def _stats(self, conn: Connection, payload: bytes,
               fds: list[int]) -> Reply:
        (domid,), _ = split_fixed(payload, STATS)
        self._reap_exports()
        domain = self.domains.get(domid)
        if domain is None:
            raise errors.GrantError(f"no domain {domid}")
        return Reply(STATS_REPLY.pack(
            domain.table.used, domain.table.size - RESERVED_GRANT_REFS,
            domain.mapped_pages, len(self._exports),
            len(os.listdir("/proc/self/fd")), len(self.hazards),
            *domain.deferred(), domain.gntalloc_pages,
            domain.gntalloc_limit))


def _read_only(payload: bytes, mapped: Mapped) -> Reply:
    """A reply carrying a read-only reopening of the mapped memory: mapping
    it writable fails, as for a read-only gntdev fd."""
    readonly = os.open(f"/proc/self/fd/{mapped.backing.fd}",
                       os.O_RDONLY | os.O_CLOEXEC)
    return Reply(payload, readonly, close_fd=True)


async def _recv_frame(sock: socket.socket
                      ) -> tuple[int, bytes, list[int]] | None:
    """One request with its fds, or None at EOF between frames."""
    loop = asyncio.get_running_loop()
    reader = FrameReader()
    try:
        while not reader.done():
            try:
                received = sock.recvmsg(reader.wanted(), ANCILLARY_SIZE)
            except BlockingIOError:
                await _readable(loop, sock)
                continue
            if not reader.take(*received[:3]):
                return None
    except BaseException:
        reader.close()
        raise
    return reader.code, reader.payload(), reader.detach_fds()


async def _readable(loop: asyncio.AbstractEventLoop,
                    sock: socket.socket) -> None:
    ready = loop.create_future()
    loop.add_reader(sock, ready.set_result, None)
    try:
        await ready
    finally:
        loop.remove_reader(sock)


async def _send_frame(sock: socket.socket, reply: Reply) -> None:
    loop = asyncio.get_running_loop()
    data = reply.payload
    try:
        if reply.fd >= 0:
            # a request waits for its reply, so the socket buffer is empty
            sent = sock.sendmsg([data], rights(reply.fd))
            data = data[sent:]
        if data:
            await loop.sock_sendall(sock, data)
    finally:
        if reply.close_fd:
            os.close(reply.fd)


def serve_forever(path: str, table_entries: int = DEFAULT_GRANT_ENTRIES,
                  maptrack_entries: int = DEFAULT_MAPTRACK_ENTRIES) -> None:
    """Run a hypervisor on ``path`` until SIGTERM/SIGINT."""
    import signal

    async def main() -> None:
        task = asyncio.create_task(
            Hypervisor(table_entries, maptrack_entries).serve(path))
        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass

    asyncio.run(main())

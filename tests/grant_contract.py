"""The contract of grant/device.py: one suite for every implementation.

A test module includes it with ``from grant_contract import *`` and defines a
``grant_impl`` fixture returning a :class:`GrantImpl`: how to open a
provider's and a consumer's device, their domain ids and kinds. The expected
outcome of the dma-buf paths comes from grant/expected.py, so the same tests
hold the simulator and real Xen to one table.

Imports only pytest, the standard library and the package: the Xen lab runs
this file inside a minimal initramfs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import pytest

from qubes_gpu_share.formats import MAX_LEASE_PAGES, PAGE_SIZE
from qubes_gpu_share.grant import errors
from qubes_gpu_share.grant.device import CpuView, GrantDevice
from qubes_gpu_share.grant.expected import (RECEIVED_DMABUF, DomainKind,
                                            expected)

__all__ = ["GrantImpl", "pair"]


@dataclasses.dataclass
class GrantImpl:
    """What a test module tells the contract about one implementation."""

    open_provider: Callable[[], GrantDevice]
    open_consumer: Callable[[], GrantDevice]
    provider_domid: int
    consumer_domid: int
    #: a domain that is neither: refs granted to it must not map here
    stranger_domid: int
    provider_kind: DomainKind
    consumer_kind: DomainKind
    #: a dma-buf of that many pages (the caller closes it), or None
    make_dmabuf: Callable[[int], int] | None = None


class Pair:
    """A provider and a consumer device, and the dma-bufs a test made."""

    def __init__(self, impl: GrantImpl):
        self.impl = impl
        self.provider = impl.open_provider()
        self.consumer = impl.open_consumer()
        self._dmabufs: list[int] = []

    def dmabuf(self, pages: int) -> int:
        if self.impl.make_dmabuf is None:
            pytest.skip("no dma-buf source here (needs udmabuf or a heap)")
        fd = self.impl.make_dmabuf(pages)
        self._dmabufs.append(fd)
        return fd

    def close_dmabufs(self) -> None:
        for fd in self._dmabufs:
            os.close(fd)
        self._dmabufs.clear()


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def pair(grant_impl: GrantImpl):
    """The devices, and fd hygiene: every test must leave the fd table as
    it found it, error paths included."""
    devices = Pair(grant_impl)
    try:
        before = _open_fds()
        yield devices
        devices.close_dmabufs()
        leaked = _open_fds() - before
        assert not leaked, f"fds leaked: {sorted(leaked)}"
    finally:
        devices.close_dmabufs()
        devices.provider.close()
        devices.consumer.close()


# A gntdev mapping can be mmapped ONCE (Linux 6.1's gntdev_mmap refuses a
# second mmap of the same MAP_GRANT_REF range with EINVAL, and the first one
# fixes it read-only or writable): every test reads and writes a
# ForeignMapping's pages through one mmap. _read/_write are for the provider's own pages.

def _write(view: CpuView, data: bytes, at: int = 0) -> None:
    with view.mmap() as mm:
        mm[at:at + len(data)] = data


def _read(view: CpuView, size: int, at: int = 0) -> bytes:
    with view.mmap(writable=False) as mm:
        return bytes(mm[at:at + size])


# -- CPU path: gntalloc pages mapped by the consumer -------------------------

def test_allocated_pages_are_shared_both_ways(pair):
    with pair.provider.grant_new_pages(3, pair.impl.consumer_domid) as grant:
        assert grant.pages == 3 and len(set(grant.refs)) == 3
        assert grant.domid == pair.impl.consumer_domid
        assert _read(grant.view(), 3 * PAGE_SIZE) == bytes(3 * PAGE_SIZE)
        _write(grant.view(), b"provider", at=2 * PAGE_SIZE)
        with pair.consumer.map_grant(pair.impl.provider_domid,
                                     grant.refs) as mapping:
            assert mapping.length == 3 * PAGE_SIZE
            with mapping.view().mmap() as pages:  # the mapping's one mmap
                assert pages[2 * PAGE_SIZE:2 * PAGE_SIZE + 8] == b"provider"
                pages[0:8] = b"consumer"
        assert _read(grant.view(), 8) == b"consumer"


def test_read_only_mapping_cannot_be_mapped_writable(pair):
    with pair.provider.grant_new_pages(1, pair.impl.consumer_domid) as grant:
        _write(grant.view(), b"ro")
        with pair.consumer.map_grant(pair.impl.provider_domid, grant.refs,
                                     writable=False) as mapping:
            # refused by the VFS (read-only fd) before gntdev sees it, so
            # the one mmap the mapping gets is still there afterwards
            with pytest.raises(OSError):
                mapping.view().mmap(writable=True)
            assert _read(mapping.view(), 2) == b"ro"


def test_consumer_in_another_process_sees_the_same_pages(pair):
    impl = pair.impl
    with pair.provider.grant_new_pages(2, impl.consumer_domid) as grant:
        _write(grant.view(), b"from provider", at=PAGE_SIZE)
        readme, writeme = os.pipe()
        pid = os.fork()
        if pid == 0:  # the consumer process
            status = 1
            try:
                os.close(readme)
                with impl.open_consumer() as device, device.map_grant(
                        impl.provider_domid, grant.refs) as mapping, \
                        mapping.view().mmap() as pages:  # one mmap
                    seen = bytes(pages[PAGE_SIZE:PAGE_SIZE + 13])
                    pages[0:13] = b"from consumer"
                os.write(writeme, seen)
                status = 0
            finally:
                os._exit(status)
        os.close(writeme)
        seen = os.read(readme, 64)
        os.close(readme)
        assert os.waitpid(pid, 0)[1] == 0
        assert seen == b"from provider"
        assert _read(grant.view(), 13) == b"from consumer"


# -- the rules -----------------------------------------------------------

def test_only_the_named_grantee_may_map(pair):
    with pair.provider.grant_new_pages(1, pair.impl.stranger_domid) as grant:
        with pytest.raises(errors.MapRefused):
            pair.consumer.map_grant(pair.impl.provider_domid, grant.refs)


def test_ended_refs_cannot_be_mapped(pair):
    grant = pair.provider.grant_new_pages(2, pair.impl.consumer_domid)
    grant.revoke()
    with pytest.raises(errors.MapRefused):
        pair.consumer.map_grant(pair.impl.provider_domid, grant.refs)


def test_revoking_twice_is_already_released(pair):
    grant = pair.provider.grant_new_pages(1, pair.impl.consumer_domid)
    grant.revoke()
    with pytest.raises(errors.AlreadyReleased):
        grant.revoke()
    grant.close()  # the idempotent variant


def test_context_manager_revokes(pair):
    with pair.provider.grant_new_pages(1, pair.impl.consumer_domid) as grant:
        pass
    with pytest.raises(errors.AlreadyReleased):
        grant.revoke()
    with pytest.raises(errors.MapRefused):
        pair.consumer.map_grant(pair.impl.provider_domid, grant.refs)


@pytest.mark.parametrize("pages", [0, MAX_LEASE_PAGES + 1, -1, True])
def test_page_counts_are_bounded_before_the_call(pair, pages):
    with pytest.raises(errors.TooManyPages):
        pair.provider.grant_new_pages(pages, pair.impl.consumer_domid)
    with pytest.raises(errors.TooManyPages):
        pair.provider.grant_dmabuf(0, pages, pair.impl.consumer_domid)


@pytest.mark.parametrize("count", [0, MAX_LEASE_PAGES + 1])
def test_ref_counts_are_bounded_before_the_call(pair, count):
    refs = list(range(8, 8 + count))
    with pytest.raises(errors.TooManyPages):
        pair.consumer.map_grant(pair.impl.provider_domid, refs)
    with pytest.raises(errors.TooManyPages):
        pair.consumer.import_dmabuf(pair.impl.provider_domid, refs)


# -- dma-buf path ---------------------------------------------------------

def test_dmabuf_grant_follows_the_table(pair):
    refusal = expected(pair.impl.provider_kind).grant_dmabuf
    dmabuf = pair.dmabuf(2)
    if refusal:
        with pytest.raises(refusal.error):
            pair.provider.grant_dmabuf(dmabuf, 2, pair.impl.consumer_domid)
        return
    with pair.provider.grant_dmabuf(dmabuf, 2,
                                    pair.impl.consumer_domid) as grant:
        assert grant.pages == 2 and len(set(grant.refs)) == 2
        with pair.consumer.map_grant(pair.impl.provider_domid,
                                     grant.refs) as mapping:
            _write(mapping.view(), b"seen by the owner", at=PAGE_SIZE)
            # a dma-buf fd cannot be read or seeked, only mmapped
            with CpuView(dmabuf, 0, 2 * PAGE_SIZE).mmap(
                    writable=False) as owner:
                assert owner[PAGE_SIZE:PAGE_SIZE + 17] == b"seen by the owner"


@pytest.mark.parametrize("declared", [1, 3])
def test_dmabuf_of_another_size_is_not_grantable(pair, declared):
    if expected(pair.impl.provider_kind).grant_dmabuf:
        pytest.skip("this provider cannot grant dma-bufs at all")
    dmabuf = pair.dmabuf(2)
    with pytest.raises(errors.NotGrantable):
        pair.provider.grant_dmabuf(dmabuf, declared, pair.impl.consumer_domid)


def _grant_for_import(pair):
    if expected(pair.impl.provider_kind).grant_dmabuf:
        return pair.provider.grant_new_pages(2, pair.impl.consumer_domid)
    return pair.provider.grant_dmabuf(pair.dmabuf(2), 2,
                                      pair.impl.consumer_domid)


def test_dmabuf_receive_follows_the_table(pair):
    refusal = expected(pair.impl.consumer_kind).receive_dmabuf
    with _grant_for_import(pair) as grant:
        if refusal:
            with pytest.raises(refusal.error):
                pair.consumer.import_dmabuf(pair.impl.provider_domid,
                                            grant.refs)
            return
        imported = pair.consumer.import_dmabuf(pair.impl.provider_domid,
                                               grant.refs)
        with imported:
            assert imported.fd >= 0 and imported.refs == grant.refs
            if expected(pair.impl.consumer_kind).mmap_dmabuf:
                with pytest.raises(OSError):  # no mmap without kernel/0002
                    imported.view().mmap()
            else:
                with imported.view().mmap(writable=False) as seen:
                    assert len(seen) == 2 * PAGE_SIZE
            imported.release(timeout_ms=2000)
        with pytest.raises(errors.AlreadyReleased):
            imported.release(timeout_ms=0)


def test_release_waits_for_the_last_user(pair):
    if expected(pair.impl.consumer_kind).receive_dmabuf:
        pytest.skip("this consumer cannot receive dma-bufs")
    with _grant_for_import(pair) as grant:
        imported = pair.consumer.import_dmabuf(pair.impl.provider_domid,
                                               grant.refs)
        application = os.dup(imported.fd)
        try:
            with pytest.raises(errors.ReleaseTimeout):
                imported.release(timeout_ms=50)
        finally:
            os.close(application)
        imported.release(timeout_ms=2000)  # continues the wait
        with pytest.raises(errors.AlreadyReleased):
            imported.release(timeout_ms=0)


def test_received_dmabuf_cannot_be_granted_on(pair):
    """A dma-buf made of the provider's refs is grant mappings, not the
    consumer's RAM: Xen would refuse every ref of it (GNTST_bad_page), so
    the device refuses before IMP_TO_REFS, holds nothing (the fixture
    counts fds), and the import still releases."""
    impl = pair.impl
    if expected(impl.consumer_kind).receive_dmabuf:
        pytest.skip("this consumer cannot receive dma-bufs")
    with pair.provider.grant_new_pages(2, impl.consumer_domid) as grant:
        imported = pair.consumer.import_dmabuf(impl.provider_domid,
                                               grant.refs)
        with imported:
            with pytest.raises(errors.NotGrantable) as refused:
                pair.consumer.grant_dmabuf(imported.fd, 2,
                                           impl.provider_domid)
            assert str(refused.value) == RECEIVED_DMABUF.reason
            imported.release(timeout_ms=2000)


def test_ending_a_mapped_dmabuf_grant_reports_held_pages(pair):
    """IMP_TRY_RELEASE (kernel/0004) where the provider's kernel has it:
    the pages the consumer maps stay granted and are counted; without it
    (and for gntalloc pages, always) the grant is ended the old way and
    nothing is said (None)."""
    impl = pair.impl
    table = expected(impl.provider_kind)
    if table.grant_dmabuf:
        pytest.skip("this provider cannot grant dma-bufs at all")
    grant = pair.provider.grant_dmabuf(pair.dmabuf(3), 3, impl.consumer_domid)
    mapping = pair.consumer.map_grant(impl.provider_domid, grant.refs[:2])
    with mapping, mapping.view().mmap() as pages:  # Xen maps at mmap
        pages[:4] = b"held"
        held = grant.try_end()
        if table.held_pages:
            assert held == 2
            assert grant.try_end() == 2  # asked again: still held
        else:
            assert held is None
    if table.held_pages:
        assert grant.try_end() == 0
    with pytest.raises(errors.AlreadyReleased):
        grant.try_end()
    with pytest.raises(errors.MapRefused):
        pair.consumer.map_grant(impl.provider_domid, grant.refs)
    pages = pair.provider.grant_new_pages(1, impl.consumer_domid)
    assert pages.try_end() is None   # no kernel reports on gntalloc pages


def test_refused_calls_leak_nothing(pair):
    """Error paths: the fixture counts fds after each of these."""
    grant = pair.provider.grant_new_pages(2, pair.impl.consumer_domid)
    grant.revoke()
    with pytest.raises(errors.GrantError):
        pair.consumer.import_dmabuf(pair.impl.provider_domid, grant.refs)
    with pytest.raises(errors.MapRefused):
        pair.consumer.map_grant(pair.impl.provider_domid, grant.refs)
    with pytest.raises(errors.GrantError):
        pair.provider.grant_dmabuf(pair.dmabuf(1), 2,
                                   pair.impl.consumer_domid)


__all__ += [name for name in dir() if name.startswith("test_")]

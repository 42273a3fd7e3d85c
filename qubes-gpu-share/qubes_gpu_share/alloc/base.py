"""The allocation seam: where the pages of a buffer come from.

IMP_TO_REFS grants a dma-buf of whole pages of system RAM, so a provider
needs a dma-buf exporter that allocates there: udmabuf over a memfd, a
dma-heap, or a GPU driver that places linear buffers in system memory. The
grant simulator takes a plain memfd in place of a dma-buf. Every source sits
behind :class:`Allocator`, and every buffer is an :class:`Allocation` that owns
its file descriptors, so callers never see which source they got.

An allocator reports whether it can work here (:meth:`Allocator.availability`)
with a reason a person can act on, instead of failing later in an ioctl.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import mmap
import os
from collections.abc import Iterable
from types import TracebackType

from ..formats import PAGE_SIZE


class AllocationError(Exception):
    """A buffer could not be allocated or adopted; the message says why."""


class AllocatorUnavailable(AllocationError):
    """The allocator cannot work on this machine (device missing, permission
    denied, native helper not built, memory placement unsuitable)."""


class NotMappable(AllocationError):
    """The buffer has no CPU mapping (e.g. a dma-buf gntdev exported)."""


@dataclasses.dataclass(frozen=True)
class Availability:
    """Whether an allocator works here; ``reason`` says why not (or, when it
    works, an optional caveat)."""

    ok: bool
    reason: str = ""


def round_to_pages(size: int) -> int:
    """Whole pages covering ``size`` bytes: a grant covers whole pages."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise AllocationError(f"buffer size must be a positive integer, "
                              f"got {size!r}")
    return -(-size // PAGE_SIZE) * PAGE_SIZE


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd, even if one close fails (it is then re-raised)."""
    first_error: OSError | None = None
    for fd in fds:
        try:
            os.close(fd)
        except OSError as exc:
            first_error = first_error or exc
    if first_error is not None:
        raise first_error


def open_device(path: str) -> int:
    """Open a device node read-write, with the reason as the error."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise AllocatorUnavailable(f"{path} is missing") from None
    except PermissionError:
        raise AllocatorUnavailable(
            f"permission denied on {path} (not in its group?)") from None
    except OSError as exc:
        raise AllocatorUnavailable(f"cannot open {path}: {exc}") from None


def load_native():
    """The ioctl helper (qubes_gpu_share.native), imported only when a real
    device is used, so that this package imports before it is built."""
    try:
        from .. import native
    except ImportError as exc:
        raise AllocatorUnavailable(
            f"the native helper is not built ({exc}); run make") from None
    return native


def device_availability(path: str) -> Availability:
    """Whether an allocator over the device node ``path`` (and the native
    ioctl helper) can work here."""
    try:
        os.close(open_device(path))
        load_native()
    except AllocatorUnavailable as exc:
        return Availability(False, str(exc))
    return Availability(True)


class Allocation:
    """One buffer owned by this process.

    ``fd`` is the buffer to grant or pass on (a dma-buf, or a memfd for the
    simulator); ``size`` is in bytes, whole pages. The object also owns any
    fd the buffer needs to stay alive (the memfd under a udmabuf) and closes
    them all on :meth:`close` or context-manager exit.
    """

    def __init__(self, fd: int, size: int, kind: str, *,
                 keep_fds: tuple[int, ...] = (), mappable: bool = True):
        self.fd = fd
        self.size = size
        #: which source made it: memfd, udmabuf, dma-heap, drm-dumb, ...
        self.kind = kind
        self._keep_fds = keep_fds
        self._mappable = mappable
        self._closed = False

    @property
    def pages(self) -> int:
        return self.size // PAGE_SIZE

    @property
    def closed(self) -> bool:
        return self._closed

    def mmap(self, writable: bool = True) -> mmap.mmap:
        """Map the whole buffer for the CPU (shared with every other user)."""
        if self._closed:
            raise ValueError("allocation is closed")
        if not self._mappable:
            raise NotMappable(f"a {self.kind} buffer has no CPU mapping")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, prot)

    def close(self) -> None:
        """Close every fd this allocation owns; idempotent. Pages live on
        while a grant, a dup or a mapping still holds them."""
        if not self._closed:
            self._closed = True
            close_fds((self.fd, *self._keep_fds))

    def __enter__(self) -> Allocation:
        return self

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"fd={self.fd}"
        return f"<Allocation {self.kind} {self.size} bytes {state}>"


class Allocator(abc.ABC):
    """A source of buffers. ``name`` identifies it in probe output and logs
    (``memfd``, ``udmabuf``, ``dma-heap:system``, ``drm-dumb:card0``)."""

    name: str

    @abc.abstractmethod
    def availability(self) -> Availability:
        """Whether :meth:`allocate` can work here, without allocating."""

    @abc.abstractmethod
    def allocate(self, size: int) -> Allocation:
        """A new zeroed buffer of ``size`` bytes rounded up to whole pages.
        Raises AllocatorUnavailable or AllocationError with the reason."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def fd_kind(fd: int) -> str:
    """What an fd handed over by an application is: ``memfd``, ``dmabuf``
    or ``other``, from the name the kernel gives it."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise AllocationError(f"fd {fd} is not open: {exc}") from None
    if target.startswith("/memfd:"):
        return "memfd"
    if target.startswith("anon_inode:dmabuf") or target.startswith("/dmabuf:"):
        return "dmabuf"
    return "other"


def fd_size(fd: int) -> int:
    """Size of a memfd or dma-buf: dma-bufs report it through lseek."""
    return os.lseek(fd, 0, os.SEEK_END)


def adopt(fd: int) -> Allocation:
    """Take ownership of a memfd or dma-buf an application handed over (the
    offer flow). The fd is owned by the result, or closed if it is refused:
    either way the caller must not close it. Its size must be whole pages.
    A memfd still needs udmabuf to become a dma-buf the real grant device
    accepts (see :func:`.udmabuf.UdmabufAllocator.adopt_memfd`)."""
    try:
        kind = fd_kind(fd)
        if kind == "other":
            raise AllocationError(
                "the offered fd is neither a memfd nor a dma-buf")
        size = fd_size(fd)
        if size <= 0 or size % PAGE_SIZE:
            raise AllocationError(
                f"the offered buffer is {size} bytes; it must be a positive "
                f"multiple of the page size ({PAGE_SIZE})")
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise
    return Allocation(fd, size, f"adopted-{kind}")

"""Thin wrappers over the compiled :mod:`qubes_gpu_share._native` module.

One function per ioctl, taking and returning plain integers. A grant-device
refusal becomes the specific exception of :mod:`.grant.errors`, with a
one-line message that says what to do; callers never look at errno. The
ioctls of buffer allocators (udmabuf, dma-heap, DRM) are not grant refusals:
they raise OSError, with the errno kept and the likely cause in the message.

Struct layouts and ioctl numbers come from the compiled module (the system's
headers at build time, see _native_build.py); nothing is retyped here.
Objects that own these fds live in :mod:`.grant.gntdev` and the allocators.
"""

from __future__ import annotations

import errno
import os
import platform
from collections.abc import Callable, Sequence

from ._native import ffi, lib
from .grant import this_domain
from .grant.device import check_page_count
from .grant.expected import VirtMode
from .grant.errors import (
    AlreadyReleased, DmabufNotSupported, DmabufReceiveRefused, GrantError,
    GrantTableFull, NoGrantDevice, NotGrantable, ReleaseTimeout)

GNTDEV_PATH = "/dev/xen/gntdev"
GNTALLOC_PATH = "/dev/xen/gntalloc"

#: Turns an errno into the exception to raise, or None for the default one.
Explain = Callable[[int], "BaseException | None"]

NO_DMABUF = ("{name}: the kernel was built without CONFIG_XEN_GNTDEV_DMABUF "
             "(ENOTTY); use a kernel that has it (Qubes' kernels do), or "
             "'cpu' receive mode and gntalloc providing")


# --- opening devices -------------------------------------------------------

def open_device(path: str, module: str, writable: bool = True) -> int:
    """Open a Xen device node; NoGrantDevice when it is absent.

    A gntdev fd opened read-only still maps grants, but the VFS refuses a
    writable shared mmap of it: that is how a read-only mapping is enforced
    on whoever is handed the fd.
    """
    mode = os.O_RDWR if writable else os.O_RDONLY
    try:
        return os.open(path, mode | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise NoGrantDevice(
            f"{path} is missing: not running in a Xen domain, or the "
            f"{module} module is not loaded (modprobe {module})") from exc
    except OSError as exc:
        if exc.errno in (errno.ENODEV, errno.ENXIO):
            raise NoGrantDevice(
                f"{path} has no driver behind it: load {module} "
                f"(modprobe {module})", exc.errno) from exc
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise GrantError(
                f"{path}: permission denied; run the agent as root or give "
                f"its user access with a udev rule", exc.errno) from exc
        raise


def open_gntdev(writable: bool = True) -> int:
    return open_device(GNTDEV_PATH, "xen-gntdev", writable)


def open_gntalloc() -> int:
    return open_device(GNTALLOC_PATH, "xen-gntalloc")


# --- the one place that calls ioctl ----------------------------------------

def _ioctl(fd: int, name: str, arg, explain: Explain | None = None) -> int:
    """ioctl(fd, lib.<name>, arg) -> its non-negative result; retried on
    EINTR, a refusal raised as ``explain(errno)`` (or a plain GrantError)."""
    request = getattr(lib, name)
    while True:
        result = lib.qgs_ioctl(fd, request, arg)
        if result >= 0:
            return result
        err = ffi.errno
        if err != errno.EINTR:
            break
    exc = explain(err) if explain is not None else None
    raise exc if exc is not None else GrantError(
        f"{name}: {os.strerror(err)}", err)


def _new_with_array(struct: str, array: str, count: int):
    """A zeroed ``struct`` whose trailing ``array[1]`` holds ``count`` items.

    Returns (struct pointer, items pointer, owner); keep ``owner`` referenced
    while the pointers are used (cast pointers do not keep memory alive).
    The size comes from the compiled layout:
    max(sizeof, offsetof(array) + count * sizeof(item)).
    """
    item = dict(ffi.typeof(f"struct {struct}").fields)[array].type.item
    start = ffi.offsetof(f"struct {struct}", array)
    size = max(ffi.sizeof(f"struct {struct}"),
               start + count * ffi.sizeof(item))
    owner = ffi.new("char[]", size)
    return (ffi.cast(f"struct {struct} *", owner),
            ffi.cast(ffi.getctype(item, "*"), owner + start), owner)


def _grant_refusals(name: str, einval: str | None = None,
                    enoent: str | None = None,
                    dmabuf: bool = True) -> Explain:
    """The errno table shared by the gntdev ioctls (``dmabuf``: one of the
    four DMABUF ioctls, which a kernel without them answers ENOTTY)."""
    def explain(err: int) -> GrantError | None:
        if err == errno.ENOTTY and dmabuf:
            return DmabufNotSupported(NO_DMABUF.format(name=name))
        if err == errno.ENOSPC:
            return GrantTableFull(
                f"{name}: grant table full (ENOSPC); end leases, or raise "
                f"the domain's max_grant_frames (qvm-prefs / xl.cfg)")
        if err == errno.EINVAL and einval is not None:
            return einval_exception(name, einval)
        if err == errno.ENOENT and enoent is not None:
            return AlreadyReleased(f"{name}: {enoent}")
        return None
    return explain


def einval_exception(name: str, kind: str) -> GrantError:
    if kind == "import":
        return NotGrantable(
            f"{name}: the dma-buf is not whole pages of system RAM, or its "
            f"size is not the page count (EINVAL); VRAM or PFNMAP buffers "
            f"cannot be granted: allocate in system memory")
    mode = this_domain.virt_mode(this_domain.SYS_ROOT)
    return DmabufReceiveRefused(
        f"{name}: {receive_refusal(mode, platform.machine())}")


def receive_refusal(mode: VirtMode | None, machine: str) -> str:
    """Why EXP_FROM_REFS said EINVAL here, as precisely as we can tell."""
    cpu_works = "; receive in 'cpu' mode (MAP_GRANT_REF + mmap), it works"
    if mode is VirtMode.PV:
        return ("this qube is PV: its kernel cannot make a dma-buf of "
                "foreign grants (EINVAL)" + cpu_works)
    if mode in (VirtMode.PVH, VirtMode.HVM) and machine in (
            "x86_64", "i686", "i386"):
        guest = mode.value.upper()
        return (f"this {guest} x86 kernel requests the device map Xen "
                f"refuses for auto-translated guests (needs the "
                f"gntdev-dmabuf fix), or a ref/domid is wrong or maptrack "
                f"is exhausted (EINVAL)" + cpu_works)
    return ("a ref is not granted to this domain, the domid is wrong, or "
            "maptrack is exhausted (EINVAL)" + cpu_works)


# --- gntdev: granting a dma-buf (provider) ---------------------------------

def imp_to_refs(gntdev_fd: int, dmabuf_fd: int, pages: int,
                domid: int) -> tuple[int, ...]:
    """IMP_TO_REFS: grant a dma-buf of ``pages`` pages to ``domid``.

    The kernel remembers the import by ``dmabuf_fd``'s number: keep that fd
    open and unchanged until :func:`imp_release`.
    """
    count = check_page_count(pages)
    op, refs, _owner = _new_with_array(
        "ioctl_gntdev_dmabuf_imp_to_refs", "refs", count)
    op.fd, op.count, op.domid = dmabuf_fd, count, domid
    _ioctl(gntdev_fd, "IOCTL_GNTDEV_DMABUF_IMP_TO_REFS", op,
           _grant_refusals("IMP_TO_REFS", einval="import"))
    return tuple(refs[0:count])


def imp_release(gntdev_fd: int, dmabuf_fd: int) -> None:
    """IMP_RELEASE: end the grants made from ``dmabuf_fd``.

    The kernel cannot end a grant the peer still maps: it defers that end
    (drivers/xen/grant-table.c, gnttab_add_deferred) and says nothing; the
    ioctl returns 0 either way."""
    op = ffi.new("struct ioctl_gntdev_dmabuf_imp_release *")
    op.fd = dmabuf_fd
    _ioctl(gntdev_fd, "IOCTL_GNTDEV_DMABUF_IMP_RELEASE", op,
           _grant_refusals("IMP_RELEASE", enoent="already released"))


def imp_try_release(gntdev_fd: int, dmabuf_fd: int) -> int:
    """IMP_TRY_RELEASE (kernel/0004-*.patch): end the grants made from
    ``dmabuf_fd`` that the peer no longer maps; returns how many it still
    maps (those stay granted, and the import stays: call again later). 0
    means every grant was ended and the import released.

    DmabufNotSupported (ENOTTY) on a kernel without the ioctl (or without
    any DMABUF ioctl): use :func:`imp_release`. AlreadyReleased (ENOENT)
    when nothing is imported under that fd."""
    op = ffi.new("struct ioctl_gntdev_dmabuf_imp_try_release *")
    op.fd = dmabuf_fd
    base = _grant_refusals("IMP_TRY_RELEASE", enoent="not imported "
                           "(already released)")

    def explain(err: int) -> GrantError | None:
        if err == errno.ENOTTY:
            return DmabufNotSupported(
                "IMP_TRY_RELEASE: this kernel's gntdev cannot say which "
                "grants the peer still maps (ENOTTY; kernel/0004-*.patch "
                "adds it); ending grants with IMP_RELEASE instead")
        return base(err)
    _ioctl(gntdev_fd, "IOCTL_GNTDEV_DMABUF_IMP_TRY_RELEASE", op, explain)
    return op.mapped


# --- gntdev: receiving (consumer) --------------------------------------------

def exp_from_refs(gntdev_fd: int, domid: int, refs: Sequence[int]) -> int:
    """EXP_FROM_REFS: a new dma-buf fd of ``domid``'s refs (caller owns it)."""
    count = check_page_count(len(refs))
    op, items, _owner = _new_with_array(
        "ioctl_gntdev_dmabuf_exp_from_refs", "refs", count)
    op.count, op.domid = count, domid
    items[0:count] = list(refs)
    _ioctl(gntdev_fd, "IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS", op,
           _grant_refusals("EXP_FROM_REFS", einval="receive"))
    return op.fd


def exp_wait_released(gntdev_fd: int, exported_fd: int,
                      timeout_ms: int) -> None:
    """EXP_WAIT_RELEASED, keyed by the fd number the export returned."""
    op = ffi.new("struct ioctl_gntdev_dmabuf_exp_wait_released *")
    op.fd, op.wait_to_ms = exported_fd, timeout_ms
    base = _grant_refusals("EXP_WAIT_RELEASED",
                           enoent="already released (nothing to wait for)")

    def explain(err: int) -> GrantError | None:
        if err == errno.ETIMEDOUT:
            return ReleaseTimeout(
                f"EXP_WAIT_RELEASED: a user of the dma-buf still holds it "
                f"after {timeout_ms} ms (ETIMEDOUT); ask it to close, then "
                f"wait again")
        return base(err)
    _ioctl(gntdev_fd, "IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED", op, explain)


def map_grant_ref(gntdev_fd: int, domid: int, refs: Sequence[int]) -> int:
    """MAP_GRANT_REF: reserve ``refs`` for mmap; returns the mmap offset.

    Xen checks the refs only when the range is mmapped.
    """
    count = check_page_count(len(refs))
    op, items, _owner = _new_with_array(
        "ioctl_gntdev_map_grant_ref", "refs", count)
    op.count = count
    for item, ref in zip(items[0:count], refs):
        item.domid, item.ref = domid, ref
    _ioctl(gntdev_fd, "IOCTL_GNTDEV_MAP_GRANT_REF", op,
           _grant_refusals("MAP_GRANT_REF", dmabuf=False))
    return op.index


#: GNTST_okay, Xen's "no error" grant status. The kernel's UAPI headers
#: name GNTST_* but do not define them (they are Xen's public grant_table.h),
#: so only this one value is used: 0, and any other status is a refusal.
GNTST_OKAY = 0

#: Xen's names for the GNTST_* statuses a refused ref gets, for messages.
GNTST_NAMES = {-1: "GNTST_general_error", -2: "GNTST_bad_domain",
               -3: "GNTST_bad_gntref", -4: "GNTST_bad_handle",
               -5: "GNTST_bad_virt_addr", -6: "GNTST_bad_dev_addr",
               -7: "GNTST_no_device_space", -8: "GNTST_permission_denied",
               -9: "GNTST_bad_page", -10: "GNTST_bad_copy_arg",
               -11: "GNTST_address_too_big", -12: "GNTST_eagain",
               -13: "GNTST_no_space"}


def grant_copy_status(gntdev_fd: int, domid: int,
                      refs: Sequence[int]) -> tuple[int, ...]:
    """GRANT_COPY one byte from each of ``domid``'s ``refs`` to a local
    buffer, in one ioctl; returns each segment's GNTST_* status (0 = okay).

    MAP_GRANT_REF asks Xen nothing: a ref that does not exist, was ended or
    is granted to another domain is refused only at mmap. A copy is checked
    by Xen at once (the grant must name this domain and be in use), maps
    nothing and uses up no mmap, so it validates refs eagerly.
    """
    count = check_page_count(len(refs))
    segments = ffi.new("struct gntdev_grant_copy_segment[]", count)
    sink = ffi.new("char[]", count)
    for i, ref in enumerate(refs):
        seg = segments[i]
        seg.source.foreign.ref = ref
        seg.source.foreign.offset = 0
        seg.source.foreign.domid = domid
        seg.dest.virt = sink + i
        seg.len = 1
        seg.flags = lib.GNTCOPY_source_gref
    op = ffi.new("struct ioctl_gntdev_grant_copy *")
    op.count, op.segments = count, segments
    _ioctl(gntdev_fd, "IOCTL_GNTDEV_GRANT_COPY", op,
           _grant_refusals("GRANT_COPY", dmabuf=False))
    return tuple(segments[i].status for i in range(count))


def unmap_grant_ref(gntdev_fd: int, index: int, pages: int) -> None:
    op = ffi.new("struct ioctl_gntdev_unmap_grant_ref *")
    op.index, op.count = index, pages
    _ioctl(gntdev_fd, "IOCTL_GNTDEV_UNMAP_GRANT_REF", op,
           _grant_refusals("UNMAP_GRANT_REF", dmabuf=False))


# --- gntalloc: fresh pages granted (provider without a dma-buf source) -----

def gntalloc_alloc(gntalloc_fd: int, domid: int, pages: int,
                   writable: bool = True) -> tuple[int, tuple[int, ...]]:
    """ALLOC_GREF: ``pages`` zeroed pages granted to ``domid``.

    Returns (mmap offset, refs).
    """
    count = check_page_count(pages)
    op, refs, _owner = _new_with_array(
        "ioctl_gntalloc_alloc_gref", "gref_ids", count)
    op.domid, op.count = domid, count
    op.flags = lib.GNTALLOC_FLAG_WRITABLE if writable else 0

    def explain(err: int) -> GrantError | None:
        if err == errno.ENOSPC:
            return GrantTableFull(
                f"ALLOC_GREF: no room for {count} pages (ENOSPC): the grant "
                f"table is full or xen-gntalloc's limit is reached "
                f"(/sys/module/xen_gntalloc/parameters/limit)")
        return None
    _ioctl(gntalloc_fd, "IOCTL_GNTALLOC_ALLOC_GREF", op, explain)
    return op.index, tuple(refs[0:count])


def gntalloc_dealloc(gntalloc_fd: int, index: int, pages: int) -> None:
    op = ffi.new("struct ioctl_gntalloc_dealloc_gref *")
    op.index, op.count = index, pages
    _ioctl(gntalloc_fd, "IOCTL_GNTALLOC_DEALLOC_GREF", op)


def gntalloc_set_unmap_notify(gntalloc_fd: int, index: int,
                              clear_byte: bool = True,
                              event_port: int | None = None) -> None:
    """SET_UNMAP_NOTIFY: clear the byte at ``index`` and/or signal an event
    channel when the peer unmaps (how a provider learns it let go)."""
    op = ffi.new("struct ioctl_gntalloc_unmap_notify *")
    op.index = index
    op.action = (lib.UNMAP_NOTIFY_CLEAR_BYTE if clear_byte else 0) | (
        lib.UNMAP_NOTIFY_SEND_EVENT if event_port is not None else 0)
    op.event_channel_port = event_port or 0
    _ioctl(gntalloc_fd, "IOCTL_GNTALLOC_SET_UNMAP_NOTIFY", op)


# --- dma-bufs mapped for the CPU ---------------------------------------------

def dma_buf_sync(dmabuf_fd: int, start: bool, read: bool = True,
                 write: bool = True) -> None:
    """DMA_BUF_IOCTL_SYNC: bracket CPU access to an mmapped dma-buf
    (``start`` before reading or writing it, then the same flags with
    ``start`` False). OSError with errno kept: a file that is no dma-buf
    answers ENOTTY."""
    op = ffi.new("struct dma_buf_sync *")
    op.flags = (lib.DMA_BUF_SYNC_START if start else lib.DMA_BUF_SYNC_END) \
        | (lib.DMA_BUF_SYNC_READ if read else 0) \
        | (lib.DMA_BUF_SYNC_WRITE if write else 0)
    _ioctl(dmabuf_fd, "DMA_BUF_IOCTL_SYNC", op, _os_error(
        "DMA_BUF_IOCTL_SYNC", "not a dma-buf", (errno.ENOTTY,)))


# --- buffer sources: udmabuf, dma-heap, DRM dumb buffers -------------------

def _os_error(name: str, hint: str,
              causes: tuple[int, ...] = (errno.EINVAL,)) -> Explain:
    """Allocator ioctls: keep OSError; for ``causes`` add the likely why."""
    def explain(err: int) -> OSError:
        why = f": {hint}" if err in causes else ""
        return OSError(err, f"{name}: {os.strerror(err)}{why}")
    return explain


def udmabuf_create(udmabuf_dev_fd: int, memfd: int, offset: int,
                   size: int) -> int:
    """UDMABUF_CREATE: a dma-buf fd of a memfd range (caller owns it)."""
    op = ffi.new("struct udmabuf_create *")
    op.memfd, op.offset, op.size = memfd, offset, size
    op.flags = lib.UDMABUF_FLAGS_CLOEXEC
    return _ioctl(udmabuf_dev_fd, "UDMABUF_CREATE", op, _os_error(
        "UDMABUF_CREATE", "it needs a memfd sealed with F_SEAL_SHRINK (and "
        "not F_SEAL_WRITE) and a page-aligned range inside it"))


def dma_heap_alloc(heap_fd: int, length: int) -> int:
    """DMA_HEAP_IOCTL_ALLOC: a dma-buf fd of ``length`` bytes."""
    op = ffi.new("struct dma_heap_allocation_data *")
    op.len = length
    op.fd_flags = os.O_RDWR | os.O_CLOEXEC
    _ioctl(heap_fd, "DMA_HEAP_IOCTL_ALLOC", op, _os_error(
        "DMA_HEAP_IOCTL_ALLOC", "length must be non-zero and fit in memory"))
    return op.fd


def drm_create_dumb(drm_fd: int, width: int, height: int,
                    bpp: int) -> tuple[int, int, int]:
    """DRM_IOCTL_MODE_CREATE_DUMB: returns (handle, pitch, size)."""
    op = ffi.new("struct drm_mode_create_dumb *")
    op.width, op.height, op.bpp = width, height, bpp
    _ioctl(drm_fd, "DRM_IOCTL_MODE_CREATE_DUMB", op, _os_error(
        "CREATE_DUMB", "the driver refused this size or format"))
    return op.handle, op.pitch, op.size


def drm_destroy_dumb(drm_fd: int, handle: int) -> None:
    op = ffi.new("struct drm_mode_destroy_dumb *")
    op.handle = handle
    _ioctl(drm_fd, "DRM_IOCTL_MODE_DESTROY_DUMB", op,
           _os_error("DESTROY_DUMB", "no such handle"))


def drm_gem_close(drm_fd: int, handle: int) -> None:
    op = ffi.new("struct drm_gem_close *")
    op.handle = handle
    _ioctl(drm_fd, "DRM_IOCTL_GEM_CLOSE", op,
           _os_error("GEM_CLOSE", "no such handle"))


def drm_prime_handle_to_fd(drm_fd: int, handle: int) -> int:
    """PRIME_HANDLE_TO_FD: the buffer as a dma-buf fd (caller owns it)."""
    op = ffi.new("struct drm_prime_handle *")
    op.handle = handle
    op.flags = lib.DRM_CLOEXEC | lib.DRM_RDWR
    _ioctl(drm_fd, "DRM_IOCTL_PRIME_HANDLE_TO_FD", op, _os_error(
        "PRIME_HANDLE_TO_FD", "the driver cannot export this buffer (VRAM "
        "helpers cannot): it cannot be granted, allocate in system memory",
        (errno.ENOSYS, errno.EOPNOTSUPP)))
    return op.fd


def drm_prime_fd_to_handle(drm_fd: int, dmabuf_fd: int) -> int:
    """PRIME_FD_TO_HANDLE: import a dma-buf into a DRM device; its GEM
    handle (close it with :func:`drm_gem_close`)."""
    op = ffi.new("struct drm_prime_handle *")
    op.fd = dmabuf_fd
    _ioctl(drm_fd, "DRM_IOCTL_PRIME_FD_TO_HANDLE", op, _os_error(
        "PRIME_FD_TO_HANDLE", "the driver cannot import this dma-buf",
        (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)))
    return op.handle


def drm_map_dumb(drm_fd: int, handle: int) -> int:
    """MODE_MAP_DUMB: the offset at which to mmap a GEM object through the
    DRM device (its GEM mmap). DRM core refuses imported objects (EINVAL:
    drm_gem_dumb_map_offset, "Don't allow imported objects to be
    mapped")."""
    op = ffi.new("struct drm_mode_map_dumb *")
    op.handle = handle
    _ioctl(drm_fd, "DRM_IOCTL_MODE_MAP_DUMB", op, _os_error(
        "MODE_MAP_DUMB", "DRM core gives no mmap offset for an imported "
        "(PRIME) object"))
    return op.offset


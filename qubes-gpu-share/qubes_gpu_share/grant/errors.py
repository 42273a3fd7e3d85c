"""Every refusal of the grant device, as one exception class each.

The real device (gntdev.py) maps errno values to these, the simulator raises
the same ones for the same causes, so callers and tests never look at errno.
Each message is one line that says what to do about it.
"""

from __future__ import annotations

import errno as _errno


class GrantError(Exception):
    """Base class. ``errno`` is the kernel's answer (or the one the real
    kernel would give, for the simulator)."""

    errno: int = 0

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class NoGrantDevice(GrantError):
    """/dev/xen/gntdev (or gntalloc, udmabuf...) is missing: not a Xen domain,
    or the module is not loaded."""

    errno = _errno.ENOENT


class DmabufNotSupported(GrantError):
    """ENOTTY from a DMABUF ioctl: kernel built without
    CONFIG_XEN_GNTDEV_DMABUF."""

    errno = _errno.ENOTTY


class DmabufReceiveRefused(GrantError):
    """EINVAL from EXP_FROM_REFS: PV qube, x86 kernel requesting the device
    map Xen refuses for auto-translated guests, or a bad ref/domid. ``cpu``
    receive mode works in all of these cases."""

    errno = _errno.EINVAL


class NotGrantable(GrantError):
    """EINVAL from IMP_TO_REFS: the dma-buf is not whole pages of system RAM
    (VRAM, PFNMAP) or its size does not match the page count."""

    errno = _errno.EINVAL


class MapRefused(GrantError):
    """MAP_GRANT_REF or the mmap after it failed: a ref that does not exist,
    was ended, or was granted to another domain."""

    errno = _errno.EINVAL


class GrantTableFull(GrantError):
    """ENOSPC: this domain's grant table (or the mapper's maptrack) is full."""

    errno = _errno.ENOSPC


class ReleaseTimeout(GrantError):
    """ETIMEDOUT from EXP_WAIT_RELEASED: a user of the dma-buf still holds it."""

    errno = _errno.ETIMEDOUT


class AlreadyReleased(GrantError):
    """ENOENT: the grant or export was already released."""

    errno = _errno.ENOENT


class TooManyPages(GrantError, ValueError):
    """Refused before calling the kernel: 0 pages, or more than the 16-bit
    count the kernel keeps."""

    errno = _errno.EINVAL

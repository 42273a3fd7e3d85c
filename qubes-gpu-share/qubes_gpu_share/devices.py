"""The devices this project uses, found with udev (or sysfs without it).

An agent needs to know which buffer sources and grant devices its qube has:
DRM card and render nodes with their driver (and whether that driver can
place buffers in system RAM, the only memory a Xen grant can cover),
/dev/udmabuf, /dev/dma_heap/*, /dev/xen/gntdev and /dev/xen/gntalloc. Modules
can load after the agent started (a GPU passed through late, ``modprobe
udmabuf``), so :class:`DeviceWatcher` reports devices as they appear.

Enumeration goes through pyudev (libudev reads sysfs, it does not need the
udev daemon); :func:`scan_sysfs` reads the same facts from a sysfs tree
directly, for systems without libudev and for tests with a fake tree. Both
produce :class:`RawDevice` rows and one function, :func:`classify`, makes
sense of them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import glob
import os
from collections.abc import AsyncIterator, Iterable

#: the subsystems holding everything we look for
SUBSYSTEMS = ("drm", "misc", "dma_heap")


class Memory(str, enum.Enum):
    """Where a DRM driver places the buffers we would allocate (linear,
    dumb or GBM): Xen can grant only system RAM pages (IMP_TO_REFS refuses
    VRAM and PFNMAP buffers with EINVAL)."""

    #: always system RAM (shmem-backed GEM objects)
    SYSTEM = "system"
    #: system RAM when placed in the GTT/GART domain, VRAM otherwise; only
    #: trying tells which a given allocation got
    GTT = "gtt"
    #: device memory only (a VRAM BAR): cannot be granted
    VRAM = "vram"
    UNKNOWN = "unknown"


#: Driver name (as in /sys/.../device/driver) -> where its buffers live.
#: Measured in the Xen lab: vgem, virtio_gpu (system RAM, granted fine),
#: bochs-drm (VRAM BAR, no PRIME export). The rest from the drivers' memory
#: managers: shmem helpers (vkms, udl), integrated GPUs sharing system RAM
#: (i915), and TTM drivers that can place buffers in GTT (amdgpu, radeon,
#: nouveau, xe). VRAM-helper drivers (bochs, cirrus, qxl, ast, mgag200,
#: simpledrm's firmware framebuffer) have nothing in system RAM.
DRIVER_MEMORY = {
    "vgem": Memory.SYSTEM,
    "virtio_gpu": Memory.SYSTEM,
    "virtio-pci": Memory.SYSTEM,
    "vkms": Memory.SYSTEM,
    "udl": Memory.SYSTEM,
    "i915": Memory.SYSTEM,
    "xe": Memory.GTT,
    "amdgpu": Memory.GTT,
    "radeon": Memory.GTT,
    "nouveau": Memory.GTT,
    "bochs-drm": Memory.VRAM,
    "bochs": Memory.VRAM,
    "cirrus": Memory.VRAM,
    "cirrus-qemu": Memory.VRAM,
    "qxl": Memory.VRAM,
    "ast": Memory.VRAM,
    "mgag200": Memory.VRAM,
    "simple-framebuffer": Memory.VRAM,
    "simpledrm": Memory.VRAM,
}


def driver_memory(driver: str | None) -> Memory:
    return DRIVER_MEMORY.get(driver or "", Memory.UNKNOWN)


@dataclasses.dataclass(frozen=True)
class RawDevice:
    """One device node as enumeration sees it."""

    subsystem: str
    #: absolute path of the node, e.g. /dev/dri/renderD128
    node: str
    #: the kernel driver bound to the parent device, if any
    driver: str | None = None


@dataclasses.dataclass(frozen=True)
class DrmNode:
    node: str
    #: "card" (primary node: dumb buffers, modesetting) or "render"
    kind: str
    driver: str | None
    memory: Memory


@dataclasses.dataclass(frozen=True)
class Devices:
    """What this qube has; a missing device is None or an empty tuple."""

    drm: tuple[DrmNode, ...] = ()
    udmabuf: str | None = None
    dma_heaps: tuple[str, ...] = ()
    gntdev: str | None = None
    gntalloc: str | None = None


_MISC = {"udmabuf": "udmabuf", "xen/gntdev": "gntdev",
         "xen/gntalloc": "gntalloc"}


def classify(raw: Iterable[RawDevice], dev_root: str = "/dev") -> Devices:
    """Pick what this project uses out of enumerated device nodes."""
    drm: list[DrmNode] = []
    heaps: list[str] = []
    misc: dict[str, str] = {}
    for dev in raw:
        name = os.path.relpath(dev.node, dev_root)
        if dev.subsystem == "drm":
            base = os.path.basename(name)
            kind = ("render" if base.startswith("renderD") else
                    "card" if base.startswith("card") else None)
            if kind:
                drm.append(DrmNode(dev.node, kind, dev.driver,
                                   driver_memory(dev.driver)))
        elif dev.subsystem == "dma_heap":
            heaps.append(dev.node)
        elif dev.subsystem == "misc" and name in _MISC:
            misc[_MISC[name]] = dev.node
    return Devices(drm=tuple(sorted(drm, key=lambda d: d.node)),
                   dma_heaps=tuple(sorted(heaps)), **misc)


def _read_uevent(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in lines if "=" in line)


def _sysfs_driver(device_dir: str) -> str | None:
    """The driver of a class device's own device: virtio-gpu's card hangs
    off a PCI device bound to virtio-pci, its driver is on the virtio
    device below it (``device/virtio*/driver``); a device with no driver
    bound (vgem is a bare platform device) is named by its device."""
    device = os.path.join(device_dir, "device")
    for link in [*sorted(glob.glob(os.path.join(device, "virtio*",
                                                "driver"))),
                 os.path.join(device, "driver")]:
        if os.path.islink(link):
            return os.path.basename(os.readlink(link))
    if os.path.islink(device):
        return os.path.basename(os.path.realpath(device))
    return None


def scan_sysfs(sys_root: str = "/sys",
               dev_root: str = "/dev") -> list[RawDevice]:
    """Enumerate device nodes from /sys/class directly (no libudev)."""
    found = []
    for subsystem in SUBSYSTEMS:
        class_dir = os.path.join(sys_root, "class", subsystem)
        try:
            names = sorted(os.listdir(class_dir))
        except OSError:
            continue
        for name in names:
            device_dir = os.path.join(class_dir, name)
            devname = _read_uevent(os.path.join(device_dir, "uevent")) \
                .get("DEVNAME")
            if devname:
                found.append(RawDevice(subsystem,
                                       os.path.join(dev_root, devname),
                                       _sysfs_driver(device_dir)))
    return found


def _udev_raw(device) -> RawDevice | None:
    """A pyudev Device as a RawDevice (None if it has no node)."""
    if not device.device_node:
        return None
    return RawDevice(device.subsystem, device.device_node,
                     _sysfs_driver(device.sys_path))


def scan_udev() -> list[RawDevice]:
    """Enumerate device nodes with pyudev (libudev reads sysfs; the udev
    daemon need not run)."""
    import pyudev
    context = pyudev.Context()
    found = []
    for subsystem in SUBSYSTEMS:
        for device in context.list_devices(subsystem=subsystem):
            raw = _udev_raw(device)
            if raw:
                found.append(raw)
    return sorted(found, key=lambda r: (SUBSYSTEMS.index(r.subsystem),
                                        r.node))


def scan() -> Devices:
    """The devices of this system: through udev, else straight from sysfs."""
    try:
        raw = scan_udev()
    except ImportError:
        raw = scan_sysfs()
    return classify(raw)


@dataclasses.dataclass(frozen=True)
class DeviceEvent:
    #: "add", "remove", "change", "bind", ...
    action: str
    device: RawDevice


class DeviceWatcher:
    """Reports our devices appearing and going, for asyncio code::

        async for event in DeviceWatcher().events():
            if event.action == "add": ...

    Listens to the udev daemon's events when it runs, else to the kernel's
    own uevents (which arrive before udev has set permissions: re-check
    availability after a short delay when acting on them).
    """

    def __init__(self, source: str | None = None):
        import pyudev
        if source is None:
            source = "udev" if os.path.exists("/run/udev/control") \
                else "kernel"
        self.source = source
        self.monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source)
        for subsystem in SUBSYSTEMS:
            self.monitor.filter_by(subsystem)
        # start now, so events between here and the first read are kept
        self.monitor.start()

    def _drain(self, queue: asyncio.Queue) -> None:
        while (device := self.monitor.poll(timeout=0)) is not None:
            raw = _udev_raw(device)
            if raw:
                queue.put_nowait(DeviceEvent(device.action, raw))

    async def events(self) -> AsyncIterator[DeviceEvent]:
        """Events as they come, until the consumer stops iterating."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[DeviceEvent] = asyncio.Queue()
        loop.add_reader(self.monitor.fileno(), self._drain, queue)
        try:
            while True:
                yield await queue.get()
        finally:
            loop.remove_reader(self.monitor.fileno())

"""Device discovery: parsing a fake sysfs tree, udev and sysfs agreeing on
this machine, and the watcher seeing a real kernel uevent."""

from __future__ import annotations

import asyncio
import os

import pytest

from qubes_gpu_share import devices
from qubes_gpu_share.devices import Devices, DrmNode, Memory, RawDevice


def add_class_device(sys_root, subsystem, name, devname, driver=None):
    path = sys_root / "class" / subsystem / name
    path.mkdir(parents=True)
    (path / "uevent").write_text(f"MAJOR=1\nMINOR=2\nDEVNAME={devname}\n")
    if driver:
        bound = sys_root / "bus" / "drivers" / driver
        bound.mkdir(parents=True, exist_ok=True)
        (path / "device").mkdir()
        (path / "device" / "driver").symlink_to(bound)


@pytest.fixture
def fake_sys(tmp_path):
    sys_root = tmp_path / "sys"
    add_class_device(sys_root, "drm", "card0", "dri/card0", "virtio_gpu")
    add_class_device(sys_root, "drm", "renderD128", "dri/renderD128",
                     "virtio_gpu")
    add_class_device(sys_root, "drm", "card1", "dri/card1", "bochs-drm")
    add_class_device(sys_root, "drm", "card2", "dri/card2", "newgpu")
    add_class_device(sys_root, "drm", "card0-Virtual-1", "", None)
    add_class_device(sys_root, "misc", "udmabuf", "udmabuf")
    add_class_device(sys_root, "misc", "gntdev", "xen/gntdev")
    add_class_device(sys_root, "misc", "fuse", "fuse")
    add_class_device(sys_root, "dma_heap", "system", "dma_heap/system")
    return sys_root


def test_fake_sysfs_tree_is_classified(fake_sys, tmp_path):
    dev = str(tmp_path / "dev")
    found = devices.classify(devices.scan_sysfs(str(fake_sys), dev), dev)
    assert found == Devices(
        drm=(DrmNode(f"{dev}/dri/card0", "card", "virtio_gpu", Memory.SYSTEM),
             DrmNode(f"{dev}/dri/card1", "card", "bochs-drm", Memory.VRAM),
             DrmNode(f"{dev}/dri/card2", "card", "newgpu", Memory.UNKNOWN),
             DrmNode(f"{dev}/dri/renderD128", "render", "virtio_gpu",
                     Memory.SYSTEM)),
        udmabuf=f"{dev}/udmabuf",
        dma_heaps=(f"{dev}/dma_heap/system",),
        gntdev=f"{dev}/xen/gntdev",
        gntalloc=None)


def test_drivers_below_the_bus_and_driverless_devices(tmp_path):
    """virtio-gpu: the card's device is bound to virtio-pci, the GPU driver
    sits on virtio0 below it; vgem: a platform device with no driver."""
    sys_root = tmp_path / "sys"
    add_class_device(sys_root, "drm", "card0", "dri/card0", "virtio-pci")
    virtio = sys_root / "class/drm/card0/device/virtio0"
    virtio.mkdir()
    (sys_root / "bus/drivers/virtio_gpu").mkdir(parents=True)
    (virtio / "driver").symlink_to(sys_root / "bus/drivers/virtio_gpu")
    add_class_device(sys_root, "drm", "card1", "dri/card1")
    (sys_root / "devices/platform/vgem").mkdir(parents=True)
    (sys_root / "class/drm/card1/device").symlink_to(
        sys_root / "devices/platform/vgem")
    dev = str(tmp_path / "dev")
    found = devices.classify(devices.scan_sysfs(str(sys_root), dev), dev)
    assert [(d.driver, d.memory) for d in found.drm] == [
        ("virtio_gpu", Memory.SYSTEM), ("vgem", Memory.SYSTEM)]


def test_missing_sysfs_gives_nothing(tmp_path):
    assert devices.scan_sysfs(str(tmp_path / "nosys")) == []
    assert devices.classify([]) == Devices()


def test_non_node_drm_entries_are_ignored():
    raw = [RawDevice("drm", "/dev/dri/controlD64", "i915"),
           RawDevice("misc", "/dev/xen/gntalloc")]
    assert devices.classify(raw) == Devices(gntalloc="/dev/xen/gntalloc")


def test_udev_and_sysfs_agree_on_this_machine():
    assert set(devices.scan_udev()) == set(devices.scan_sysfs())


def _uevent_trigger() -> str | None:
    """A misc device whose uevent file we may write (root), else None."""
    for name in sorted(os.listdir("/sys/class/misc")):
        path = f"/sys/class/misc/{name}/uevent"
        if os.access(path, os.W_OK):
            return path
    return None


def test_watcher_reports_a_kernel_uevent():
    trigger = _uevent_trigger()
    if trigger is None:
        pytest.skip("no writable /sys/class/misc/*/uevent (needs root)")

    async def first_event():
        watcher = devices.DeviceWatcher()
        events = watcher.events()
        with open(trigger, "w") as f:
            f.write("change")
        try:
            return await asyncio.wait_for(events.__anext__(), 5)
        finally:
            await events.aclose()

    event = asyncio.run(first_event())
    assert event.action == "change"
    assert event.device.subsystem == "misc"

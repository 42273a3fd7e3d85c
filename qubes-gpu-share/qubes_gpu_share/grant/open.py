"""Choose the grant device from configuration: the real one or the simulator.

The agent and the probe call :func:`open_grant_device` and never name an
implementation. The choice comes from the environment variable
``QUBES_GPU_SHARE_GRANT`` (set by the demo and tests, unset on a real
system):

* unset, empty or ``real`` -- /dev/xen/gntdev (:mod:`.gntdev`, imported only
  then, so the simulator works where the native module is not built);
* ``sim:SOCKET:DOMID[:TRAITS]`` -- the simulated hypervisor on SOCKET, as
  domain DOMID; TRAITS is a comma list of ``pv``/``pvh``/``hvm``, a kernel
  (``stock``: no CONFIG_XEN_GNTDEV_DMABUF, ``dmabuf``: with it, ``fixed``:
  with the project's whole series, kernel/), single patches (``fix``:
  receive, 0001; ``mmap``: 0002; ``frames``: 0003; ``query``: 0004),
  ``nodmabuf`` (as ``stock``) and ``swiotlb`` (PV only: DMA through
  swiotlb-xen, as in dom0 or a PV domU with PCI devices); what is not said
  comes from expected.DomainKind.
"""

from __future__ import annotations

import dataclasses
import os

from ..names import DOMID_FIRST_RESERVED
from .device import GrantDevice
from .expected import KERNEL_TRAITS, DomainKind, Kernel, VirtMode

ENV = "QUBES_GPU_SHARE_GRANT"


class BadDeviceSpec(ValueError):
    """The configuration names no device this program knows."""


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """A parsed device choice; ``socket`` is None for the real device."""

    socket: str | None = None
    domid: int = 0
    kind: DomainKind = DomainKind()

    @property
    def simulated(self) -> bool:
        return self.socket is not None


def parse_spec(text: str) -> DeviceSpec:
    """Parse the value of QUBES_GPU_SHARE_GRANT (strict)."""
    if text in ("", "real"):
        return DeviceSpec()
    if not text.startswith("sim:"):
        raise BadDeviceSpec(f"{ENV}={text!r}: expected 'real' or "
                            f"'sim:SOCKET:DOMID[:TRAITS]'")
    parts = text[len("sim:"):].split(":")
    kind = DomainKind()
    if len(parts) >= 3 and not parts[-1].isdigit():
        kind = parse_traits(parts.pop())
    if len(parts) < 2 or not parts[-1].isdigit() or not all(parts[:-1]):
        raise BadDeviceSpec(f"{ENV}={text!r}: expected sim:SOCKET:DOMID")
    domid = int(parts.pop())
    if domid >= DOMID_FIRST_RESERVED:
        raise BadDeviceSpec(f"{ENV}: domain id {domid} is reserved by Xen")
    return DeviceSpec(":".join(parts), domid, kind)


#: Trait words besides the virt modes and kernels: the DomainKind field
#: each sets, and to what.
TRAITS = {"nodmabuf": ("dmabuf_ioctls", False),
          "fix": ("receive_fix", True),
          "mmap": ("dmabuf_mmap", True),
          "frames": ("grant_frames_fix", True),
          "query": ("release_query", True),
          "swiotlb": ("xen_swiotlb", True)}


KNOWN_WORDS = (*(mode.value for mode in VirtMode),
               *(kernel.value for kernel in Kernel), *TRAITS)


def parse_traits(text: str) -> DomainKind:
    """A DomainKind from a comma list such as ``pv,nodmabuf`` or
    ``pvh,fixed`` (in any order: ``swiotlb,pv`` is a PV kind; a kernel
    word sets its traits first, single trait words add to them)."""
    fields: dict[str, object] = {}
    for word in text.split(","):
        if word in {kernel.value for kernel in Kernel}:
            fields = {**KERNEL_TRAITS[Kernel(word)], **fields}
    for word in text.split(","):
        if word in {kernel.value for kernel in Kernel}:
            continue
        if word in {mode.value for mode in VirtMode}:
            fields["virt_mode"] = VirtMode(word)
        elif word in TRAITS:
            name, value = TRAITS[word]
            fields[name] = value
        else:
            raise BadDeviceSpec(
                f"{ENV}: unknown trait {word!r} (known: "
                f"{', '.join(KNOWN_WORDS)})")
    try:
        return DomainKind(**fields)
    except ValueError as exc:
        raise BadDeviceSpec(f"{ENV}: traits {text!r}: {exc}") from None


def open_grant_device(spec: str | DeviceSpec | None = None) -> GrantDevice:
    """Open the device the configuration (by default the environment)
    names. Raises NoGrantDevice when it is not there."""
    if spec is None:
        spec = os.environ.get(ENV, "")
    if isinstance(spec, str):
        spec = parse_spec(spec)
    if spec.simulated:
        from .sim import SimGrantDevice
        return SimGrantDevice(spec.socket, spec.domid, spec.kind)
    from .gntdev import GntdevDevice
    return GntdevDevice()

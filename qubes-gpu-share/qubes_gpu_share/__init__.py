"""qubes-gpu-share: zero-copy GPU buffer leases between Qubes OS qubes.

The package is layered so that the core can be read and tested without Xen:

* pure core, no I/O: :mod:`formats`, :mod:`protocol`, :mod:`lease`,
  :mod:`decide`, :mod:`limits`;
* the one writer of lease state: :mod:`registry`;
* seams with one real and one simulated implementation each:
  :mod:`qubes` (facts about qubes), :mod:`qrexec` (calls between qubes),
  :mod:`grant` (the Xen grant device), :mod:`alloc` (buffer allocation);
* programs: :mod:`broker` (dom0), :mod:`agent` (each qube), :mod:`cli`.
"""

__version__ = "0.1.0"

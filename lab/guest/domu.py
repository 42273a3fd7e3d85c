"""A domU's side of the lab: what it does is named by lab.role on its
kernel command line (set by dom0.py)."""

import os
import platform

import labio
from labio import emit


def hello(opts):
    import qubes_gpu_share._native  # noqa: F401 - the compiled helper loads
    emit("hello", True, guest_type=labio.guest_type(),
         kernel=platform.release(), python=platform.python_version())


ROLES = {"hello": hello}


def main():
    opts = labio.cmdline()
    ROLES[opts["role"]](opts)


if __name__ == "__main__":
    labio.DOM = labio.cmdline().get("dom", "domU")
    labio.main_guard(main)

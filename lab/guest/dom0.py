"""dom0's side of the lab (PV dom0): start each domU, play the provider,
relay the domUs' results. Printed on the console, read by lab/report.py."""

import os
import platform
import time

import labio
from labio import emit, log, run

XL = "xl"
CONSOLE_LOG = "/var/log/xen/console/guest-{}.log"


def start_domu(name, virt, role, gntdev):
    cfg = f"/tmp/{name}.cfg"
    with open(cfg, "w") as f:
        f.write(f'''name = "{name}"
type = "{virt}"
kernel = "/lab/boot/vmlinuz"
ramdisk = "/lab/boot/domu.img"
memory = 512
vcpus = 1
extra = "console=hvc0 loglevel=3 lab.role={role} lab.gntdev={gntdev} lab.dom={name}"
on_poweroff = "destroy"
on_reboot = "destroy"
on_crash = "destroy"
''')
    with labio.Timer() as t:
        run([XL, "create", cfg], timeout=180)
    domid = int(run([XL, "domid", name]).strip())
    emit("domu-create", True, domu=name, virt=virt, domid=domid, ms=t.ms)
    return domid


def finish_domu(name, t0, timeout):
    """Wait until the domU has powered off (destroy it after timeout), then
    relay its results and the tail of its console."""
    deadline = time.monotonic() + timeout
    ok = True
    while run([XL, "domid", name], check=False, timeout=30).strip().isdigit():
        if time.monotonic() > deadline:
            run([XL, "destroy", name], check=False, timeout=60)
            ok = False
            break
        time.sleep(0.5)
    emit("domu-run", ok, domu=name, ms=round((time.monotonic() - t0) * 1000),
         timeout_s=timeout)
    try:
        lines = open(CONSOLE_LOG.format(name), errors="replace").read().splitlines()
    except OSError as e:
        lines = [f"(no console log: {e})"]
    for line in lines:
        if line.startswith("LAB-RESULT "):
            print(line, flush=True)
        else:
            print(f"[{name}] {line}", flush=True)


def environment():
    emit("env", None, kernel=platform.release(), guest_type=labio.guest_type(),
         python=platform.python_version(),
         xen=run([XL, "info"], timeout=60).split("xen_version")[1].split(":")[1].split()[0])


def main():
    environment()
    for name, virt in (("pv", "pv"), ("pvh", "pvh")):
        t0 = time.monotonic()
        start_domu(name, virt, "hello", "upstream")
        finish_domu(name, t0, 300)
    print("LAB-DONE", flush=True)


if __name__ == "__main__":
    labio.main_guard(main)

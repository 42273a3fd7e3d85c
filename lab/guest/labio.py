"""What the lab's programs in dom0 and the domUs share: result lines on the
console, commands with timeouts, module loading, xenstore.

Results leave a domain as one line each on its console:
``LAB-RESULT {"dom": ..., "test": ..., "ok": ..., ...}``. dom0's console is
the serial log the host reads; a domU's console is logged by xenconsoled in
dom0, which relays its result lines (lab/guest/dom0.py). The host parses
them (lab/report.py).
"""

import json
import os
import subprocess
import sys
import time

#: this domain's name in results: "dom0", or the role a domU was given
DOM = os.environ.get("LAB_DOM", "dom0")


#: fields every result line of this program carries for now (dom0 tags
#: what it does for a domU with that domU's boot attempt)
CONTEXT = {}


def emit(test, ok, **data):
    """One result line; ``ok`` is True, False, or None (recorded, no verdict)."""
    line = json.dumps({"dom": DOM, "test": test, "ok": ok, **CONTEXT, **data},
                      sort_keys=True, default=str)
    print("LAB-RESULT " + line, flush=True)


def tagged(line, **fields):
    """A relayed result line with fields added (unparsable: as it came)."""
    try:
        result = json.loads(line[len("LAB-RESULT "):])
    except ValueError:
        return line
    return "LAB-RESULT " + json.dumps({**result, **fields}, sort_keys=True)


def log(msg):
    print(f"lab[{DOM}]: {msg}", flush=True)


def run(cmd, timeout=60, check=True):
    """Run a command; its output (stdout+stderr) as text."""
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=timeout)
    if check and p.returncode:
        raise RuntimeError(f"{cmd[0]} exited {p.returncode}: {p.stdout.strip()}")
    return p.stdout


def cmdline():
    """lab.* options from the kernel command line."""
    opts = {}
    for word in open("/proc/cmdline").read().split():
        if word.startswith("lab.") and "=" in word:
            k, v = word[4:].split("=", 1)
            opts[k] = v
    return opts


def guest_type():
    return open("/sys/hypervisor/guest_type").read().strip().lower()


def insmod(path):
    run(["insmod", path])


def rmmod(name):
    run(["rmmod", name])


def use_gntdev(variant):
    """Load xen-gntdev: 'stock' (Debian's, no dma-buf ioctls), 'upstream'
    (Debian's source with CONFIG_XEN_GNTDEV_DMABUF) or 'fixed' (that plus
    kernel/0001-*.patch). Replaces whichever is loaded."""
    if os.path.exists("/sys/module/xen_gntdev"):
        rmmod("xen_gntdev")
    if variant == "stock":
        for ko in open("/lab/load/xen-gntdev").read().split():
            run(["insmod", ko], check=False)   # dependencies may be loaded
    else:
        insmod(f"/lib/modules/lab/{variant}/xen-gntdev.ko")
    wait_for_node("/dev/xen/gntdev")


def wait_for_node(path):
    """devtmpfs creates a module's device node; wait for it like udev would."""
    deadline = time.monotonic() + 10
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.05)


def use_udmabuf():
    if not os.path.exists("/sys/module/udmabuf"):
        insmod("/lib/modules/lab/upstream/udmabuf.ko")


PEEK = "/dev/dmabuf_peek"


def peek_dmabuf(fd, size, prefix=""):
    """The bytes a dma-buf holds, read in the kernel by the lab's test-only
    importer (lab/modules/dmabuf-peek.c): write the fd number, read back.
    ``prefix`` 'v' reads through the exporter's vmap instead of the sg
    table."""
    if not os.path.exists("/sys/module/dmabuf_peek"):
        insmod("/lib/modules/lab/upstream/dmabuf-peek.ko")
    wait_for_node(PEEK)
    peek = os.open(PEEK, os.O_RDWR)
    try:
        os.write(peek, f"{prefix}{fd}".encode())
        return os.pread(peek, size, 0)
    finally:
        os.close(peek)


# xenstore: the only channel between dom0 and a domU besides the grants
# themselves. Values are at most 4096 bytes; long lists are split.

def xs_read(path):
    return run(["xenstore-read", path], timeout=30).rstrip("\n")


def xs_write(path, value):
    run(["xenstore-write", path, str(value)], timeout=30)


def xs_wait(path, timeout):
    """Poll until path exists; its value."""
    deadline = time.monotonic() + timeout
    log(f"waiting for {path}")
    while True:
        p = subprocess.run(["xenstore-read", path], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True, timeout=30)
        if p.returncode == 0:
            return p.stdout.rstrip("\n")
        if time.monotonic() > deadline:
            raise TimeoutError(f"xenstore {path}: nothing after {timeout} s")
        if ABORT is not None and ABORT():
            raise PeerGone(f"xenstore {path}: the peer's kernel failed")
        time.sleep(0.2)


#: dom0 sets this to a callable that says the peer is gone (its kernel
#: oopsed): waits give up at once instead of running into their timeout
ABORT = None


class PeerGone(Exception):
    pass


CHUNK = 3000


def xs_write_ints(path, values):
    text = ",".join(map(str, values))
    chunks = [text[i:i + CHUNK] for i in range(0, len(text), CHUNK)] or [""]
    for i, c in enumerate(chunks):
        xs_write(f"{path}/{i}", c)
    xs_write(f"{path}/n", len(chunks))     # written last: the list is complete


def xs_read_ints(path, timeout):
    n = int(xs_wait(f"{path}/n", timeout))
    text = "".join(xs_read(f"{path}/{i}") for i in range(n))
    return [int(v) for v in text.split(",") if v]


class Timer:
    """with Timer() as t: ...; t.ms"""

    def __enter__(self):
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc):
        self.ms = round((time.monotonic() - self.t0) * 1000)


def main_guard(fn):
    """Run fn; any exception becomes a failed result, not a silent hang."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - reported, then exit non-zero
        import traceback
        traceback.print_exc()
        emit("crash", False, error=f"{type(e).__name__}: {e}")
        sys.exit(1)

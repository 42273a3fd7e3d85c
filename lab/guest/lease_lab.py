"""The lab's leases, shared by both sides so they agree on every byte.

dom0 provides through the project's provider agent (agent/provider.py), a
domU receives through its consumer agent (agent/consumer.py); no broker:
refs and lease ids travel over xenstore under the domU's
/local/domain/<domid>/data/lab (writable by both).
"""

import mmap

from qubes_gpu_share.formats import blob_layout, linear_layout
from qubes_gpu_share.simsys.pattern import first_difference, pattern_bytes

#: the picture every cross-domain lease carries: a full-HD XR24 frame
META = linear_layout(1920, 1080, "XR24")
#: what dom0 draws, and what the consumer writes back over it
SEED_PROVIDER, SEED_CONSUMER = 0, 5
#: the cpu-mode leases: one per provide mode of the provider agent
PROVIDE_MODES = ("udmabuf", "gntalloc")

#: the small grant the dma-buf receive checks use (EXP_FROM_REFS needs no
#: picture: 4 pages whose bytes say which page they are)
RECV_PAGES = 4
RECV_META = blob_layout(RECV_PAGES * 4096)


#: what a PVH domU writes through its mmap of the received dma-buf, and
#: where: dom0 must read it in its own pages (then puts them back)
DMABUF_WRITE = b"written by the domU through its mmap of the dma-buf"
DMABUF_WRITE_AT = 2 * 4096 + 100

#: the buffers dom0 lends to the lying consumer (issue 14), pages each
LIAR_PAGES = 100


def recv_bytes():
    return b"".join(f"lab recv page {i}\n".encode().ljust(4096, b".")
                    for i in range(RECV_PAGES))


def base(domid):
    return f"/local/domain/{domid}/data/lab"


def map_fd(fd, offset, length, writable=True):
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    return mmap.mmap(fd, length, mmap.MAP_SHARED, prot, offset=offset)


def picture(seed):
    return pattern_bytes(META, seed)


def differs(seen, expected):
    """None when equal, else the first differing offset."""
    return first_difference(seen, expected)

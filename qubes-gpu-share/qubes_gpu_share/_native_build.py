"""cffi builder of :mod:`qubes_gpu_share._native` (API mode).

Every struct layout and ioctl number comes from the system's UAPI headers at
build time: the cdef below lists only the fields Python touches, ends every
struct with ``...;`` and declares every constant as ``#define NAME ...``, so
the C compiler fills in sizes, offsets and values. Nothing is retyped here;
tests/test_native_abi.py checks that against a plain C program.

Headers (Debian package / Fedora package):

* ``<xen/gntdev.h>``, ``<xen/gntalloc.h>``, ``<linux/udmabuf.h>``,
  ``<linux/dma-heap.h>``, ``<linux/dma-buf.h>``: linux-libc-dev /
  kernel-headers;
* ``drm.h``, ``drm_mode.h``: /usr/include/drm (Fedora kernel-headers) or
  /usr/include/libdrm (libdrm-dev; Debian's linux-libc-dev lacks them).

Run by setuptools through ``cffi_modules`` (setup.py), or by hand:
``python qubes_gpu_share/_native_build.py`` builds in the current directory.
"""

from __future__ import annotations

import os

import cffi

#: Where the DRM UAPI headers live, in order of preference.
DRM_INCLUDE_DIRS = ("/usr/include/drm", "/usr/include/libdrm")

# <xen/gntdev.h> in userspace uses grant_ref_t and domid_t without defining
# them (the kernel and libxengnttab define them): supply them as libxengnttab
# users do, and the ioctl() prototype it assumes.
PREAMBLE = """
#include <stdint.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/ioctl.h>
typedef uint32_t grant_ref_t;
typedef uint16_t domid_t;
#include <xen/gntdev.h>
#include <xen/gntalloc.h>
#include <linux/udmabuf.h>
#include <linux/dma-heap.h>
#include <linux/dma-buf.h>
#include <drm.h>
#include <drm_mode.h>

/* GRANT_COPY's segment flag: Xen's public ABI (xen/include/public/
 * grant_table.h, libxen-dev / xen-devel), which the kernel's UAPI headers
 * use but do not ship; taken from that header when it is included above. */
#ifndef GNTCOPY_source_gref
#define GNTCOPY_source_gref (1 << 0)
#endif

/* IOCTL_GNTDEV_DMABUF_IMP_TRY_RELEASE: the project's proposed gntdev ioctl
 * (kernel/0004-*.patch), not in any released kernel's headers yet: defined
 * here, exactly as the patch's <xen/gntdev.h> does, when the header lacks
 * it. A kernel without it answers ENOTTY, and the caller falls back to
 * IMP_RELEASE. tests/test_native_abi.py pins the value. */
#ifndef IOCTL_GNTDEV_DMABUF_IMP_TRY_RELEASE
struct ioctl_gntdev_dmabuf_imp_try_release {
    __u32 fd;
    __u32 mapped;
};
#define IOCTL_GNTDEV_DMABUF_IMP_TRY_RELEASE \
    _IOC(_IOC_NONE, 'G', 13, \
         sizeof(struct ioctl_gntdev_dmabuf_imp_try_release))
#endif

/* ioctl() is variadic; a fixed prototype lets cffi call it directly. */
static int qgs_ioctl(int fd, unsigned long request, void *arg)
{
    return ioctl(fd, request, arg);
}
"""

CDEF = """
/* <xen/gntdev.h> */
struct ioctl_gntdev_grant_ref { uint32_t domid; uint32_t ref; ...; };
struct ioctl_gntdev_map_grant_ref {
    uint32_t count; uint64_t index;
    struct ioctl_gntdev_grant_ref refs[1]; ...; };
struct ioctl_gntdev_unmap_grant_ref { uint64_t index; uint32_t count; ...; };
struct ioctl_gntdev_dmabuf_exp_from_refs {
    uint32_t flags; uint32_t count; uint32_t fd; uint32_t domid;
    uint32_t refs[1]; ...; };
struct ioctl_gntdev_dmabuf_exp_wait_released {
    uint32_t fd; uint32_t wait_to_ms; ...; };
struct ioctl_gntdev_dmabuf_imp_to_refs {
    uint32_t fd; uint32_t count; uint32_t domid; uint32_t reserved;
    uint32_t refs[1]; ...; };
struct ioctl_gntdev_dmabuf_imp_release {
    uint32_t fd; uint32_t reserved; ...; };
struct ioctl_gntdev_dmabuf_imp_try_release {
    uint32_t fd; uint32_t mapped; ...; };
struct gntdev_grant_copy_segment {
    union { void *virt;
            struct { uint32_t ref; uint16_t offset; uint16_t domid; } foreign;
          } source, dest;
    uint16_t len; uint16_t flags; int16_t status; ...; };
struct ioctl_gntdev_grant_copy {
    unsigned int count; struct gntdev_grant_copy_segment *segments; ...; };
#define IOCTL_GNTDEV_MAP_GRANT_REF ...
#define IOCTL_GNTDEV_GRANT_COPY ...
#define GNTCOPY_source_gref ...
#define IOCTL_GNTDEV_UNMAP_GRANT_REF ...
#define IOCTL_GNTDEV_DMABUF_EXP_FROM_REFS ...
#define IOCTL_GNTDEV_DMABUF_EXP_WAIT_RELEASED ...
#define IOCTL_GNTDEV_DMABUF_IMP_TO_REFS ...
#define IOCTL_GNTDEV_DMABUF_IMP_RELEASE ...
#define IOCTL_GNTDEV_DMABUF_IMP_TRY_RELEASE ...

/* <xen/gntalloc.h> */
struct ioctl_gntalloc_alloc_gref {
    uint16_t domid; uint16_t flags; uint32_t count; uint64_t index;
    uint32_t gref_ids[1]; ...; };
struct ioctl_gntalloc_dealloc_gref { uint64_t index; uint32_t count; ...; };
struct ioctl_gntalloc_unmap_notify {
    uint64_t index; uint32_t action; uint32_t event_channel_port; ...; };
#define IOCTL_GNTALLOC_ALLOC_GREF ...
#define IOCTL_GNTALLOC_DEALLOC_GREF ...
#define IOCTL_GNTALLOC_SET_UNMAP_NOTIFY ...
#define GNTALLOC_FLAG_WRITABLE ...
#define UNMAP_NOTIFY_CLEAR_BYTE ...
#define UNMAP_NOTIFY_SEND_EVENT ...

/* <linux/udmabuf.h>, <linux/dma-heap.h> */
struct udmabuf_create {
    uint32_t memfd; uint32_t flags; uint64_t offset; uint64_t size; ...; };
#define UDMABUF_CREATE ...
#define UDMABUF_FLAGS_CLOEXEC ...
struct dma_heap_allocation_data {
    uint64_t len; uint32_t fd; uint32_t fd_flags; uint64_t heap_flags; ...; };
#define DMA_HEAP_IOCTL_ALLOC ...

/* <linux/dma-buf.h>: CPU access brackets for an mmapped dma-buf */
struct dma_buf_sync { uint64_t flags; ...; };
#define DMA_BUF_IOCTL_SYNC ...
#define DMA_BUF_SYNC_READ ...
#define DMA_BUF_SYNC_WRITE ...
#define DMA_BUF_SYNC_RW ...
#define DMA_BUF_SYNC_START ...
#define DMA_BUF_SYNC_END ...

/* <drm.h>, <drm_mode.h>: dumb buffers, PRIME export and import, and the
 * dumb buffers' mmap offset */
struct drm_mode_create_dumb {
    uint32_t height; uint32_t width; uint32_t bpp; uint32_t flags;
    uint32_t handle; uint32_t pitch; uint64_t size; ...; };
struct drm_mode_destroy_dumb { uint32_t handle; ...; };
struct drm_prime_handle { uint32_t handle; uint32_t flags; int32_t fd; ...; };
struct drm_gem_close { uint32_t handle; ...; };
struct drm_mode_map_dumb { uint32_t handle; uint64_t offset; ...; };
#define DRM_IOCTL_MODE_CREATE_DUMB ...
#define DRM_IOCTL_MODE_DESTROY_DUMB ...
#define DRM_IOCTL_PRIME_HANDLE_TO_FD ...
#define DRM_IOCTL_GEM_CLOSE ...
#define DRM_IOCTL_PRIME_FD_TO_HANDLE ...
#define DRM_IOCTL_MODE_MAP_DUMB ...
#define DRM_CLOEXEC ...
#define DRM_RDWR ...

int qgs_ioctl(int fd, unsigned long request, void *arg);
"""

def drm_include_dirs() -> list[str]:
    """The first folder holding the DRM UAPI headers; fail with the fix."""
    for folder in DRM_INCLUDE_DIRS:
        if os.path.exists(os.path.join(folder, "drm_mode.h")):
            return [folder]
    raise RuntimeError(
        "DRM UAPI headers (drm.h, drm_mode.h) not found in "
        + " or ".join(DRM_INCLUDE_DIRS)
        + ": install libdrm-dev (Debian) or kernel-headers (Fedora)")


def make_ffibuilder() -> cffi.FFI:
    builder = cffi.FFI()
    builder.cdef(CDEF)
    builder.set_source("qubes_gpu_share._native", PREAMBLE,
                       include_dirs=drm_include_dirs())
    return builder


ffibuilder = make_ffibuilder()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)

// SPDX-License-Identifier: GPL-2.0
/*
 * Xen lab, test-only. CONFIG_XEN_GNTDEV_DMABUF selects
 * CONFIG_XEN_GRANT_DMA_ALLOC, whose two helpers live in the core kernel
 * (drivers/xen/grant-table.c) and are not built into Debian's kernel. They
 * serve only the GNTDEV_DMA_FLAG_WC/COHERENT allocation flags; the lab
 * (like the project) uses flags=0, so a refusal is enough.
 */
#include <linux/errno.h>
#include <xen/grant_table.h>

int gnttab_dma_alloc_pages(struct gnttab_dma_alloc_args *args)
{
	return -EOPNOTSUPP;
}

int gnttab_dma_free_pages(struct gnttab_dma_alloc_args *args)
{
	return -EOPNOTSUPP;
}

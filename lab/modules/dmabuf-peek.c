// SPDX-License-Identifier: GPL-2.0
/*
 * dmabuf-peek: a test-only importer that reads what a dma-buf holds.
 *
 * The lab has to show that the dma-buf xen-gntdev's EXP_FROM_REFS returns
 * in a PVH domU really holds the pages dom0 granted. Without the project's
 * kernel series user space cannot read it (gntdev's exporter has neither
 * mmap nor vmap), and granting it back to dom0 cannot work either (its
 * pages are grant mappings; Xen grants only a domain's own RAM). So this
 * module does what a GPU driver importing the buffer would do: attach, map
 * the attachment, and read the pages the sg table names, through the
 * kernel's direct map. With the series' vmap (kernel/0002) it can also read
 * the buffer as a driver's kernel mapping does: dma_buf_vmap() bracketed by
 * dma_buf_begin/end_cpu_access().
 *
 * Use: open /dev/dmabuf_peek, write the dma-buf's fd number as decimal text
 * (the sg table) or prefixed with 'v' (vmap), read the buffer's bytes back
 * (up to PEEK_MAX). Not for production: it hands any dma-buf's contents to
 * whoever may open the node (root only).
 */
#include <linux/dma-buf.h>
#include <linux/dma-mapping.h>
#include <linux/fs.h>
#include <linux/highmem.h>
#include <linux/io.h>
#include <linux/kernel.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/vmalloc.h>

#define PEEK_MAX (64 * PAGE_SIZE)

struct peek {
	void *data;
	size_t size;
};

static struct miscdevice peek_dev;

/* Copy the pages of the mapped attachment into buf (size bytes). */
static int peek_copy(struct sg_table *sgt, void *buf, size_t size)
{
	struct sg_page_iter iter;
	size_t done = 0;

	for_each_sgtable_page(sgt, &iter, 0) {
		void *src;
		size_t n = min_t(size_t, PAGE_SIZE, size - done);

		if (!n)
			break;
		src = kmap_local_page(sg_page_iter_page(&iter));
		memcpy(buf + done, src, n);
		kunmap_local(src);
		done += n;
	}
	return done == size ? 0 : -EIO;
}

static int peek_dmabuf(struct peek *peek, int fd)
{
	struct dma_buf *dmabuf = dma_buf_get(fd);
	struct dma_buf_attachment *attach;
	struct sg_table *sgt;
	int ret;

	if (IS_ERR(dmabuf))
		return PTR_ERR(dmabuf);
	ret = -EFBIG;
	if (dmabuf->size > PEEK_MAX)
		goto put;
	vfree(peek->data);
	peek->size = 0;
	peek->data = vmalloc(dmabuf->size);
	ret = -ENOMEM;
	if (!peek->data)
		goto put;
	attach = dma_buf_attach(dmabuf, peek_dev.this_device);
	ret = PTR_ERR_OR_ZERO(attach);
	if (ret)
		goto put;
	sgt = dma_buf_map_attachment(attach, DMA_BIDIRECTIONAL);
	ret = PTR_ERR_OR_ZERO(sgt);
	if (!ret) {
		ret = peek_copy(sgt, peek->data, dmabuf->size);
		dma_buf_unmap_attachment(attach, sgt, DMA_BIDIRECTIONAL);
	}
	dma_buf_detach(dmabuf, attach);
	if (!ret)
		peek->size = dmabuf->size;
put:
	dma_buf_put(dmabuf);
	return ret;
}

/* Read the buffer through the exporter's vmap, as a driver would. */
static int peek_vmap(struct peek *peek, int fd)
{
	struct dma_buf *dmabuf = dma_buf_get(fd);
	struct iosys_map map;
	int ret;

	if (IS_ERR(dmabuf))
		return PTR_ERR(dmabuf);
	ret = -EFBIG;
	if (dmabuf->size > PEEK_MAX)
		goto put;
	vfree(peek->data);
	peek->size = 0;
	peek->data = vmalloc(dmabuf->size);
	ret = -ENOMEM;
	if (!peek->data)
		goto put;
	ret = dma_buf_begin_cpu_access(dmabuf, DMA_FROM_DEVICE);
	if (ret)
		goto put;
	ret = dma_buf_vmap(dmabuf, &map);
	if (!ret) {
		if (map.is_iomem)
			memcpy_fromio(peek->data, map.vaddr_iomem, dmabuf->size);
		else
			memcpy(peek->data, map.vaddr, dmabuf->size);
		dma_buf_vunmap(dmabuf, &map);
		peek->size = dmabuf->size;
	}
	dma_buf_end_cpu_access(dmabuf, DMA_FROM_DEVICE);
put:
	dma_buf_put(dmabuf);
	return ret;
}

static ssize_t peek_write(struct file *file, const char __user *ubuf,
			  size_t count, loff_t *ppos)
{
	bool vmap = false;
	char first;
	int fd, ret;

	if (count && !get_user(first, ubuf) && first == 'v') {
		vmap = true;
		ubuf++;
		count--;
	}
	ret = kstrtoint_from_user(ubuf, count, 10, &fd);
	if (ret)
		return ret;
	if (vmap)
		ret = peek_vmap(file->private_data, fd);
	else
		ret = peek_dmabuf(file->private_data, fd);
	return ret ? ret : count + vmap;
}

static ssize_t peek_read(struct file *file, char __user *ubuf, size_t count,
			 loff_t *ppos)
{
	struct peek *peek = file->private_data;

	return simple_read_from_buffer(ubuf, count, ppos, peek->data,
				       peek->size);
}

static int peek_open(struct inode *inode, struct file *file)
{
	file->private_data = kzalloc(sizeof(struct peek), GFP_KERNEL);
	return file->private_data ? 0 : -ENOMEM;
}

static int peek_release(struct inode *inode, struct file *file)
{
	struct peek *peek = file->private_data;

	vfree(peek->data);
	kfree(peek);
	return 0;
}

static const struct file_operations peek_fops = {
	.owner = THIS_MODULE,
	.open = peek_open,
	.release = peek_release,
	.read = peek_read,
	.write = peek_write,
	.llseek = no_llseek,
};

static struct miscdevice peek_dev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "dmabuf_peek",
	.fops = &peek_fops,
	.mode = 0600,
};

static int __init peek_init(void)
{
	int ret = misc_register(&peek_dev);

	if (ret)
		return ret;
	/* the exporter maps its sg table for this device: any address */
	dma_coerce_mask_and_coherent(peek_dev.this_device, DMA_BIT_MASK(64));
	return 0;
}

static void __exit peek_exit(void)
{
	misc_deregister(&peek_dev);
}

module_init(peek_init);
module_exit(peek_exit);
MODULE_DESCRIPTION("Test-only dma-buf importer that reads a buffer's pages");
MODULE_LICENSE("GPL");
MODULE_IMPORT_NS(DMA_BUF);

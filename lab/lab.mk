# The Xen lab (lab/README.md): Xen 4.17 + Debian's 6.1 kernel as PV dom0,
# PV and PVH domUs, under QEMU without KVM, everything from Debian's packages.
#   make xen-lab        build everything (packages, modules, images)
#   make xen-test       build, boot, run the lab, write lab/out/results.json
#                       and results.md (CI runs it; `lab/report.py --readme`
#                       puts the table into lab/README.md)

LAB_OUT := lab/out

.PHONY: xen-lab xen-test lab-host-tools

# Host tools (Debian packages, installed only when missing).
lab-host-tools:
	@scripts/ensure-system-deps \
	    qemu-system-x86:/usr/bin/qemu-system-x86_64 \
	    cpio:/usr/bin/cpio kmod:/usr/sbin/depmod zstd:/usr/bin/zstd patch:/usr/bin/patch \
	    gcc-12:/usr/bin/gcc-12 make:/usr/bin/make xz-utils:/usr/bin/xz

xen-lab: venv lab-host-tools
	lab/debs.py fetch
	lab/debs.py unpack
	lab/build-modules
	lab/checkpatch
	zcat $(LAB_OUT)/root/xen/boot/xen-4.17-amd64.gz > $(LAB_OUT)/xen.elf
	cp $(LAB_OUT)/root/kernel/boot/vmlinuz-* $(LAB_OUT)/vmlinuz
	lab/make-initramfs

xen-test: xen-lab
	lab/boot.py
	lab/report.py

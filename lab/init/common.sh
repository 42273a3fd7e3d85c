# Sourced by both /init scripts: a minimal system for the lab's programs.
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin:/usr/sbin:/usr/lib/xen-4.17/bin
# no ld.so.cache in the image: name the library directories
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
export PYTHONPATH=/lab/site:/lab PYTHONDONTWRITEBYTECODE=1 HOME=/tmp
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts

load() {  # load NAME: a stock module and its dependencies (list made by make-initramfs)
    for ko in $(cat /lab/load/"$1"); do insmod "$ko" 2>/dev/null; done
}
load xen-evtchn
load xenfs
load xen-gntalloc
mount -t xenfs xenfs /proc/xen

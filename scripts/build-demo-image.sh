#!/usr/bin/env bash
# Builds the demo's bootable desktop image from Debian packages, without mounting anything:
#   demo-desktop.qcow2   a 512 MiB disk (MBR, syslinux) that boots from disk as any desktop
#                        does: partition 1 (FAT, 48 MiB) holds syslinux, the Debian cloud
#                        kernel and a small initramfs that loads the virtio modules and
#                        switches to partition 2 (ext4, label deskvirt-root), a busybox system
#                        with a login on the screen (tty1) and on the serial console (ttyS0),
#                        eth0 configured by DHCP, and Debian's QEMU guest agent.
#   The login: user `student`, password `student` (root has no password login). The screen
#   and the serial console say so above the prompt. Files written to the disk persist.
#
#   scripts/build-demo-image.sh [outdir]   (default ~/.cache/deskvirt/demo-image/current)
#
# outdir/demo-desktop.qcow2 is a link to the build under the cache, which is never changed
# once made (a new build has a new key): resolve it (readlink -f) before cloning from it.
# Runs as root.
# Cached under ~/.cache/deskvirt/demo-image/<key>/ keyed by the package versions and this
# script's layout version; a cached build takes well under a second. Prints the output dir.
set -euo pipefail

LAYOUT=2   # bump when the disk layout, the init scripts or the accounts change
CACHE=${DESKVIRT_DEMO_IMAGE_CACHE:-$HOME/.cache/deskvirt/demo-image}
OUT=${1:-$CACHE/current}
MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
         failover net_failover virtio_net virtio_blk virtio_console)
SYSLINUX=/usr/lib/syslinux
DISK_MIB=512
BOOT_MIB=48

log() { echo "[demo-image] $*" >&2; }
die() { echo "[demo-image] error: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (the image's files are owned by root; mknod /dev/console)"
for b in apt-cache apt-get dpkg-deb cpio gzip qemu-img sfdisk mkfs.fat mcopy syslinux \
  mkfs.ext4 openssl; do
  command -v "$b" >/dev/null 2>&1 || die "missing $b (run scripts/install-deps.sh)"
done
[ -f "$SYSLINUX/mbr/mbr.bin" ] || die "missing $SYSLINUX/mbr/mbr.bin (syslinux-common)"

. "$(dirname "$0")/lib/guest-packages.sh"
resolve_guest_packages qga

# The key covers this script and the shared steps too, so no edit is served from an old cache.
key=$(printf '%s\n' "$LAYOUT" "$kernel_pkg=$kernel_ver" "busybox-static=$busybox_ver" \
  "qemu-guest-agent=$qga_ver" "$(sha256sum "$SYSLINUX/mbr/mbr.bin" | cut -c1-16)" \
  "$(cat "$0" "$(dirname "$0")/lib/guest-packages.sh" | sha256sum | cut -c1-16)" |
  sha256sum | cut -c1-16)
built=$CACHE/$key

# The output is a link to the build, which never changes once made: a disk cloned from it
# keeps its backing file when a later build (a new kernel, say) is published.
publish() {
  mkdir -p "$OUT"
  ln -sfn "$built/demo-desktop.qcow2" "$OUT/demo-desktop.qcow2"
  printf '%s\n' "$kernel_pkg=$kernel_ver" "busybox-static=$busybox_ver" \
    "qemu-guest-agent=$qga_ver" >"$OUT/VERSIONS"
  (cd "$OUT" && pwd)
}

if [ -s "$built/demo-desktop.qcow2" ]; then
  publish
  exit 0
fi

log "building $key from $kernel_pkg $kernel_ver, busybox-static $busybox_ver"
mkdir -p "$CACHE"
work=$(mktemp -d "$CACHE/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

fetch_guest_packages "$work"
busybox=$work/busybox/bin/busybox

# Every busybox applet as a link in $1, as busybox itself lists their paths.
applets() {
  local root=$1 path
  for path in $("$busybox" --list-full); do
    [ -e "$root/$path" ] && continue
    mkdir -p "$root/$(dirname "$path")"
    ln -s /bin/busybox "$root/$path"
  done
}

# --- The initramfs: virtio modules, then the root file system on partition 2. ---
initrd=$work/initrd
mkdir -p "$initrd"/{bin,dev,proc,sys,newroot}
cp "$busybox" "$initrd/bin/busybox"
ln -s busybox "$initrd/bin/sh"
copy_modules "$moddir" "$initrd/lib/modules" "${MODULES[@]}"
cat >"$initrd/init" <<INIT
#!/bin/sh
export PATH=/bin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
for m in ${loaded[*]}; do
  /bin/busybox insmod /lib/modules/\$m.ko || echo "deskvirt: module \$m did not load"
done
# The disk shows up once virtio_blk probed it.
for i in 1 2 3 4 5 6 7 8 9 10; do
  [ -b /dev/vda2 ] && break
  /bin/busybox sleep 1
done
/bin/busybox mount -t ext4 -o rw /dev/vda2 /newroot || {
  echo "deskvirt: cannot mount the root file system /dev/vda2"
  exec /bin/sh
}
/bin/busybox umount /proc /sys
/bin/busybox mount --move /dev /newroot/dev
exec /bin/busybox switch_root /newroot /sbin/init
INIT
chmod +x "$initrd/init"
mknod -m 600 "$initrd/dev/console" c 5 1 2>/dev/null || true
(cd "$initrd" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) |
  gzip -9 >"$work/initrd.img"

# --- The root file system: busybox init, logins on tty1 and ttyS0, DHCP, the guest agent. ---
root=$work/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,var/log,etc/init.d,root}
mkdir -p "$root/home/student"
cp "$busybox" "$root/bin/busybox"
applets "$root"
chmod 1777 "$root/tmp"
chmod 700 "$root/root"

copy_qemu_ga "$work" "$root" usr/sbin/qemu-ga

echo deskvirt-desktop >"$root/etc/hostname"
cat >"$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/sh
student:x:1000:1000:Student:/home/student:/bin/sh
PASSWD
cat >"$root/etc/group" <<'GROUP'
root:x:0:
student:x:1000:
GROUP
# The password is hashed here with a fresh salt (SHA-512 crypt, which busybox's login reads).
hash=$(openssl passwd -6 student)
printf 'root:*:19000:0:99999:7:::\nstudent:%s:19000:0:99999:7:::\n' "$hash" >"$root/etc/shadow"
chmod 600 "$root/etc/shadow"
chown -R 1000:1000 "$root/home/student"
# The screen is cleared first (an ANSI escape), so the boot messages above it go.
printf '\033[H\033[2J' >"$root/etc/issue"
cat >>"$root/etc/issue" <<'ISSUE'
  deskvirt demo desktop (\n)
  a linked clone of the demo image: what you save in /home/student stays on this desktop

  log in as student, password student

ISSUE
cat >"$root/etc/motd" <<'MOTD'
Welcome to the deskvirt demo desktop. `ip addr` shows the address DHCP gave eth0.
MOTD
cat >"$root/etc/inittab" <<'INITTAB'
::sysinit:/etc/init.d/rcS
tty1::respawn:/sbin/getty 38400 tty1
ttyS0::respawn:/sbin/getty -L 115200 ttyS0 vt100
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/umount -a -r
INITTAB
cat >"$root/etc/init.d/rcS" <<'RCS'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -o remount,rw /
hostname -F /etc/hostname
ip link set lo up
ip link set eth0 up 2>/dev/null && udhcpc -i eth0 -b -s /etc/udhcpc.script >/dev/null 2>&1
# The QEMU guest agent, on the port the domain names org.qemu.guest_agent.0 (no udev here to
# make the /dev/virtio-ports link).
for p in /sys/class/virtio-ports/*; do
  if [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ]; then
    qemu-ga -m virtio-serial -p "/dev/${p##*/}" -t /run -f /run/qemu-ga.pid -d
  fi
done
RCS
chmod +x "$root/etc/init.d/rcS"
cat >"$root/etc/udhcpc.script" <<'DHCP'
#!/bin/sh
case "$1" in
  bound | renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    : >/etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
    ;;
esac
DHCP
chmod +x "$root/etc/udhcpc.script"

# --- The disk: MBR with syslinux's boot code, a FAT boot partition, the ext4 root. ---
sector=512
boot_start=2048
boot_sectors=$((BOOT_MIB * 1024 * 1024 / sector))
root_start=$((boot_start + boot_sectors))
root_sectors=$((DISK_MIB * 1024 * 1024 / sector - root_start))

cat >"$work/syslinux.cfg" <<'CFG'
DEFAULT desktop
PROMPT 0
TIMEOUT 0
LABEL desktop
  KERNEL /vmlinuz
  INITRD /initrd.img
  APPEND root=/dev/vda2 console=ttyS0,115200 console=tty0 quiet
CFG
# The boot partition as a file of its own: FAT, told where it starts on the disk (hidden
# sectors), syslinux installed into it, then the kernel, the initramfs and the config.
mkfs.fat -C -h "$boot_start" -n DVBOOT "$work/boot.fat" $((BOOT_MIB * 1024)) >/dev/null
syslinux --install "$work/boot.fat"
mcopy -i "$work/boot.fat" "$vmlinuz" ::/vmlinuz
mcopy -i "$work/boot.fat" "$work/initrd.img" ::/initrd.img
mcopy -i "$work/boot.fat" "$work/syslinux.cfg" ::/syslinux.cfg
# The root partition, filled from the directory (-d), owned as the files are here.
mkfs.ext4 -q -F -L deskvirt-root -d "$root" "$work/root.ext4" $((root_sectors * sector / 1024))K

truncate -s $((DISK_MIB * 1024 * 1024)) "$work/disk.raw"
sfdisk -q "$work/disk.raw" <<TABLE
label: dos
start=$boot_start, size=$boot_sectors, type=c, bootable
start=$root_start, size=$root_sectors, type=83
TABLE
dd if="$SYSLINUX/mbr/mbr.bin" of="$work/disk.raw" bs=440 count=1 conv=notrunc status=none
dd if="$work/boot.fat" of="$work/disk.raw" bs=$sector seek=$boot_start conv=notrunc,sparse \
  status=none
dd if="$work/root.ext4" of="$work/disk.raw" bs=$sector seek=$root_start conv=notrunc,sparse \
  status=none
mkdir -p "$work/out"
qemu-img convert -q -f raw -O qcow2 "$work/disk.raw" "$work/out/demo-desktop.qcow2"

rm -rf "$built"
mv "$work/out" "$built"
log "built $built"
publish

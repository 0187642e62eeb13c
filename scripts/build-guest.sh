#!/usr/bin/env bash
# Builds a tiny bootable test guest from Debian packages (no network needed in the guest):
#   vmlinuz      the Debian cloud kernel (linux-image-*-cloud-amd64)
#   initrd.img   a gzip'd newc initramfs: busybox-static, the virtio modules and an /init that
#                mounts proc/sys/dev, loads the modules, prints "DESKVIRT-GUEST-READY ..." on the
#                serial console (once a second, so a late reader of a pty still sees it) and
#                stays alive; with `deskvirt.dhcp` on the kernel command line it also takes eth0's
#                address by DHCP at boot and whenever its carrier comes back, printing
#                "DESKVIRT-GUEST-IP <address>"; with `deskvirt.write=N` it writes N MiB of zeroes
#                over its disk at boot (then fsync; each byte `deskvirt.byte=OOO` in octal, from
#                `deskvirt.seek=S` MiB on) and prints "DESKVIRT-GUEST-WROTE N"; a serial line
#                "deskvirt-write N S OOO" does the same while it runs; and Debian's real QEMU guest
#                agent (qemu-ga, with the host's libraries it links) answering on the virtio port
#                org.qemu.guest_agent.0 when the domain has one (not with `deskvirt.noagent`),
#                whose fsfreeze hook prints "DESKVIRT-GUEST-FSFREEZE freeze|thaw" on the console
#   base.qcow2   an empty 64 MiB qcow2 image to hang linked clones on
#
#   scripts/build-guest.sh [outdir]     (default ~/.cache/deskvirt/guest/current)
#
# Cached under ~/.cache/deskvirt/guest/<key>/ keyed by the package versions and this script's
# layout version; a cached build takes well under a second. Prints the output dir on stdout.
set -euo pipefail

LAYOUT=9   # bump when the initramfs layout or /init changes
CACHE=${DESKVIRT_GUEST_CACHE:-$HOME/.cache/deskvirt/guest}
OUT=${1:-$CACHE/current}
MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
         failover net_failover virtio_net virtio_blk virtio_console)

log() { echo "[guest] $*" >&2; }
die() { echo "[guest] error: $*" >&2; exit 1; }

for b in apt-cache apt-get dpkg-deb cpio gzip qemu-img; do
  command -v "$b" >/dev/null 2>&1 || die "missing $b (run scripts/install-deps.sh)"
done

. "$(dirname "$0")/lib/guest-packages.sh"
resolve_guest_packages qga

key=$(printf '%s\n' "$LAYOUT" "$kernel_pkg=$kernel_ver" "busybox-static=$busybox_ver" \
  "qemu-guest-agent=$qga_ver" \
  "$(cat "$0" "$(dirname "$0")/lib/guest-packages.sh" | sha256sum | cut -c1-16)" |
  sha256sum | cut -c1-16)
built=$CACHE/$key

publish() {
  mkdir -p "$OUT"
  local f
  for f in vmlinuz initrd.img base.qcow2; do
    if ! cmp -s "$built/$f" "$OUT/$f"; then
      cp -f "$built/$f" "$OUT/$f.tmp.$$"
      mv -f "$OUT/$f.tmp.$$" "$OUT/$f"
    fi
  done
  printf '%s\n' "$kernel_pkg=$kernel_ver" "busybox-static=$busybox_ver" \
    "qemu-guest-agent=$qga_ver" >"$OUT/VERSIONS"
  (cd "$OUT" && pwd)
}

if [ -s "$built/vmlinuz" ] && [ -s "$built/initrd.img" ] && [ -s "$built/base.qcow2" ]; then
  publish
  exit 0
fi

log "building guest $key from $kernel_pkg $kernel_ver and busybox-static $busybox_ver"
mkdir -p "$CACHE"
work=$(mktemp -d "$CACHE/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT

fetch_guest_packages "$work"

root=$work/root
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,lib/modules}
cp "$work/busybox/bin/busybox" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"

copy_qemu_ga "$work" "$root" bin/qemu-ga

# Modules in load order.
copy_modules "$moddir" "$root/lib/modules" "${MODULES[@]}"

cat >"$root/init" <<INIT
#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
for m in ${loaded[*]}; do
  insmod /lib/modules/\$m.ko || echo "DESKVIRT-GUEST-MODULE-FAILED \$m"
done
# With deskvirt.dhcp on the kernel command line: eth0 asks DHCP for its address at boot and
# again each time its carrier comes back (as NetworkManager does), and prints what it got.
if grep -qw deskvirt.dhcp /proc/cmdline; then
  cat >/bin/dhcp-event <<'EVENT'
#!/bin/sh
case "\$1" in
  bound | renew)
    ip addr flush dev "\$interface"
    ip addr add "\$ip/\$mask" dev "\$interface"
    echo "DESKVIRT-GUEST-IP \$ip" >/dev/console
    ;;
esac
EVENT
  chmod +x /bin/dhcp-event
  ip link set eth0 up
  (
    was=0
    while true; do
      now=\$(cat /sys/class/net/eth0/carrier 2>/dev/null || echo 0)
      if [ "\$now" = 1 ] && [ "\$was" != 1 ]; then
        udhcpc -i eth0 -n -q -t 5 -T 1 -s /bin/dhcp-event >/dev/null 2>&1
      fi
      was=\$now
      sleep 1
    done
  ) &
fi
# With deskvirt.write=N: N MiB written over the disk (each write reaches the host's file; a
# full host disk pauses the guest mid-way), then a line that says it is done. The bytes are
# zeroes, or every byte the octal value of deskvirt.byte=OOO; they start deskvirt.seek=S MiB in.
# A line "deskvirt-write N S OOO" on the serial console writes the same way while it runs.
arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^deskvirt.\$1=\\([0-9][0-9]*\\)\$/\\1/p"; }
write_disk() {
  if [ -n "\$3" ]; then
    tr '\\000' "\\\\\$3" </dev/zero
  else
    cat /dev/zero
  fi | dd of=/dev/vda bs=1M count="\$1" seek="\${2:-0}" iflag=fullblock conv=fsync \
    >/dev/null 2>&1 && echo "DESKVIRT-GUEST-WROTE \$1" >/dev/console
}
mib=\$(arg write)
if [ -n "\$mib" ]; then
  write_disk "\$mib" "\$(arg seek)" "\$(arg byte)" &
fi
(
  while true; do
    while read -r cmd n s o; do
      o=\$(echo "\$o" | tr -d '\\r')
      [ "\$cmd" = deskvirt-write ] && write_disk "\$n" "\$s" "\$o"
    done </dev/ttyS0
    sleep 1
  done
) &
# The QEMU guest agent, on the port the domain names org.qemu.guest_agent.0 (no udev here to
# make the /dev/virtio-ports link). Its fsfreeze hook says on the console when the host froze
# and thawed the guest's file systems. With deskvirt.noagent on the kernel command line, no
# agent runs (a guest without one).
cat >/bin/fsfreeze-hook <<'HOOK'
#!/bin/sh
sync
echo "DESKVIRT-GUEST-FSFREEZE \$1" >/dev/console
HOOK
chmod +x /bin/fsfreeze-hook
grep -qw deskvirt.noagent /proc/cmdline || for p in /sys/class/virtio-ports/*; do
  if [ "\$(cat "\$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ]; then
    mkdir -p /run /var/run
    qemu-ga -m virtio-serial -p "/dev/\${p##*/}" -F/bin/fsfreeze-hook -t /run \
      -f /run/qemu-ga.pid -d && echo "DESKVIRT-GUEST-AGENT \${p##*/}"
  fi
done
echo "DESKVIRT-GUEST-READY uptime=\$(cut -d' ' -f1 /proc/uptime) disks=\$(ls /sys/block | tr '\n' ,)"
while true; do
  sleep 1
  echo "DESKVIRT-GUEST-READY uptime=\$(cut -d' ' -f1 /proc/uptime) disks=\$(ls /sys/block | tr '\n' ,)"
done
INIT
chmod +x "$root/init"
# An initial console for the kernel to open before /init runs (needs root; /init copes without).
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true

mkdir -p "$work/out"
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -9 >"$work/out/initrd.img"
cp "$vmlinuz" "$work/out/vmlinuz"
qemu-img create -q -f qcow2 "$work/out/base.qcow2" 64M

rm -rf "$built"
mv "$work/out" "$built"
log "built $built"
publish

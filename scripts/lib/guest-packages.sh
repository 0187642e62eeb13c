# Debian packages a guest is built from, shared by scripts/build-guest.sh and
# scripts/build-demo-image.sh (sourced, not run). Each function calls `die` on failure.

# Sets kernel_pkg, the versioned package linux-image-cloud-amd64 depends on, and
# kernel_ver, busybox_ver and (with qga as $1) qga_ver: the candidates apt would install.
resolve_guest_packages() {
  kernel_pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  [ -n "$kernel_pkg" ] || die "cannot resolve linux-image-cloud-amd64 (apt-get update needed?)"
  # One apt-cache call for all candidates (apt-cache is slow to start on a busy machine).
  local versions
  versions=$(apt-cache policy "$kernel_pkg" busybox-static qemu-guest-agent 2>/dev/null |
    awk '/^[^ ]/ {pkg=$1; sub(":$", "", pkg)} /Candidate:/ {print pkg, $2}')
  kernel_ver=$(awk -v p="$kernel_pkg" '$1 == p {print $2}' <<<"$versions")
  busybox_ver=$(awk '$1 == "busybox-static" {print $2}' <<<"$versions")
  qga_ver=$(awk '$1 == "qemu-guest-agent" {print $2}' <<<"$versions")
  [ -n "$kernel_ver" ] && [ "$kernel_ver" != "(none)" ] || die "no candidate for $kernel_pkg"
  [ -n "$busybox_ver" ] && [ "$busybox_ver" != "(none)" ] || die "no candidate for busybox-static"
  if [ "${1:-}" = qga ]; then
    [ -n "$qga_ver" ] && [ "$qga_ver" != "(none)" ] || die "no candidate for qemu-guest-agent"
  fi
}

# Copies kernel modules $3... from module tree $1 into directory $2, decompressed (busybox
# insmod may not read .xz/.zst), skipping those built into the kernel. Sets `loaded` to the
# modules copied, in the order given (their load order).
copy_modules() {
  local moddir=$1 dest=$2 m src
  shift 2
  loaded=()
  mkdir -p "$dest"
  for m in "$@"; do
    src=$(find "$moddir" \( -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" \) -print -quit)
    if [ -z "$src" ]; then
      if grep -qs "/$m.ko" "$moddir/modules.builtin"; then
        log "$m is built in"
        continue
      fi
      die "module $m not found in $kernel_pkg"
    fi
    case "$src" in
      *.xz) xz -dc "$src" >"$dest/$m.ko" ;;
      *.zst) zstd -qdc "$src" >"$dest/$m.ko" ;;
      *) cp "$src" "$dest/$m.ko" ;;
    esac
    loaded+=("$m")
  done
}

# Downloads the packages resolve_guest_packages chose into directory $1 and unpacks each
# (into $1/kernel, $1/busybox, $1/qga). Sets vmlinuz and moddir, the kernel and its modules.
fetch_guest_packages() {
  local work=$1
  (cd "$work" && apt-get download -q "$kernel_pkg=$kernel_ver" "busybox-static=$busybox_ver" \
    "qemu-guest-agent=$qga_ver" >&2) || die "apt-get download failed"
  mkdir -p "$work/kernel" "$work/busybox" "$work/qga"
  dpkg -x "$work/${kernel_pkg}_"*.deb "$work/kernel"
  dpkg -x "$work/busybox-static_"*.deb "$work/busybox"
  dpkg -x "$work/qemu-guest-agent_"*.deb "$work/qga"
  vmlinuz=$(find "$work/kernel/boot" -name 'vmlinuz-*' -print -quit 2>/dev/null || true)
  [ -n "$vmlinuz" ] || die "no kernel in $kernel_pkg"
  moddir=$(find "$work/kernel/lib/modules" -mindepth 1 -maxdepth 1 -type d -print -quit 2>/dev/null || true)
  [ -n "$moddir" ] || die "no modules in $kernel_pkg"
}

# Copies qemu-ga (unpacked under $1 by fetch_guest_packages) to $2/$3, with the shared
# libraries it links as this host has them (the same Debian release; qemu-system-x86 pulls
# in every one), under the paths the loader looks in below root $2.
copy_qemu_ga() {
  local work=$1 root=$2 dest=$3 libs lib
  local qga=$work/qga/usr/sbin/qemu-ga
  [ -x "$qga" ] || die "no qemu-ga in qemu-guest-agent"
  mkdir -p "$root/$(dirname "$dest")"
  cp "$qga" "$root/$dest"
  libs=$(ldd "$qga") || die "ldd cannot read qemu-ga"
  if grep -q "not found" <<<"$libs"; then
    die "qemu-ga needs libraries this host lacks (run scripts/install-deps.sh): $(grep 'not found' <<<"$libs" | tr '\n' ' ')"
  fi
  for lib in $(awk '/=> \// {print $3} /^[[:space:]]*\// {print $1}' <<<"$libs"); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}

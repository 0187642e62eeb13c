#!/usr/bin/env bash
# Installs every system package deskvirt needs on Debian bookworm (idempotent, fast when done).
# Control plane build: golang-go, etcd-server, dpkg-dev, rsync, reflect2.
# The demo desktop image (scripts/build-demo-image.sh): fdisk, dosfstools, mtools, syslinux,
# e2fsprogs (also the agent's sealing of captured images: sfdisk, debugfs); reading its screen
# in the tests: tesseract-ocr.
# libvirt/QEMU/SPICE: see shared/LOCAL-LIBVIRT.md.
set -euo pipefail

need=(golang-go etcd-server dpkg-dev rsync golang-github-modern-go-reflect2-dev
      libvirt-dev libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
      qemu-system-x86 pkg-config iproute2 busybox-static cpio openssl curl
      iptables dnsmasq-base
      fdisk dosfstools mtools syslinux syslinux-common e2fsprogs tesseract-ocr tesseract-ocr-eng)
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# kubectl: the machine's own client if it has one, else Debian's (1.20, same as the plane)
command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)
# bookworm's qemu-utils must match qemu-system-x86 7.2 (a newer preinstalled one is replaced).
if ! dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null | grep -q '^1:7\.2'; then
  missing+=(qemu-utils)
fi

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! grep -rqs '^Types: deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
  echo "[deps] adding deb-src for bookworm"
  sudo_ tee /etc/apt/sources.list.d/deskvirt-src.sources >/dev/null <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  missing+=(__update__)
fi

if [ ${#missing[@]} -gt 0 ]; then
  echo "[deps] installing: ${missing[*]/__update__/}"
  export DEBIAN_FRONTEND=noninteractive
  sudo_ apt-get update -qq
  pkgs=()
  for p in "${missing[@]}"; do [ "$p" = __update__ ] || pkgs+=("$p"); done
  if [ ${#pkgs[@]} -gt 0 ]; then
    # pin qemu-utils to bookworm's 7.2 so qemu-img matches qemu-system-x86
    qv=$(apt-cache madison qemu-utils | awk -F'|' '$2 ~ /1:7\.2/ {gsub(/ /,"",$2); print $2; exit}')
    for i in "${!pkgs[@]}"; do [ "${pkgs[$i]}" = qemu-utils ] && [ -n "$qv" ] && pkgs[$i]="qemu-utils=$qv"; done
    sudo_ apt-get install -y -qq --no-install-recommends --allow-downgrades "${pkgs[@]}" >/dev/null
  fi
fi

# helm through PyPI (Helm's Go library); see shared/LOCAL-CONTROL-PLANE.md
if ! python3 -c 'import helm_sdkpy' 2>/dev/null; then
  echo "[deps] installing helm-sdkpy"
  pip install -q --ignore-requires-python 'helm-sdkpy==0.1.32'
fi
# helm template (client-only render with --api-versions/--kube-version), which helm-sdkpy lacks:
# Helm v4's C library through PyPI; tests/src/helm.rs `template`
if ! python3 -c 'import helm_python' 2>/dev/null; then
  echo "[deps] installing helm-python-sdk"
  pip install -q 'helm-python-sdk==0.2.2'
fi
echo "[deps] ok"

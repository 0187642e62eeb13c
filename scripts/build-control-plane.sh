#!/usr/bin/env bash
# Builds kube-apiserver and kube-controller-manager from Debian's `kubernetes` source package,
# once, into ~/.cache/deskvirt/kubernetes-<debian version>/bin (see shared/LOCAL-CONTROL-PLANE.md).
# Prints the bin directory on stdout.
set -euo pipefail
cache="${DESKVIRT_CACHE:-$HOME/.cache/deskvirt}"
mkdir -p "$cache"
exec 9>"$cache/.build-control-plane.lock"
flock 9

# The Debian version decides the cache key; `apt-cache showsrc` needs the deb-src entry.
ver=$(apt-cache showsrc kubernetes 2>/dev/null | awk '/^Version:/ {print $2; exit}')
[ -n "$ver" ] || { echo "no kubernetes source package (deb-src missing? run scripts/install-deps.sh)" >&2; exit 1; }
dir="$cache/kubernetes-${ver//[:+]/_}"
if [ -x "$dir/bin/kube-apiserver" ] && [ -x "$dir/bin/kube-controller-manager" ]; then
  echo "$dir/bin"; exit 0
fi

echo "[control-plane] building kube-apiserver and kube-controller-manager $ver (about 5 min, once)" >&2
work="$dir/src"
rm -rf "$work"; mkdir -p "$work"
(
  cd "$work"
  apt-get source --download-only kubernetes >/dev/null 2>&1
  dpkg-source -x ./*.dsc tree >/dev/null
  cd tree
  # Go >= 1.18 with the vendored reflect2 crashes json-iterator: use Debian's 1.0.2 copy.
  rm -rf vendor/github.com/modern-go/reflect2
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
  export GOPATH=$PWD/.go
  mkdir -p .go/src/k8s.io
  ln -sfn ../../.. .go/src/k8s.io/kubernetes
  mkdir -p "$work/home"
  HOME="$work/home" CGO_ENABLED=0 make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >&2
  mkdir -p "$dir/bin"
  cp _output/local/bin/linux/amd64/kube-apiserver _output/local/bin/linux/amd64/kube-controller-manager "$dir/bin/"
)
rm -rf "$work"
echo "$dir/bin"

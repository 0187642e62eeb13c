#!/usr/bin/env bash
# Runs every check and test of deskvirt: formatting, clippy, unit tests, and the cluster and
# libvirt tiers against a real kube-apiserver (local plane unless KUBECONFIG points elsewhere)
# and real libvirt/QEMU. Installs what it needs first. Used as-is by CI (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$SECONDS
# Incremental caches are only worth their gigabytes across edits; a test run builds once.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
step() { echo; echo "==> $* ($((SECONDS - t0))s)"; }

step "system packages"
scripts/install-deps.sh

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "deskvirt-core stays kube-free"
if cargo tree -e normal -p deskvirt-core --locked --prefix none | grep -E '^(kube|k8s-openapi|tokio)'; then
  echo "deskvirt-core must not depend on kube, k8s-openapi or tokio (its decisions are pure)" >&2
  exit 1
fi

step "control plane"
KUBECONFIG=$(scripts/control-plane.sh start)
export KUBECONFIG
scripts/control-plane.sh status

if [ -x scripts/libvirt.sh ]; then
  step "libvirt"
  scripts/libvirt.sh start
fi

step "cargo test (unit, libvirt and cluster tiers)"
cargo test --workspace --locked --no-fail-fast -- --test-threads="${DESKVIRT_TEST_THREADS:-4}"

step "done in $((SECONDS - t0))s"

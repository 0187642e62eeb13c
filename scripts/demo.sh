#!/usr/bin/env bash
# The main job on the embedded default: a local control plane (or the cluster KUBECONFIG points
# at), the deskvirt CRDs, and the examples, shown with kubectl.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --locked --workspace
KUBECONFIG=$(scripts/control-plane.sh start)
export KUBECONFIG
echo "==> installing the deskvirt.io CRDs"
kubectl apply --server-side --field-manager=deskvirt-demo -f charts/deskvirt/crds/deskvirt.io.yaml
kubectl wait --for=condition=Established --timeout=60s \
  crd/desktops.deskvirt.io crd/domainnodes.deskvirt.io crd/resourcepools.deskvirt.io
echo "==> applying examples/"
kubectl create namespace deskvirt-demo --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl apply --server-side --field-manager=deskvirt-demo -n deskvirt-demo -f examples/
echo
kubectl get resourcepools
echo
kubectl get desktops -n deskvirt-demo -o wide
echo
echo "The control plane keeps running: export KUBECONFIG=$KUBECONFIG"
echo "Stop it with: scripts/control-plane.sh stop"

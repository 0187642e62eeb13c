#!/usr/bin/env bash
# The main job on the embedded default: a local control plane (or the cluster KUBECONFIG points
# at), libvirt with QEMU on this host, the deskvirt CRDs, the operator and the node-agent as
# local processes, and the example pool and desktop. Ends when the desktop is Running and prints
# how to connect to it.
#
#   scripts/demo.sh          set everything up and start the example desktop
#   scripts/demo.sh stop     delete the demo desktop (while the agent still runs) and the pool,
#                            then stop the operator and the agent (the control plane and
#                            libvirt stay)
#
# Environment:
#   DESKVIRT_HYPERVISOR  qemu (default: TCG, works everywhere) or kvm (real hardware)
#   DESKVIRT_IMAGE       a qcow2 image (no backing file) to import as the DesktopImage
#                        demo-desktop that examples/desktop.yaml clones (default:
#                        scripts/build-demo-image.sh's disk, which boots to a login prompt;
#                        user student, password student)
set -euo pipefail
cd "$(dirname "$0")/.."

STATE=${DESKVIRT_DEMO_STATE:-$HOME/.cache/deskvirt/demo}
NS=deskvirt-demo
SYSTEM_NS=deskvirt-system
CONSOLE_NS=deskvirt-consoles
IMAGES_NS=deskvirt-system-images  # the images namespace examples/desktop.yaml names
IMAGES=/var/lib/deskvirt/images   # examples/pool.yaml's storage.imageDir
ORIGIN_PORT=18090                 # the local HTTP server the demo image is imported from
NODE=${DESKVIRT_NODE_NAME:-$(hostname -s)}
BIN=target/release

log() { echo "==> $*"; }
die() { echo "error: $*" >&2; exit 1; }

stop_process() {
  local name=$1 pidfile="$STATE/$1.pid"
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    log "stopping $name (pid $(cat "$pidfile"))"
    kill -TERM "$(cat "$pidfile")" || true
    for _ in $(seq 1 50); do kill -0 "$(cat "$pidfile")" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$pidfile"
}

if [ "${1:-}" = stop ]; then
  KUBECONFIG=${KUBECONFIG:-$HOME/.cache/deskvirt/plane/admin.kubeconfig}
  export KUBECONFIG
  if [ -f "$KUBECONFIG" ]; then
    log "deleting the demo desktops (the agent tears their domains and disks down)"
    kubectl delete desktops --all -n "$NS" --wait=true --timeout=120s || true
    kubectl delete resourcepool lab --ignore-not-found || true
  fi
  stop_process deskvirt-operator
  stop_process deskvirt-node-agent
  stop_process image-origin
  exit 0
fi

scripts/install-deps.sh
log "building the operator and the node-agent (release)"
cargo build --release --locked -p deskvirt-operator -p deskvirt-node-agent
KUBECONFIG=$(scripts/control-plane.sh start)
export KUBECONFIG
scripts/libvirt.sh start
mkdir -p "$STATE" "$IMAGES" /var/lib/deskvirt/disks

log "installing the deskvirt.io CRDs"
kubectl apply --server-side --field-manager=deskvirt-demo -f charts/deskvirt/crds/deskvirt.io.yaml >/dev/null
kubectl wait --for=condition=Established --timeout=60s \
  crd/desktops.deskvirt.io crd/domainnodes.deskvirt.io crd/resourcepools.deskvirt.io >/dev/null
for ns in "$SYSTEM_NS" "$CONSOLE_NS" "$IMAGES_NS" "$NS"; do
  kubectl get namespace "$ns" >/dev/null 2>&1 || kubectl create namespace "$ns" >/dev/null
done

if [ -n "${DESKVIRT_IMAGE:-}" ]; then
  image=$DESKVIRT_IMAGE
  [ -f "$image" ] || die "DESKVIRT_IMAGE=$image does not exist"
else
  # The build itself, which never changes (the output dir holds a link to it).
  image=$(readlink -f "$(scripts/build-demo-image.sh)/demo-desktop.qcow2")
fi
image=$(readlink -f "$image")
sum=$(sha256sum "$image" | cut -d' ' -f1)

log "starting the operator and the node-agent (logs in $STATE)"
stop_process deskvirt-operator
stop_process deskvirt-node-agent
stop_process image-origin
POD_NAMESPACE=$SYSTEM_NS POD_NAME=demo-operator nohup "$BIN/deskvirt-operator" \
  --console-namespace "$CONSOLE_NS" --console-user-namespaces "$NS" \
  --images-namespace "$IMAGES_NS" \
  --metrics-addr 127.0.0.1:18080 \
  >"$STATE/deskvirt-operator.log" 2>&1 &
echo $! >"$STATE/deskvirt-operator.pid"
nohup "$BIN/deskvirt-node-agent" --node-name "$NODE" \
  --hypervisor "${DESKVIRT_HYPERVISOR:-qemu}" \
  --lease-namespace "$SYSTEM_NS" --console-namespace "$CONSOLE_NS" \
  --images-namespace "$IMAGES_NS" \
  --node-labels deskvirt.io/pool=lab --metrics-addr 127.0.0.1:18081 \
  >"$STATE/deskvirt-node-agent.log" 2>&1 &
echo $! >"$STATE/deskvirt-node-agent.pid"

# The image's origin: a plain HTTP server on loopback, as a lab's image server would be. The
# hosts fetch the file from it and check it against its SHA-256.
nohup python3 -m http.server "$ORIGIN_PORT" --bind 127.0.0.1 --directory "$(dirname "$image")" \
  >"$STATE/image-origin.log" 2>&1 &
echo $! >"$STATE/image-origin.pid"

log "applying examples/pool.yaml, the DesktopImage demo-desktop and examples/desktop.yaml"
kubectl apply -f examples/pool.yaml
# A new build has another sum: the DesktopImage cuts a new version, which new desktops clone;
# existing desktops keep the version they were cloned from.
kubectl apply -f - <<YAML
apiVersion: deskvirt.io/v1alpha1
kind: DesktopImage
metadata:
  name: demo-desktop
  namespace: $IMAGES_NS
spec:
  source:
    http:
      url: http://127.0.0.1:$ORIGIN_PORT/$(basename "$image")
      sha256: $sum
  pools: [lab]
YAML
if ! kubectl wait -n "$IMAGES_NS" --for=condition=Ready --timeout=300s desktopimage/demo-desktop; then
  kubectl describe -n "$IMAGES_NS" desktopimage/demo-desktop >&2 || true
  tail -n 30 "$STATE"/*.log >&2 || true
  die "the demo image was not copied to the host"
fi
kubectl get desktopimages -n "$IMAGES_NS"
kubectl apply -n "$NS" -f examples/desktop.yaml
if ! kubectl wait -n "$NS" --for=condition=Ready --timeout=300s desktop/alice; then
  kubectl describe -n "$NS" desktop/alice >&2 || true
  tail -n 30 "$STATE"/*.log >&2 || true
  die "the example desktop did not become Ready"
fi
# The guest's own console says when it reached its login prompt (the demo image's getty).
# The domain is <namespace>--<name>--<uid> (names::domain_name; short names are not cut).
uid=$(kubectl get desktop -n "$NS" alice -o jsonpath='{.metadata.uid}')
serial=/var/log/libvirt/qemu/$NS--alice--$uid-serial.log
if [ -z "${DESKVIRT_IMAGE:-}" ]; then
  log "waiting for the desktop's login prompt (its serial console: $serial)"
  for _ in $(seq 1 180); do
    grep -qs "login:" "$serial" && break
    sleep 1
  done
  grep -qs "login:" "$serial" || log "no login prompt yet after 180 s; see $serial"
fi
echo
kubectl get resourcepools
echo
kubectl get domainnodes
echo
kubectl get desktops -n "$NS" -o wide
vv="$STATE/alice.vv"
kubectl get secret -n "$NS" alice-console -o jsonpath='{.data.console\.vv}' | base64 -d >"$vv"
chmod 600 "$vv"
uri=$(kubectl get desktop -n "$NS" alice -o jsonpath='{.status.spice.uri}')
cat <<EOF

The desktop alice is Running at $uri.
Its screen shows a login prompt: user student, password student (the demo image's).
Connect with a SPICE client (package virt-viewer):

  remote-viewer $vv

or, from anywhere kubectl works:

  kubectl get secret -n $NS alice-console -o jsonpath='{.data.console\.vv}' | base64 -d > alice.vv
  remote-viewer alice.vv

The control plane keeps running: export KUBECONFIG=$KUBECONFIG
Stop the demo with: scripts/demo.sh stop   (then scripts/control-plane.sh stop)
EOF

#!/usr/bin/env bash
# A real local Kubernetes control plane: etcd, kube-apiserver and kube-controller-manager built
# from Debian's packages (shared/LOCAL-CONTROL-PLANE.md).
#
#   control-plane.sh start    start (or reuse a healthy) plane; prints the kubeconfig path
#   control-plane.sh status   exit 0 and print endpoints when healthy
#   control-plane.sh stop     stop every process of the plane (data is discarded)
#   control-plane.sh env      print `export KUBECONFIG=...` for eval
#
# With KUBECONFIG pointing at an existing cluster (and DESKVIRT_LOCAL_PLANE unset), start and env
# use that cluster and start nothing. State lives in $DESKVIRT_PLANE_DIR
# (default ~/.cache/deskvirt/plane); ports are chosen free at each start.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dir="${DESKVIRT_PLANE_DIR:-$HOME/.cache/deskvirt/plane}"
kubeconfig="$dir/admin.kubeconfig"
log() { echo "[control-plane] $*" >&2; }

external() {
  [ -z "${DESKVIRT_LOCAL_PLANE:-}" ] && [ -n "${KUBECONFIG:-}" ] && [ "$KUBECONFIG" != "$kubeconfig" ]
}

pid_alive() { [ -f "$dir/$1.pid" ] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null; }

healthy() {
  [ -f "$dir/ports.env" ] && [ -f "$kubeconfig" ] || return 1
  pid_alive etcd && pid_alive kube-apiserver && pid_alive kube-controller-manager || return 1
  # shellcheck disable=SC1091
  . "$dir/ports.env"
  curl -sfk -m 3 -H "Authorization: Bearer $(cat "$dir/admin.token")" \
    "https://127.0.0.1:$APISERVER_PORT/readyz" >/dev/null
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

stop_plane() {
  for c in kube-controller-manager kube-apiserver etcd; do
    if pid_alive "$c"; then
      local pid; pid=$(cat "$dir/$c.pid")
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/$c.pid"
  done
}

write_certs() {
  # A CA and an apiserver certificate signed by it (rustls refuses a self-signed end entity).
  [ -f "$dir/pki/ca.crt" ] && [ -f "$dir/pki/apiserver.crt" ] && return 0
  mkdir -p "$dir/pki"
  local p="$dir/pki"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=deskvirt-local-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$p/ca.key" -out "$p/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout "$p/apiserver.key" \
    -out "$p/apiserver.csr" 2>/dev/null
  printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" \
    "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc" \
    > "$p/apiserver.ext"
  openssl x509 -req -in "$p/apiserver.csr" -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial \
    -days 3650 -extfile "$p/apiserver.ext" -out "$p/apiserver.crt" 2>/dev/null
  [ -f "$p/sa.key" ] || openssl genrsa -out "$p/sa.key" 2048 2>/dev/null
  openssl rsa -in "$p/sa.key" -pubout -out "$p/sa.pub" 2>/dev/null
  [ -f "$dir/admin.token" ] || head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/admin.token"
  chmod 600 "$dir/admin.token" "$p/"*.key
}

write_kubeconfig() {
  local port=$1
  cat > "$kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: deskvirt-local
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority-data: $(base64 -w0 < "$dir/pki/ca.crt")
users:
- name: admin
  user:
    token: $(cat "$dir/admin.token")
contexts:
- name: deskvirt-local
  context: {cluster: deskvirt-local, user: admin}
current-context: deskvirt-local
KC
  chmod 600 "$kubeconfig"
}

start_plane() {
  mkdir -p "$dir"
  exec 8>"$dir/.lock"
  flock 8
  if healthy; then log "reusing the healthy plane in $dir"; echo "$kubeconfig"; return 0; fi
  stop_plane
  local bin; bin=$("$here/build-control-plane.sh")
  write_certs
  rm -rf "$dir/etcd"
  local etcd_port peer_port api_port kcm_port
  etcd_port=$(free_port); peer_port=$(free_port); api_port=$(free_port); kcm_port=$(free_port)
  printf 'ETCD_PORT=%s\nAPISERVER_PORT=%s\nKCM_PORT=%s\n' "$etcd_port" "$api_port" "$kcm_port" > "$dir/ports.env"
  echo "$(cat "$dir/admin.token"),admin,admin-uid,system:masters" > "$dir/tokens.csv"
  write_kubeconfig "$api_port"
  local t0=$SECONDS

  setsid etcd --name deskvirt --data-dir "$dir/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "deskvirt=http://127.0.0.1:$peer_port" \
    --quota-backend-bytes 4294967296 --log-level warn \
    >"$dir/etcd.log" 2>&1 < /dev/null 8>&- &
  echo $! > "$dir/etcd.pid"
  for _ in $(seq 1 100); do curl -sf -m 1 "http://127.0.0.1:$etcd_port/health" >/dev/null && break; sleep 0.1; done

  setsid "$bin/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$etcd_port" --bind-address=127.0.0.1 --secure-port="$api_port" \
    --advertise-address=127.0.0.1 --tls-cert-file="$dir/pki/apiserver.crt" \
    --tls-private-key-file="$dir/pki/apiserver.key" --token-auth-file="$dir/tokens.csv" \
    --authorization-mode=RBAC --service-account-issuer=https://kubernetes.default.svc \
    --service-account-key-file="$dir/pki/sa.pub" --service-account-signing-key-file="$dir/pki/sa.key" \
    --service-cluster-ip-range=10.96.0.0/12 --enable-priority-and-fairness=false \
    --max-requests-inflight=800 --max-mutating-requests-inflight=400 --v=1 \
    >"$dir/kube-apiserver.log" 2>&1 < /dev/null 8>&- &
  echo $! > "$dir/kube-apiserver.pid"
  local ok=
  for _ in $(seq 1 600); do
    if curl -sfk -m 2 -H "Authorization: Bearer $(cat "$dir/admin.token")" "https://127.0.0.1:$api_port/readyz" >/dev/null; then ok=1; break; fi
    pid_alive kube-apiserver || break
    sleep 0.2
  done
  [ -n "$ok" ] || { log "kube-apiserver did not become ready; last log lines:"; tail -20 "$dir/kube-apiserver.log" >&2; stop_plane; exit 1; }

  # resourcequota: without it no quota gets a status and none is enforced at admission
  # (count/desktops.deskvirt.io; see README "per-namespace limits").
  setsid "$bin/kube-controller-manager" --kubeconfig="$kubeconfig" \
    --controllers=garbagecollector,namespace,serviceaccount,serviceaccount-token,resourcequota \
    --service-account-private-key-file="$dir/pki/sa.key" --root-ca-file="$dir/pki/ca.crt" \
    --leader-elect=false --bind-address=127.0.0.1 --secure-port="$kcm_port" --port=0 --v=1 \
    >"$dir/kube-controller-manager.log" 2>&1 < /dev/null 8>&- &
  echo $! > "$dir/kube-controller-manager.pid"
  log "started in $((SECONDS - t0))s: apiserver https://127.0.0.1:$api_port, state in $dir"
  echo "$kubeconfig"
}

case "${1:-}" in
  start)
    if external; then log "using the existing cluster of KUBECONFIG=$KUBECONFIG"; echo "$KUBECONFIG"; exit 0; fi
    start_plane ;;
  status)
    if external; then kubectl version >/dev/null 2>&1 && { echo "external cluster ($KUBECONFIG) reachable"; exit 0; }; exit 1; fi
    if healthy; then . "$dir/ports.env"; echo "healthy: apiserver https://127.0.0.1:$APISERVER_PORT, etcd :$ETCD_PORT, kubeconfig $kubeconfig"; exit 0; fi
    echo "not running"; exit 1 ;;
  stop)
    if external; then log "KUBECONFIG points at an external cluster; nothing to stop"; exit 0; fi
    [ -d "$dir" ] || exit 0
    exec 8>"$dir/.lock"; flock 8
    stop_plane; rm -rf "$dir/etcd"; log "stopped" ;;
  env)
    if external; then echo "export KUBECONFIG=$KUBECONFIG"; else echo "export KUBECONFIG=$kubeconfig"; fi ;;
  *) echo "usage: $0 start|status|stop|env" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Starts, checks or stops a local libvirtd (qemu:///system) on a machine without systemd.
#
#   scripts/libvirt.sh start    idempotent: users/groups, directories, qemu.conf, virtlogd,
#                               libvirtd, then waits until `virsh -c qemu:///system version`
#                               answers (LIBVIRT_START_TIMEOUT seconds, default 60)
#   scripts/libvirt.sh status   prints what runs; exit 0 when libvirt answers
#   scripts/libvirt.sh stop     stops libvirtd/virtlogd only if this script started them;
#                               never destroys domains (they survive a libvirtd restart)
#
# The packages come from scripts/install-deps.sh; see shared/LOCAL-LIBVIRT.md for the facts.
set -euo pipefail
. "$(dirname "$0")/lib/pids.sh"

URI=qemu:///system
STATE_DIR=/run/deskvirt
LIBVIRTD_PID=$STATE_DIR/libvirtd.pid
VIRTLOGD_PID=$STATE_DIR/virtlogd.pid
QEMU_CONF=/etc/libvirt/qemu.conf
TIMEOUT=${LIBVIRT_START_TIMEOUT:-60}

log() { echo "[libvirt] $*" >&2; }
die() { echo "[libvirt] error: $*" >&2; exit 1; }

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

require_binaries() {
  local missing=()
  for b in libvirtd virtlogd virsh qemu-system-x86_64 qemu-img; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing+=("$b")
  done
  [ ${#missing[@]} -eq 0 ] || die "missing ${missing[*]}; run scripts/install-deps.sh first"
}

running() { pgrep -x "$1" >/dev/null 2>&1; }

answers() { timeout 10 virsh -c "$URI" version >/dev/null 2>&1; }

ensure_accounts() {
  for g in kvm libvirt libvirt-qemu; do
    getent group "$g" >/dev/null || sudo_ groupadd --system "$g"
  done
  if ! getent passwd libvirt-qemu >/dev/null; then
    sudo_ useradd --system --no-create-home --home-dir /var/lib/libvirt \
      --shell /usr/sbin/nologin --gid libvirt-qemu --groups kvm libvirt-qemu
  fi
}

ensure_dirs() {
  sudo_ mkdir -p /var/log/libvirt/qemu /var/lib/libvirt/qemu /var/lib/libvirt/images \
    /var/cache/libvirt/qemu /run/libvirt "$STATE_DIR" /etc/libvirt
}

# qemu.conf with our four settings; every other line of an existing file is kept.
ensure_qemu_conf() {
  local current="" wanted
  [ -f "$QEMU_CONF" ] && current=$(cat "$QEMU_CONF")
  wanted=$(
    printf '%s\n' "$current" |
      grep -Ev '^[[:space:]]*(user|group|security_driver|spice_listen)[[:space:]]*=' |
      grep -v '^# deskvirt: settings for a local qemu:///system' || true
    echo '# deskvirt: settings for a local qemu:///system (scripts/libvirt.sh)'
    echo 'user = "root"'
    echo 'group = "root"'
    echo 'security_driver = "none"'
    echo 'spice_listen = "127.0.0.1"'
  )
  wanted=$(printf '%s\n' "$wanted" | sed '/./,$!d')  # no leading blank lines
  if [ "$current" != "$wanted" ]; then
    log "writing $QEMU_CONF"
    printf '%s\n' "$wanted" | sudo_ tee "$QEMU_CONF.deskvirt-new" >/dev/null
    sudo_ mv "$QEMU_CONF.deskvirt-new" "$QEMU_CONF"
    if running libvirtd; then
      log "note: libvirtd already runs; qemu.conf changes apply after its restart"
    fi
  fi
}

start() {
  require_binaries
  ensure_accounts
  ensure_dirs
  ensure_qemu_conf
  if ! running virtlogd; then
    log "starting virtlogd"
    sudo_ virtlogd -d -p "$VIRTLOGD_PID"
  fi
  if ! running libvirtd; then
    log "starting libvirtd"
    sudo_ libvirtd -d -p "$LIBVIRTD_PID"
  fi
  local deadline=$((SECONDS + TIMEOUT))
  until answers; do
    if [ $SECONDS -ge $deadline ]; then
      running libvirtd || die "libvirtd is not running (see /var/log/libvirt, or run 'libvirtd -v' in a terminal)"
      die "libvirtd runs but 'virsh -c $URI version' did not answer within ${TIMEOUT}s"
    fi
    if ! running libvirtd; then
      die "libvirtd exited at start (try 'libvirtd -v' to see why)"
    fi
    sleep 0.2
  done
  log "ready: $(virsh -c "$URI" version 2>/dev/null | grep -i 'running hypervisor' || echo "$URI")"
}

status() {
  local rc=0
  for d in virtlogd libvirtd; do
    local pid ours=""
    pid=$(pgrep -x "$d" | head -1 || true)
    if live_pid "$STATE_DIR/$d.pid" "$d" >/dev/null; then ours=" (started by this script)"; fi
    if [ -n "$pid" ]; then echo "$d: running, pid $pid$ours"; else echo "$d: not running"; rc=1; fi
  done
  if answers; then
    echo "$URI: answers"
    virsh -c "$URI" list --all --name 2>/dev/null | sed '/^$/d; s/^/  domain: /' || true
  else
    echo "$URI: does not answer"
    rc=1
  fi
  return $rc
}

stop_one() {
  local name=$1 file=$2 pid
  if pid=$(live_pid "$file" "$name"); then
    log "stopping $name (pid $pid)"
    sudo_ kill -TERM "$pid"
    for _ in $(seq 1 50); do
      [ -d "/proc/$pid" ] || break
      sleep 0.1
    done
    [ -d "/proc/$pid" ] && log "warning: $name (pid $pid) still runs"
    sudo_ rm -f "$file"
  elif running "$name"; then
    log "$name runs but was not started by this script; leaving it"
  fi
  return 0
}

stop() {
  # Domains are never destroyed: QEMU processes outlive libvirtd and are re-adopted at its start.
  stop_one libvirtd "$LIBVIRTD_PID"
  stop_one virtlogd "$VIRTLOGD_PID"
}

case "${1:-}" in
  start) start ;;
  status) status ;;
  stop) stop ;;
  # Restarts libvirtd only; running domains keep running and are re-adopted.
  restart) stop_one libvirtd "$LIBVIRTD_PID"; start ;;
  *) echo "usage: $0 start|status|stop|restart" >&2; exit 2 ;;
esac

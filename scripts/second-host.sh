#!/usr/bin/env bash
# Starts, checks or stops a second, independent libvirt "host" on this machine, for tests that
# need two hypervisors (host A = the machine's own qemu:///system from scripts/libvirt.sh,
# host B = this one).
#
#   scripts/second-host.sh start NAME DIR   idempotent: network namespace NAME, a private mount
#                                           namespace in which DIR's subdirectories replace
#                                           libvirt's directories, virtlogd and libvirtd in it;
#                                           waits until host B answers (SECOND_HOST_START_TIMEOUT
#                                           seconds, default 60); the URI is the last stdout line
#   scripts/second-host.sh status NAME DIR  prints what runs; exit 0 when host B answers
#   scripts/second-host.sh stop NAME DIR    destroys and undefines host B's domains and networks,
#                                           stops its daemons and leftover processes, deletes
#                                           the namespace and DIR; idempotent
#
# NAME: 1-13 characters [A-Za-z0-9_.-] (netns name; the host end of the veth is NAME-h).
# DIR: an absolute path outside libvirt's own directories, e.g. /tmp/deskvirt-host-b.1234.
#
# Host B's view of the filesystem is the machine's, except for these bind mounts:
#   /etc/libvirt       <- DIR/etc    (*.conf and nwfilter/ copied from host A: no domains, no
#                                     networks; qemu.conf forced to root, no security driver,
#                                     spice_listen 127.0.0.1)
#   /run/libvirt       <- DIR/run    (sockets: client URI qemu+unix:///system?socket=DIR/run/libvirt-sock)
#   /var/lib/libvirt   <- DIR/lib    (managed saves: DIR/lib/qemu/save)
#   /var/cache/libvirt <- DIR/cache  (seeded with host A's QEMU capability cache)
#   /var/log/libvirt   <- DIR/log    (libvirtd.log; QEMU and serial logs in DIR/log/qemu)
# Paths elsewhere (e.g. disk images under /tmp) mean the same file on both hosts, except the
# absolute directories named in SECOND_HOST_PRIVATE (space-separated): each is replaced in host
# B by its own empty directory, DIR/private/<n> (n = its place in the list, from 0), so that a
# pool's diskDir can be local storage that the two hosts do not share.
#
# Its network stack is the namespace's: bridges, dnsmasq, iptables rules and SPICE ports cannot
# collide with host A's. A veth pair links it to this machine: B's eth0 has
# ${SECOND_HOST_NET:-10.213}.N.2/30 and NAME-h here has .N.1 (N allocated under a lock), so a
# SPICE port host B opens on that address (or 0.0.0.0) is reachable from here; the address is
# in DIR/address. 127.0.0.1 inside B is not this machine's loopback.
#
# The daemons run as DIR/bin/dvb-libvirtd and DIR/bin/dvb-virtlogd (symlinks), so that
# `pgrep -x libvirtd` keeps meaning host A. libvirtd B sees no cgroup hierarchy (`ip netns exec`
# mounts a fresh /sys): its domains get no cgroups (no `virsh cpu-stats`; dominfo and domstats
# cpu times work), and cannot collide with host A's machine cgroups.
#
# See shared/LOCAL-LIBVIRT.md; scripts/libvirt.sh must have set the machine up once (accounts).
set -euo pipefail
. "$(dirname "$0")/lib/pids.sh"

TIMEOUT=${SECOND_HOST_START_TIMEOUT:-60}
PRIVATE=${SECOND_HOST_PRIVATE:-}
for p in $PRIVATE; do
  case "$p" in /?*) ;; *) echo "[second-host] error: SECOND_HOST_PRIVATE: $p is not an absolute path" >&2; exit 2 ;; esac
done
NET_PREFIX=${SECOND_HOST_NET:-10.213}
LOCK=/run/lock/deskvirt-second-host.lock
MARKER=.deskvirt-second-host
LIBVIRTD_COMM=dvb-libvirtd
VIRTLOGD_COMM=dvb-virtlogd

log() { echo "[second-host${NAME:+ $NAME}] $*" >&2; }
die() { echo "[second-host${NAME:+ $NAME}] error: $*" >&2; exit 1; }

usage() { echo "usage: $0 start|status|stop NAME DIR" >&2; exit 2; }

[ $# -eq 3 ] || usage
CMD=$1 NAME=$2 DIR=$3
case "$CMD" in start | status | stop) ;; *) usage ;; esac
if [ "$(id -u)" != 0 ]; then exec sudo -- env SECOND_HOST_PRIVATE="${SECOND_HOST_PRIVATE:-}" SECOND_HOST_START_TIMEOUT="$TIMEOUT" "$0" "$@"; fi

[[ "$NAME" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,12}$ ]] || die "NAME must be 1-13 characters [A-Za-z0-9_.-]"
[[ "$DIR" == /* ]] || die "DIR must be an absolute path"
DIR=$(realpath -m -- "$DIR")
[ "$DIR" != / ] || die "DIR must not be /"
case "$DIR/" in
  /etc/* | /run/libvirt/* | /var/run/libvirt/* | /var/lib/libvirt/* | /var/cache/libvirt/* | /var/log/libvirt/*)
    die "DIR $DIR must not lie under /etc or libvirt's own directories" ;;
esac
[ "${#DIR}" -le 80 ] || die "DIR is too long for a unix socket path (${#DIR} > 80 characters)"

URI="qemu+unix:///system?socket=$DIR/run/libvirt-sock"
HOST_IF="$NAME-h"

answers() { timeout 10 virsh -c "$URI" version >/dev/null 2>&1; }
vb() { timeout 60 virsh -q -c "$URI" "$@"; }

netns_exists() { [ -e "/run/netns/$NAME" ]; }
netns_id() { stat -L -c %i "/run/netns/$NAME" 2>/dev/null; }
netns_pids() { ip netns pids "$NAME" 2>/dev/null || true; }

# True when netns NAME is the one this DIR created.
netns_ours() {
  netns_exists && [ -s "$DIR/netns-id" ] && [ "$(cat "$DIR/netns-id")" = "$(netns_id)" ]
}

# qemu.conf of host A with the settings that make QEMU run here (as scripts/libvirt.sh writes).
write_qemu_conf() {
  {
    if [ -f /etc/libvirt/qemu.conf ]; then
      grep -Ev '^[[:space:]]*(user|group|security_driver|spice_listen)[[:space:]]*=' /etc/libvirt/qemu.conf || true
    fi
    echo '# deskvirt: second host (scripts/second-host.sh)'
    echo 'user = "root"'
    echo 'group = "root"'
    echo 'security_driver = "none"'
    echo 'spice_listen = "127.0.0.1"'
  } >"$DIR/etc/qemu.conf"
}

prepare_dir() {
  if [ -e "$DIR" ] && [ ! -f "$DIR/$MARKER" ]; then
    [ -d "$DIR" ] && [ -z "$(ls -A "$DIR")" ] || die "$DIR exists and is not a second host's directory"
  fi
  mkdir -p "$DIR"/{etc,run,lib/qemu/save,lib/images,lib/dnsmasq,cache/qemu,log/qemu,bin}
  if [ ! -f "$DIR/$MARKER" ]; then
    local f
    for f in /etc/libvirt/*.conf; do
      [ -f "$f" ] && cp -a "$f" "$DIR/etc/"
    done
    [ -d /etc/libvirt/nwfilter ] && cp -a /etc/libvirt/nwfilter "$DIR/etc/"
    write_qemu_conf
    # QEMU's capabilities: libvirt checks each file against the binaries and the kernel and
    # probes again when they changed; a valid copy saves the probe (about 8 s).
    if [ -d /var/cache/libvirt/qemu/capabilities ]; then
      cp -a /var/cache/libvirt/qemu/capabilities "$DIR/cache/qemu/"
    fi
    ln -sfn /usr/sbin/libvirtd "$DIR/bin/$LIBVIRTD_COMM"
    ln -sfn /usr/sbin/virtlogd "$DIR/bin/$VIRTLOGD_COMM"
    echo "$NAME" >"$DIR/$MARKER"
  fi
}

# The veth pair; allocates NET_PREFIX.N.0/30 under a lock.
setup_link() {
  local n used addr
  mkdir -p "$(dirname "$LOCK")"
  exec 9>"$LOCK"
  flock -w 30 9 || die "cannot lock $LOCK"
  used=$( (ip -4 -o addr show; ip -4 route show table all) 2>/dev/null || true)
  for n in $(seq 1 254); do
    if ! grep -qE "(^|[^0-9.])${NET_PREFIX//./\\.}\\.$n\\." <<<"$used"; then
      addr=$NET_PREFIX.$n
      break
    fi
  done
  [ -n "${addr:-}" ] || { exec 9>&-; die "no free $NET_PREFIX.N.0/30 for the veth pair"; }
  ip link del "$HOST_IF" >/dev/null 2>&1 || true
  ip link add "$HOST_IF" type veth peer name eth0 netns "$NAME"
  ip addr add "$addr.1/30" dev "$HOST_IF"
  ip link set "$HOST_IF" up
  exec 9>&-
  ip -n "$NAME" addr add "$addr.2/30" dev eth0
  ip -n "$NAME" link set eth0 up
  echo "$addr.2" >"$DIR/address"
}

# Fails when netns NAME belongs to another second host that still runs.
check_netns_free() {
  if netns_exists && ! netns_ours && [ -n "$(netns_pids)" ]; then
    die "network namespace $NAME is in use by another second host (pids $(netns_pids | tr '\n' ' ')); stop it with its own DIR"
  fi
}

ensure_netns() {
  check_netns_free
  if netns_exists && ! netns_ours; then
    log "deleting stale network namespace $NAME"
    ip netns del "$NAME"
  fi
  if ! netns_exists; then
    log "creating network namespace $NAME"
    ip netns add "$NAME"
    netns_id >"$DIR/netns-id"
    rm -f "$DIR/address"
  fi
  ip -n "$NAME" link set lo up
  if [ ! -s "$DIR/address" ] || ! ip -n "$NAME" link show eth0 >/dev/null 2>&1; then
    setup_link
  fi
}

start_daemons() {
  local need_logd=1 need_libvirtd=1
  live_pid "$DIR/virtlogd.pid" "$VIRTLOGD_COMM" >/dev/null && need_logd=0
  live_pid "$DIR/libvirtd.pid" "$LIBVIRTD_COMM" >/dev/null && need_libvirtd=0
  [ $need_logd = 1 ] || [ $need_libvirtd = 1 ] || return 0
  log "starting$([ $need_logd = 1 ] && echo " virtlogd")$([ $need_libvirtd = 1 ] && echo " libvirtd") in $NAME"
  # `ip netns exec` gives a mount namespace with the netns's /sys; `unshare -m` a private one
  # for the bind mounts. The daemons keep both namespaces alive after sh exits.
  ip netns exec "$NAME" unshare -m --propagation private sh -euc '
    dir=$1
    mkdir -p /etc/libvirt /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt
    mount --bind "$dir/etc" /etc/libvirt
    mount --bind "$dir/run" /run/libvirt
    mount --bind "$dir/lib" /var/lib/libvirt
    mount --bind "$dir/cache" /var/cache/libvirt
    mount --bind "$dir/log" /var/log/libvirt
    n=0
    for p in $6; do
      mkdir -p "$p" "$dir/private/$n"
      mount --bind "$dir/private/$n" "$p"
      n=$((n + 1))
    done
    if [ "$2" = 1 ]; then "$dir/bin/$4" -d -p "$dir/virtlogd.pid"; fi
    if [ "$3" = 1 ]; then "$dir/bin/$5" -d -p "$dir/libvirtd.pid"; fi
  ' sh "$DIR" "$need_logd" "$need_libvirtd" "$VIRTLOGD_COMM" "$LIBVIRTD_COMM" "$PRIVATE" ||
    die "could not start the daemons in $NAME (log: $DIR/log/libvirtd.log)"
}

start() {
  for b in libvirtd virtlogd virsh ip unshare flock; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || die "missing $b; run scripts/install-deps.sh first"
  done
  getent passwd libvirt-qemu >/dev/null || die "user libvirt-qemu is missing; run scripts/libvirt.sh start first"
  check_netns_free
  prepare_dir
  ensure_netns
  start_daemons
  local deadline=$((SECONDS + TIMEOUT))
  until answers; do
    if ! live_pid "$DIR/libvirtd.pid" "$LIBVIRTD_COMM" >/dev/null; then
      tail -n 20 "$DIR/log/libvirtd.log" >&2 2>/dev/null || true
      die "libvirtd exited at start (log: $DIR/log/libvirtd.log)"
    fi
    if [ $SECONDS -ge $deadline ]; then
      die "libvirtd runs but 'virsh -c $URI version' did not answer within ${TIMEOUT}s (log: $DIR/log/libvirtd.log)"
    fi
    sleep 0.1
  done
  log "ready: address $(cat "$DIR/address" 2>/dev/null || echo '?'), managed saves in $DIR/lib/qemu/save"
  echo "$URI"
}

status() {
  local rc=0 d pid
  if netns_exists; then
    echo "netns $NAME: exists$(netns_ours && echo " (this DIR's)"), pids: $(netns_pids | tr '\n' ' ')"
  else
    echo "netns $NAME: absent"; rc=1
  fi
  for d in virtlogd libvirtd; do
    local comm=$VIRTLOGD_COMM
    [ $d = libvirtd ] && comm=$LIBVIRTD_COMM
    if pid=$(live_pid "$DIR/$d.pid" "$comm"); then echo "$d: running, pid $pid"; else echo "$d: not running"; rc=1; fi
  done
  [ -s "$DIR/address" ] && echo "address: $(cat "$DIR/address")"
  if answers; then
    echo "$URI: answers"
    vb list --all --name 2>/dev/null | sed '/^$/d; s/^/  domain: /' || true
    vb net-list --all --name 2>/dev/null | sed '/^$/d; s/^/  network: /' || true
  else
    echo "$URI: does not answer"; rc=1
  fi
  return $rc
}

# Sends TERM to the pids given, waits up to 10 s, then KILLs what is left.
# Whether none of the pids given is alive.
all_gone() {
  local pid
  for pid in "$@"; do alive "$pid" && return 1; done
  return 0
}

# Waits up to $1 tenths of a second for the remaining pids to exit.
wait_gone() {
  local tenths=$1
  shift
  for _ in $(seq 1 "$tenths"); do
    all_gone "$@" && return 0
    sleep 0.1
  done
  return 1
}

terminate() {
  local pid
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null || true
  wait_gone 100 "$@" && return 0
  for pid in "$@"; do
    if alive "$pid"; then log "pid $pid ignored TERM; killing it"; kill -KILL "$pid" 2>/dev/null || true; fi
  done
  wait_gone 50 "$@" && return 0
  log "warning: still running: $*"
}

stop() {
  local pid d ns_ok=1
  # netns NAME is this DIR's when DIR recorded it; without a record (DIR lost) it is taken as a
  # leftover unless a second host's libvirtd runs in it.
  if netns_exists && ! netns_ours; then
    if [ -s "$DIR/netns-id" ]; then
      log "network namespace $NAME is not this DIR's; leaving it"
      ns_ok=0
    else
      for pid in $(netns_pids); do
        if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$LIBVIRTD_COMM" ]; then
          log "network namespace $NAME runs another second host's libvirtd (pid $pid); leaving it"
          ns_ok=0
          break
        fi
      done
    fi
  fi
  if [ -S "$DIR/run/libvirt-sock" ] && answers; then
    while read -r d; do
      [ -n "$d" ] || continue
      log "destroying domain $d"
      vb destroy "$d" >/dev/null 2>&1 || true
      vb undefine "$d" --managed-save --snapshots-metadata --checkpoints-metadata --nvram >/dev/null 2>&1 ||
        vb undefine "$d" --managed-save >/dev/null 2>&1 || vb undefine "$d" >/dev/null 2>&1 || true
    done < <(vb list --all --name 2>/dev/null || true)
    while read -r d; do
      [ -n "$d" ] || continue
      log "destroying network $d"
      vb net-destroy "$d" >/dev/null 2>&1 || true
      vb net-undefine "$d" >/dev/null 2>&1 || true
    done < <(vb net-list --all --name 2>/dev/null || true)
  fi
  if pid=$(live_pid "$DIR/libvirtd.pid" "$LIBVIRTD_COMM"); then log "stopping libvirtd (pid $pid)"; terminate "$pid"; fi
  if pid=$(live_pid "$DIR/virtlogd.pid" "$VIRTLOGD_COMM"); then log "stopping virtlogd (pid $pid)"; terminate "$pid"; fi
  if [ $ns_ok = 1 ] && netns_exists; then
    local -a left
    mapfile -t left < <(netns_pids)
    if [ ${#left[@]} -gt 0 ]; then
      log "stopping leftover processes in $NAME: $(ps -o pid=,comm= -p "$(IFS=,; echo "${left[*]}")" 2>/dev/null | tr -s ' \n' ' ')"
      terminate "${left[@]}"
    fi
    log "deleting network namespace $NAME"
    ip netns del "$NAME" || log "warning: cannot delete network namespace $NAME"
  fi
  if [ -d "$DIR" ]; then
    if [ -f "$DIR/$MARKER" ] || [ -z "$(ls -A "$DIR")" ]; then
      rm -rf -- "$DIR"
    else
      log "warning: $DIR is not a second host's directory; not removing it"
    fi
  fi
  return 0
}

case "$CMD" in
  start) start ;;
  status) status ;;
  stop) stop ;;
  *) usage ;;
esac

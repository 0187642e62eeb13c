# Process helpers shared by scripts/libvirt.sh and scripts/second-host.sh (sourced, not run).

# Whether process $1 exists and is not a zombie.
alive() {
  local state
  state=$(awk '/^State:/ {print $2}' "/proc/$1/status" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

# The pid in file $1 when that process is alive (not a zombie) and named $2.
live_pid() {
  local file=$1 name=$2 pid
  [ -s "$file" ] || return 1
  pid=$(cat "$file")
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || return 1
  alive "$pid" || return 1
  echo "$pid"
}

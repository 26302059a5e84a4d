# Shared settings of the sandbox scripts. Source it; do not run it.
# shellcheck shell=bash

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Whether every directory from / down to $1 can be traversed by others.
traversable() {
  local d; d=$(readlink -f "$1")
  while :; do
    case $(stat -c %A "$d") in *x|*t) ;; *) return 1 ;; esac
    [ "$d" = / ] && return 0
    d=$(dirname "$d")
  done
}

# All sandbox state lives in one git-ignored directory, .sandbox/. The test
# user must reach it (venv, plugin, binaries, its home, the munge socket);
# when the checkout sits under a private directory (a mktemp -d clone, say),
# .sandbox is a symlink to a directory under /var/tmp instead.
if [ -z "${DASK_SPANK_SANDBOX:-}" ] && [ ! -e "$REPO/.sandbox" ] && ! traversable "$REPO"; then
  ext=/var/tmp/dask-spank-sandbox-$(printf %s "$REPO" | sha256sum | cut -c1-12)
  mkdir -p "$ext" && chmod 755 "$ext" && ln -s "$ext" "$REPO/.sandbox"
fi
mkdir -p "${DASK_SPANK_SANDBOX:-$REPO/.sandbox}"
STATE=$(readlink -f "${DASK_SPANK_SANDBOX:-$REPO/.sandbox}")
TEST_USER=${DASK_SPANK_TEST_USER:-dasktest}
# Ports: slurmctld listens on PORT_BASE, slurmd of node nI on PORT_BASE+3+I
# (6817 and 6821.. by default). Two sandboxes on one machine need different
# bases, and different test users (each sandbox re-homes its test user into
# its own state directory).
PORT_BASE=${DASK_SPANK_PORT_BASE:-6817}
[[ "$PORT_BASE" =~ ^[1-9][0-9]{2,4}$ ]] && [ "$PORT_BASE" -le 65000 ] \
  || { echo "DASK_SPANK_PORT_BASE=$PORT_BASE: want a port number up to 65000" >&2; exit 2; }
NODE=${DASK_SPANK_NODE:-n1}
VENV=$STATE/venv
# Binaries are installed from target/release into the sandbox, like a package would.
BIN=$STATE/bin
export SLURM_CONF=$STATE/etc/slurm.conf
export PATH=$BIN:$PATH

log() { printf '%s [%s] %s\n' "$(date +%H:%M:%S)" "${0##*/}" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Run a command as the unprivileged test user, with the sandbox environment.
as_user() {
  runuser -u "$TEST_USER" -- env -C "$STATE/work" \
    HOME="$STATE/home/$TEST_USER" USER="$TEST_USER" LOGNAME="$TEST_USER" \
    SLURM_CONF="$SLURM_CONF" PATH="$VENV/bin:$BIN:/usr/local/bin:/usr/bin:/bin" \
    "$@"
}

# Wait until a command succeeds: wait_for SECONDS DESCRIPTION CMD...
wait_for() {
  local secs=$1 what=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || { log "timed out after ${secs}s waiting for $what"; return 1; }
    sleep 0.2
  done
}

# Whether the process in pid file $1 runs. A zombie does not count: a daemon
# killed while re-parented to a PID 1 that does not reap stays a zombie.
running() {
  local pid
  [ -f "$1" ] && pid=$(cat "$1") && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  case $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) in Z|X|"") return 1 ;; esac
}

# Stop a process we started, by the PID in its pid file: TERM, then KILL.
stop_pidfile() {
  local f=$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if running "$f"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do running "$f" || break; sleep 0.1; done
    if running "$f"; then
      log "pid $pid ($f) ignored SIGTERM for 10s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$f"
}


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

# The Slurm release: `--slurm V` on any script's command line (taken out of
# its arguments here) or DASK_SPANK_SLURM=V. 22.05 is the host's own
# (Debian bookworm); the others run from a Debian root (see root.sh).
HOST_SLURM=22.05
args_=()
while [ $# -gt 0 ]; do
  case $1 in
    --slurm) [ $# -ge 2 ] || { echo "--slurm wants a release (22.05, 24.11, 26.05)" >&2; exit 2; }
             DASK_SPANK_SLURM=$2; shift 2 ;;
    --slurm=*) DASK_SPANK_SLURM=${1#--slurm=}; shift ;;
    *) args_+=("$1"); shift ;;
  esac
done
set -- ${args_[@]+"${args_[@]}"}
unset args_
SLURM_RELEASE=${DASK_SPANK_SLURM:-$HOST_SLURM}
case $SLURM_RELEASE in
  22.05) SUITE=bookworm ;;
  24.11) SUITE=trixie ;;
  26.05) SUITE=sid ;;
  *) echo "unsupported Slurm release '$SLURM_RELEASE' (supported: 22.05, 24.11, 26.05)" >&2; exit 2 ;;
esac
export DASK_SPANK_SLURM=$SLURM_RELEASE
# Inside a release's root, /etc/dask-spank-root names its release.
IN_ROOT=$(cat /etc/dask-spank-root 2>/dev/null || true)
if [ -n "$IN_ROOT" ] && [ "$IN_ROOT" != "$SLURM_RELEASE" ]; then
  echo "this is the root of Slurm $IN_ROOT, not $SLURM_RELEASE" >&2; exit 2
fi
# Roots are cached under the top sandbox directory, one per Debian suite.
ROOTS=$REPO/.sandbox/roots
ROOT=$ROOTS/$SUITE
# One state directory per release: .sandbox for the host's release,
# .sandbox/slurm-V for the others.
if [ "$SLURM_RELEASE" = "$HOST_SLURM" ]; then default_state=$REPO/.sandbox
else default_state=$REPO/.sandbox/slurm-$SLURM_RELEASE; fi
mkdir -p "${DASK_SPANK_SANDBOX:-$default_state}"
STATE=$(readlink -f "${DASK_SPANK_SANDBOX:-$default_state}")
export DASK_SPANK_SANDBOX=$STATE
# Build products per release: the host's release in target/, the others in
# target/slurm-V/ (the plugin is built against each release's headers).
if [ "$SLURM_RELEASE" = "$HOST_SLURM" ]; then TARGET=$REPO/target
else TARGET=$REPO/target/slurm-$SLURM_RELEASE; fi
TEST_USER=${DASK_SPANK_TEST_USER:-dasktest}
# Ports: slurmctld of Slurm 22.05 listens on PORT_BASE, slurmd of node nI on
# PORT_BASE+3+I (6817 and 6821.. by default), the node agent's metrics (HTTP)
# on PORT_BASE+100+I; 24.11 and 26.05 add 200 and 400,
# so that the sandboxes of the releases never collide. Two checkouts on one
# machine need different bases, and different test users (each sandbox
# re-homes its test user into its own state directory).
PORT_BASE=${DASK_SPANK_PORT_BASE:-6817}
[[ "$PORT_BASE" =~ ^[1-9][0-9]{2,4}$ ]] && [ "$PORT_BASE" -le 65000 ] \
  || { echo "DASK_SPANK_PORT_BASE=$PORT_BASE: want a port number up to 65000" >&2; exit 2; }
case $SLURM_RELEASE in 22.05) CTLD_PORT=$PORT_BASE ;; 24.11) CTLD_PORT=$((PORT_BASE + 200)) ;; *) CTLD_PORT=$((PORT_BASE + 400)) ;; esac
NODE=${DASK_SPANK_NODE:-n1}
VENV=$STATE/venv
# Binaries are installed from target/release into the sandbox, like a package would.
BIN=$STATE/bin
export SLURM_CONF=$STATE/etc/slurm.conf
export PATH=$BIN:$PATH

log() { printf '%s [%s] %s\n' "$(date +%H:%M:%S)" "${0##*/}" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# The build environment of this release: its own target directory, and the
# 22.05 compat declaration for bindgen (.cargo/config.toml) on 22.05 only.
cargo_env() {
  export CARGO_TARGET_DIR=$TARGET
  if [ "$SLURM_RELEASE" != 22.05 ]; then export BINDGEN_EXTRA_CLANG_ARGS=""; fi
}

# Whether this release runs in a Debian root that we are not inside yet.
needs_root() { [ "$SLURM_RELEASE" != "$HOST_SLURM" ] && [ -z "$IN_ROOT" ]; }

# Re-execute the calling script inside the release's root when it needs
# one (making the root on first use): reexec_in_root "$0" "$@".
reexec_in_root() {
  needs_root || return 0
  . "$REPO/scripts/root.sh"
  ensure_root
  local self; self=$(readlink -f "$1"); shift
  exec_in_root "$self" "$@"
}

# The layout above, for Python (scripts/sandbox.py reads it: each rule is
# stated here only).
sandbox_layout() {
  printf '%s=%s\n' SLURM_RELEASE "$SLURM_RELEASE" HOST_SLURM "$HOST_SLURM" STATE "$STATE" TARGET "$TARGET" \
    TEST_USER "$TEST_USER" CTLD_PORT "$CTLD_PORT" VENV "$VENV" BIN "$BIN" IN_ROOT "$IN_ROOT"
}

# Debian roots for the Slurm releases that are not the host's: trixie has
# Slurm 24.11, sid has Slurm 26.05. Sourced by lib.sh's reexec_in_root; do
# not run it.
#
# A root is made on first use with mmdebstrap and cached in
# .sandbox/roots/<suite>. Commands run in it by chroot, in a private mount
# namespace of their own (unshare --mount), with /proc, /dev and /sys, the
# repository, the sandbox state and the Rust toolchain bind-mounted at the
# same paths: nothing is ever mounted in the host's namespace, so removing a
# root or the state never reaches through a mount. Same network and PID
# namespaces as the host: daemons are stopped by their PIDs from anywhere.
# shellcheck shell=bash

# What a root holds: Slurm and munge, Python for the venv, the build tools
# for the plugin (clang for bindgen, gcc as the linker; cargo and rustc come
# from the host's toolchain), rpm for the package (with debugedit, elfutils
# and file: find-debuginfo, its eu-strip and file, for the debuginfo
# package), and what the tests use (slurmdbd and MariaDB for the
# queue-limit test: `sandbox up --accounting on`; fuse3 for the
# user-mounted FUSE filesystem of tests/hangfs.py; chromium for
# the JupyterLab test, tests/test_labextension.py, with its setuid sandbox:
# a process in a chroot may not make the user namespace that chromium's
# own sandbox needs).
ROOT_PKGS=slurmctld,slurmd,slurm-client,munge,libslurm-dev,python3,python3-venv,clang,libclang-dev,gcc,libc6-dev,passwd,util-linux,procps,rpm,debugedit,elfutils,file,cpio,git,ca-certificates,systemd,valgrind,slurmdbd,mariadb-server,fuse3,chromium,chromium-sandbox
# sid's Release file may be past its Valid-Until date on the archive.
ROOT_APTOPT='Acquire::Check-Valid-Until "false"'

# The Slurm release of the headers under $1 (a root or /), as major.minor.
headers_release() {
  local hex
  hex=$(awk '/define SLURM_VERSION_NUMBER/ {print $3}' "$1/usr/include/slurm/slurm_version.h" 2>/dev/null)
  [ -n "$hex" ] || return 1
  printf '%d.%02d\n' $((hex >> 16 & 255)) $((hex >> 8 & 255))
}

ensure_root() {
  if [ -f "$ROOT/etc/dask-spank-root" ]; then
    add_missing_packages
    sync_users_into_root
    return 0
  fi
  [ "$(id -u)" = 0 ] || die "making the Debian root of Slurm $SLURM_RELEASE needs root"
  if ! command -v mmdebstrap >/dev/null; then
    log "apt: installing mmdebstrap"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
  fi
  log "making the Debian $SUITE root of Slurm $SLURM_RELEASE in $ROOT (first use only: about a minute)"
  mkdir -p "$ROOTS"
  chmod 755 "$ROOTS"
  # Never remove a directory something is mounted under (a failed
  # mmdebstrap could leave /proc or /dev there).
  if awk -v d="$ROOT.new/" '$5 ~ "^" d || $5"/" == d {f = 1} END {exit !f}' /proc/self/mountinfo; then
    die "something is still mounted under $ROOT.new: unmount it first"
  fi
  rm -rf "$ROOT.new"
  local t0=$SECONDS
  mmdebstrap --variant=apt --aptopt="$ROOT_APTOPT" --include="$ROOT_PKGS" "$SUITE" "$ROOT.new" \
    >"$ROOTS/$SUITE.log" 2>&1 || { tail -20 "$ROOTS/$SUITE.log" >&2; die "mmdebstrap $SUITE failed (log: $ROOTS/$SUITE.log)"; }
  local got; got=$(headers_release "$ROOT.new") || die "the $SUITE root has no Slurm headers"
  [ "$got" = "$SLURM_RELEASE" ] || die "Debian $SUITE now has Slurm $got, not $SLURM_RELEASE"
  printf '127.0.0.1 localhost %s\n::1 localhost ip6-localhost ip6-loopback\n' "$(hostname)" > "$ROOT.new/etc/hosts"
  # Nothing in a root starts services by itself.
  printf '#!/bin/sh\nexit 101\n' > "$ROOT.new/usr/sbin/policy-rc.d"
  chmod 755 "$ROOT.new/usr/sbin/policy-rc.d" "$ROOT.new"
  echo "$SLURM_RELEASE" > "$ROOT.new/etc/dask-spank-root"
  mv "$ROOT.new" "$ROOT"
  log "root of Slurm $SLURM_RELEASE made in $((SECONDS - t0))s"
  sync_users_into_root
}

# A root made before ROOT_PKGS grew gets what it lacks (apt in the root).
add_missing_packages() {
  local p missing=()
  for p in ${ROOT_PKGS//,/ }; do
    chroot "$ROOT" dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  [ "$(id -u)" = 0 ] || die "adding ${missing[*]} to the root of Slurm $SLURM_RELEASE needs root"
  log "apt in the $SUITE root: installing ${missing[*]}"
  run_in_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  run_in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >"$ROOTS/$SUITE-add.log" 2>&1 || { tail -20 "$ROOTS/$SUITE-add.log" >&2; die "apt in the $SUITE root failed (log: $ROOTS/$SUITE-add.log)"; }
}

# The test users exist on the host with the same uid and gid as in the
# root, so that a uid means one user everywhere on this machine (processes
# of the root are visible on the host).
sync_users_into_root() {
  local u line f
  for u in "$TEST_USER" "${TEST_USER}b"; do
    if ! id "$u" >/dev/null 2>&1; then
      useradd -M -d /nonexistent -s /bin/bash -U "$u"
    fi
    for f in passwd group; do
      line=$(getent "$f" "$u") || continue
      if ! grep -qxF "$line" "$ROOT/etc/$f"; then
        grep -v "^$u:" "$ROOT/etc/$f" > "$ROOT/etc/$f.new" || true
        echo "$line" >> "$ROOT/etc/$f.new"
        chmod 644 "$ROOT/etc/$f.new"
        mv "$ROOT/etc/$f.new" "$ROOT/etc/$f"
      fi
    done
  done
}

# Run a command in the root (as root), in a private mount namespace.
run_in_root() {
  # The host's name service and certificate authorities (PyPI through
  # whatever TLS setup the host has).
  cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
  if [ -f /etc/ssl/certs/ca-certificates.crt ] \
     && ! cmp -s /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"; then
    cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
  fi
  local binds=("$REPO" "$STATE")
  local cargo_home rustup_home cargo_bin
  cargo_home=$(readlink -f "${CARGO_HOME:-$HOME/.cargo}")
  rustup_home=$(readlink -f "${RUSTUP_HOME:-$HOME/.rustup}")
  cargo_bin=$(dirname "$(readlink -f "$(command -v cargo 2>/dev/null || echo "$cargo_home/bin/cargo")")")
  # A git worktree keeps its repository elsewhere: the build names the commit.
  local gitdir gitcommon
  gitdir=$(git -C "$REPO" rev-parse --absolute-git-dir 2>/dev/null || true)
  gitcommon=$(cd "$REPO" && readlink -f "$(git rev-parse --git-common-dir 2>/dev/null || echo .)")
  local d
  for d in "$cargo_home" "$rustup_home" "$cargo_bin" "$gitdir" "$gitcommon"; do
    [ -n "$d" ] || continue
    case $d in "$REPO"|"$REPO"/*) continue ;; esac
    [ -d "$d" ] && binds+=("$d")
  done
  unshare --mount --propagation private -- bash -euc '
    root=$1; n=$2; shift 2
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev"
    mount --rbind /sys "$root/sys"
    for d in "${@:1:$n}"; do
      mkdir -p "$root$d"
      mount --bind "$d" "$root$d"
    done
    shift "$n"
    exec chroot "$root" "$@"
  ' in-root "$ROOT" "${#binds[@]}" "${binds[@]}" \
    /usr/bin/env -C "$PWD" PATH="$cargo_bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    CARGO_HOME="$cargo_home" RUSTUP_HOME="$rustup_home" \
    DASK_SPANK_SLURM="$SLURM_RELEASE" DASK_SPANK_SANDBOX="$STATE" \
    "$@"
}

exec_in_root() {
  log "running in the Debian $SUITE root (Slurm $SLURM_RELEASE): ${*##*/}"
  run_in_root "$@"
  exit $?
}

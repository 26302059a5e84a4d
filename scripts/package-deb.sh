# The Debian packages of scripts/package --deb. Sourced by scripts/package
# once the source tree of the commit and its pruned vendored crates are in
# place; uses its variables (top, version, commit, slurm_version, SLURM_RELEASE).
# shellcheck shell=bash

# build_debs SRC OUT: build SRC offline, stage the files where Debian wants
# them (Debian's Slurm plugin directory /usr/lib/<multiarch>/slurm-wlm/,
# otherwise the RPM's layout), and pack them with dpkg-deb.
build_debs() {
  local src=$1 out=$2 ma arch debver=$version-1
  ma=$(gcc -print-multiarch) && [ -n "$ma" ] || die "gcc -print-multiarch gave nothing"
  arch=$(dpkg --print-architecture)
  local plugdir=/usr/lib/$ma/slurm-wlm
  # Crates from the vendor directory only (as the spec's %prep).
  printf '\n[source.crates-io]\nreplace-with = "vendored-sources"\n\n[source.vendored-sources]\ndirectory = "vendor"\n' \
    >> "$src/.cargo/config.toml"
  log "cargo build --release --offline --locked, no network, empty CARGO_HOME (Slurm $slurm_version)"
  mkdir -p "$top/cargo-home"
  local bindgen=(); [ "${slurm_version%.*.*}" = 22 ] || bindgen=(BINDGEN_EXTRA_CLANG_ARGS=)
  (cd "$src" && unshare --net -- env CARGO_HOME="$top/cargo-home" CARGO_TARGET_DIR="$src/target" "${bindgen[@]}" \
     CARGO_PROFILE_RELEASE_STRIP=symbols \
     RUSTFLAGS="--remap-path-prefix=$src=/usr/src/dask-spank-$version --remap-path-prefix=$top/cargo-home=/cargo" \
     cargo build --release --offline --locked --workspace) >"$top/deb-build.log" 2>&1 \
    || { tail -40 "$top/deb-build.log" >&2; die "cargo build failed (log above)"; }
  # cargo keeps its locks there; crates it would have fetched go to registry/.
  [ ! -e "$top/cargo-home/registry" ] && [ ! -e "$top/cargo-home/git" ] \
    || die "the build fetched crates into CARGO_HOME: $(ls "$top/cargo-home")"

  local r=$top/deb/dask-spank doc=/usr/share/doc/dask-spank rel=$src/target/release
  mkdir -p "$r/DEBIAN"
  install -D -m 0644 "$rel/libspank_dask.so" "$r$plugdir/spank_dask.so"
  install -D -m 0755 "$rel/dask-node-agent" "$r/usr/sbin/dask-node-agent"
  install -D -m 0755 "$rel/dask-spank" "$r/usr/bin/dask-spank"
  install -D -m 0644 "$src/packaging/dask-node-agent.service" "$r/usr/lib/systemd/system/dask-node-agent.service"
  install -D -m 0755 "$src/packaging/dask-spank-health" "$r/usr/libexec/dask-spank/health"
  mkdir -p "$r/etc/slurm/plugstack.conf.d" "$r$doc/examples"
  sed -e "s|@LIBDIR@/slurm/|$plugdir/|" -e 's|dask-spank.conf.rpmsave|dask-spank.conf.dpkg-bak|' \
    "$src/packaging/plugstack.conf.d/dask-spank.conf.in" > "$r/etc/slurm/plugstack.conf.d/dask-spank.conf"
  sed "s|/usr/lib64/slurm/|$plugdir/|" "$src/packaging/examples/cc-in2p3.conf" > "$r$doc/examples/cc-in2p3.conf"
  install -m 0644 "$src/README.md" "$src/docs/admin.md" "$src/docs/user.md" "$r$doc/"
  echo /etc/slurm/plugstack.conf.d/dask-spank.conf > "$r/DEBIAN/conffiles"
  install -m 0755 "$src/packaging/debian/postinst" "$src/packaging/debian/prerm" "$src/packaging/debian/postrm" "$r/DEBIAN/"
  # The licence of the binaries: dask-spank's and the bundled crates' (the
  # License expression scripts/vendor-prune.py wrote for the spec).
  local licence
  licence=$(awk '$2 == "bundled_license" {$1 = $2 = ""; sub(/^ +/, ""); print}' "$top/SOURCES/dask-spank-$version-bundled.inc")
  [ -n "$licence" ] || die "no bundled_license in the vendor-prune output"
  debian_docs "$r" dask-spank "$licence"

  # Depends: the package of each library the binaries need (as
  # dpkg-shlibdeps would): libslurmNN names the Slurm release through its
  # soname; libc6 at least the newest GLIBC_ symbol version they use.
  local deps=() lib path pkg glibc
  for lib in $(for b in "$rel/libspank_dask.so" "$rel/dask-node-agent" "$rel/dask-spank"; do
                 objdump -p "$b" | awk '$1 == "NEEDED" {print $2}'; done | sort -u); do
    pkg=""
    for path in "/usr/lib/$ma/$lib" "/lib/$ma/$lib"; do
      pkg=$(dpkg -S "$path" 2>/dev/null | head -1 | cut -d: -f1) && [ -n "$pkg" ] && break
    done
    [ -n "$pkg" ] || die "no installed package holds $lib"
    deps+=("$pkg")
  done
  # The plugin leaves libslurm's symbols to slurmd and slurmstepd, which
  # load it (no NEEDED entry): the libslurm of the headers names the release.
  local libslurm soname
  libslurm=$(readlink -f "$(clang -print-file-name=libslurm.so)")
  soname=$(objdump -p "$libslurm" | awk '$1 == "SONAME" {print $2}')
  [ -n "$soname" ] || die "no soname in $libslurm (libslurm-dev)"
  pkg=$(dpkg -S "$(dirname "$libslurm")/$soname" 2>/dev/null | head -1 | cut -d: -f1)
  [ -n "$pkg" ] || die "no installed package holds $soname"
  deps+=("$pkg")
  glibc=$(for b in "$rel"/libspank_dask.so "$rel/dask-node-agent" "$rel/dask-spank"; do
            objdump -T "$b" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//'; done | sort -uV | tail -1)
  local depends
  depends=$(printf '%s\n' "${deps[@]}" | sort -u | sed "s/^libc6\$/libc6 (>= $glibc)/" | paste -sd, - | sed 's/,/, /g')
  debian_control "$src/packaging/debian/control" "$r" "$depends"

  # python3-dask-spank: the package for the system Python (dist-packages).
  local p=$top/deb/python3-dask-spank site=/usr/lib/python3/dist-packages
  mkdir -p "$p/DEBIAN" "$p$site"
  cp -pr "$src/python/dask_spank" "$p$site/"
  rm -rf "$p$site/dask_spank/__pycache__"
  local distinfo=$p$site/dask_spank-$version.dist-info
  mkdir -p "$distinfo"
  printf '%s\n' 'Metadata-Version: 2.1' 'Name: dask-spank' "Version: $version" \
    'Summary: Dask clusters as Slurm jobs through dask-spank' 'License: MIT OR Apache-2.0' \
    'Requires-Python: >=3.9' 'Requires-Dist: distributed>=2023.1' > "$distinfo/METADATA"
  echo debian > "$distinfo/INSTALLER"
  echo dask_spank > "$distinfo/top_level.txt"
  install -D -m 0644 "$src/python/jupyter-config/dask_spank.json" "$p/etc/jupyter/jupyter_server_config.d/dask_spank.json"
  echo /etc/jupyter/jupyter_server_config.d/dask_spank.json > "$p/DEBIAN/conffiles"
  debian_docs "$p" python3-dask-spank "MIT OR Apache-2.0"
  debian_control "$src/packaging/debian/python3-control" "$p" ""

  mkdir -p "$out"
  local d f
  for d in "$r:dask-spank_${debver}_$arch.deb" "$p:python3-dask-spank_${debver}_all.deb"; do
    f=$out/${d#*:}
    dpkg-deb --root-owner-group -Zxz --build "${d%%:*}" "$f" >/dev/null || die "dpkg-deb --build ${d#*:} failed"
    echo "$f"
  done
}

# debian_docs ROOT PACKAGE LICENCE: copyright and changelog.Debian.gz.
debian_docs() {
  local doc=$1/usr/share/doc/$2
  mkdir -p "$doc"
  { echo "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
    echo "Upstream-Name: dask-spank"
    echo "Comment: built from commit $commit"
    echo
    echo "Files: *"
    echo "Copyright: dask-spank developers and the authors of the bundled Rust crates"
    echo "License: $3"
    echo
    sed 's/^$/./; s/^/ /' "$src/LICENSE"; } > "$doc/copyright"
  printf '%s (%s) unstable; urgency=medium\n\n  * Built from commit %s for Slurm %s.\n\n -- dask-spank developers <dask-spank@example.invalid>  %s\n' \
    "$2" "$version-1" "$commit" "$slurm_version" "$(date -R -u -d "@$(git -C "$REPO" show -s --format=%ct "$commit")")" \
    | gzip -9n > "$doc/changelog.Debian.gz"
  find "$1" -path "$1/DEBIAN" -prune -o -type d -exec chmod 0755 {} +
  find "$1" -path "$1/DEBIAN" -prune -o -type f ! -perm -100 -exec chmod 0644 {} +
}

# debian_control TEMPLATE ROOT DEPENDS: DEBIAN/control and DEBIAN/md5sums.
debian_control() {
  local r=$2 size
  size=$(du -sk --exclude=DEBIAN "$r" | cut -f1)
  sed -e "s|@VERSION@|$version-1|" -e "s|@ARCH@|$(dpkg --print-architecture)|" -e "s|@SIZE@|$size|" \
      -e "s|@DEPENDS@|$3|" -e "s|@SLURM@|$slurm_version|" "$1" > "$r/DEBIAN/control"
  (cd "$r" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) > "$r/DEBIAN/md5sums"
  chmod 0644 "$r/DEBIAN/control" "$r/DEBIAN/md5sums" "$r/DEBIAN/conffiles"
}

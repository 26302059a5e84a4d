#!/usr/bin/env python3
"""Prune the vendored crates of scripts/package, and describe the rest.

    vendor-prune.py SRCDIR VENDORDIR BUNDLED_INC

cargo vendor copies every crate of Cargo.lock, for every platform: the
Windows crates alone are more than half of the tree (windows-sys,
windows_x86_64_msvc with its import libraries, ...), and this cargo
(1.95) cannot filter by platform. A crate that the build never uses on
Linux is replaced here by a stub that an offline `cargo build --locked`
accepts: its Cargo.toml (name, version, features and dependencies, which
the lock file's resolution reads; no build script, hence no `links`, no
targets but an empty lib), an empty src/lib.rs, and a .cargo-checksum.json with the
package checksum of Cargo.lock and no file checksums.

The crates kept are those of `cargo metadata --filter-platform T` for the
Linux architectures an EL site builds on (LINUX_TARGETS): the same SRPM
rebuilds on any of them.

BUNDLED_INC is written for the spec (%include): one
`Provides: bundled(crate(NAME)) = VERSION` per kept crate, and the
`bundled_license` macro: dask-spank's own licence and those of the kept
crates, joined by AND (the spec's License).
"""
import json
import subprocess
import sys
import tomllib
from pathlib import Path

LINUX_TARGETS = [
    "x86_64-unknown-linux-gnu",
    "aarch64-unknown-linux-gnu",
    "powerpc64le-unknown-linux-gnu",
    "s390x-unknown-linux-gnu",
]
# Features may name dev-dependencies: those are kept too (cargo resolves
# no dev-dependency of a crate outside the workspace).
DEP_KINDS = ("dependencies", "build-dependencies", "dev-dependencies")
STUB_MARK = "// dask-spank: pruned by scripts/package (vendor-prune.py): never built on Linux.\n"


def used_crates(src: Path) -> set[tuple[str, str]]:
    used = set()
    for target in LINUX_TARGETS:
        args = ["cargo", "metadata", "--format-version", "1", "--locked", "--filter-platform", target]
        p = subprocess.run(args + ["--offline"], cwd=src, capture_output=True, text=True)
        if p.returncode != 0:
            p = subprocess.run(args, cwd=src, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"cargo metadata --filter-platform {target} failed:\n{p.stderr}")
        meta = json.loads(p.stdout)
        ids = {n["id"] for n in meta["resolve"]["nodes"]}
        used |= {(pk["name"], pk["version"]) for pk in meta["packages"]
                 if pk["id"] in ids and pk["source"] is not None}
    return used


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"unexpected TOML value {v!r}")


def table(name: str, items: dict) -> str:
    return f"[{name}]\n" + "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in items.items()) + "\n"


def stub_manifest(m: dict) -> str:
    pkg = m["package"]
    out = table("package", {
        "name": pkg["name"], "version": pkg["version"], "edition": pkg.get("edition", "2015"),
        "build": False, "autobins": False, "autoexamples": False, "autotests": False, "autobenches": False,
        **({"license": pkg["license"]} if "license" in pkg else {}),
    })
    lib = {"path": "src/lib.rs"}
    if "lib" in m and "name" in m["lib"]:
        lib["name"] = m["lib"]["name"]
    out += table("lib", lib)
    if "features" in m:
        out += table("features", m["features"])
    for kind in DEP_KINDS:
        if kind in m:
            out += table(kind, m[kind])
    for cfg, deps in m.get("target", {}).items():
        for kind in DEP_KINDS:
            if kind in deps:
                out += table(f"target.{json.dumps(cfg)}.{kind}", deps[kind])
    return out


def stub(crate: Path, m: dict) -> None:
    checksum = json.loads((crate / ".cargo-checksum.json").read_text())
    manifest = stub_manifest(m)
    for f in sorted(crate.iterdir()):
        if f.is_dir():
            subprocess.run(["rm", "-rf", str(f)], check=True)
        else:
            f.unlink()
    (crate / "src").mkdir()
    (crate / "src/lib.rs").write_text(STUB_MARK)
    (crate / "Cargo.toml").write_text(manifest)
    (crate / ".cargo-checksum.json").write_text(json.dumps({"files": {}, "package": checksum.get("package")}))


def spdx(expr: str) -> str:
    """The licence of a crate as an SPDX expression (old crates write
    MIT/Apache-2.0), the terms of a plain OR in one order (MIT OR Apache-2.0
    and Apache-2.0 OR MIT are one licence)."""
    e = " OR ".join(p.strip() for p in expr.split("/")) if "/" in expr else expr.strip()
    terms = e.split(" OR ")
    if len(terms) > 1 and not any(c in e for c in "()") and " AND " not in e and " WITH " not in e:
        e = " OR ".join(sorted(t.strip() for t in terms))
    return f"({e})" if (" OR " in e or " AND " in e or " WITH " in e) else e


def main() -> None:
    src, vendor, inc = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    used = used_crates(src)
    kept, pruned = [], []
    # dask-spank's own licence first, then the crates'.
    licences = {spdx(tomllib.loads((src / "Cargo.toml").read_text())["workspace"]["package"]["license"])}
    for crate in sorted(vendor.iterdir()):
        m = tomllib.loads((crate / "Cargo.toml").read_text())
        name, version = m["package"]["name"], m["package"]["version"]
        if (name, version) in used:
            kept.append((name, version))
            lic = m["package"].get("license")
            if lic is None:
                sys.exit(f"vendored crate {name} {version} declares no licence expression (license-file only): "
                         "add its licence to scripts/vendor-prune.py")
            licences.add(spdx(lic))
        else:
            stub(crate, m)
            pruned.append((name, version))
    missing = used - set(kept)
    if missing:
        sys.exit(f"crates used on Linux but not vendored: {sorted(missing)}")
    lines = [
        "# Written by scripts/package (scripts/vendor-prune.py) from the vendored crates:",
        f"# {len(kept)} crates built on Linux, {len(pruned)} never built there replaced by empty stubs:",
        "# " + " ".join(f"{n}-{v}" for n, v in pruned),
        "%global bundled_license " + " AND ".join(sorted(licences)),
    ]
    lines += [f"Provides:       bundled(crate({n})) = {v.replace('-', '~')}" for n, v in kept]
    inc.write_text("\n".join(lines) + "\n")
    print(f"vendor: {len(kept)} crates kept, {len(pruned)} replaced by stubs", file=sys.stderr)


if __name__ == "__main__":
    main()

//! Reads the Slurm release of the headers the plugin is built against (the
//! `slurm/slurm_version.h` that bindgen sees, through slurm-spank) and
//!
//! * sets `cfg(slurm_init_failure_mode)` from Slurm 25.05 on, where the
//!   plugin exports `slurm_spank_init_failure_mode` (lib.rs);
//! * sets `DASK_SPANK_BUILT_FOR` (e.g. `26.05.5`) for the load line and
//!   for `strings`.
//!
//! lib.rs checks at compile time that this agrees with the
//! `SLURM_VERSION_NUMBER` bindgen found, so the two cannot read different
//! headers unnoticed.

use std::path::PathBuf;

/// Include directories in the order clang searches them for bindgen:
/// `-I` in BINDGEN_EXTRA_CLANG_ARGS, then CPATH and C_INCLUDE_PATH, then
/// the system directories.
fn include_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(args) = std::env::var("BINDGEN_EXTRA_CLANG_ARGS") {
        let words: Vec<&str> = args.split_whitespace().collect();
        let mut i = 0;
        while i < words.len() {
            if words[i] == "-I" || words[i] == "-isystem" {
                if let Some(d) = words.get(i + 1) {
                    dirs.push(PathBuf::from(d));
                }
                i += 2;
                continue;
            }
            if let Some(d) = words[i].strip_prefix("-I") {
                dirs.push(PathBuf::from(d));
            }
            i += 1;
        }
    }
    for var in ["CPATH", "C_INCLUDE_PATH"] {
        if let Ok(v) = std::env::var(var) {
            dirs.extend(v.split(':').filter(|d| !d.is_empty()).map(PathBuf::from));
        }
    }
    dirs.push(PathBuf::from("/usr/local/include"));
    dirs.push(PathBuf::from("/usr/include"));
    dirs
}

fn main() {
    for var in ["BINDGEN_EXTRA_CLANG_ARGS", "CPATH", "C_INCLUDE_PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rustc-check-cfg=cfg(slurm_init_failure_mode)");
    let Some(header) = include_dirs()
        .into_iter()
        .map(|d| d.join("slurm/slurm_version.h"))
        .find(|h| h.exists())
    else {
        // bindgen fails right after with its own message.
        println!("cargo:warning=slurm/slurm_version.h not found: install Slurm's headers (slurm-devel, libslurm-dev)");
        println!("cargo:rustc-env=DASK_SPANK_BUILT_FOR=unknown");
        return;
    };
    println!("cargo:rerun-if-changed={}", header.display());
    let text = std::fs::read_to_string(&header).unwrap_or_default();
    let number = text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        match (w.next(), w.next(), w.next()) {
            (Some("#define"), Some("SLURM_VERSION_NUMBER"), Some(v)) => {
                u32::from_str_radix(v.trim_start_matches("0x"), 16).ok()
            }
            _ => None,
        }
    });
    let Some(n) = number else {
        println!(
            "cargo:warning=no SLURM_VERSION_NUMBER in {}",
            header.display()
        );
        println!("cargo:rustc-env=DASK_SPANK_BUILT_FOR=unknown");
        return;
    };
    let (major, minor, micro) = (n >> 16 & 0xff, n >> 8 & 0xff, n & 0xff);
    println!("cargo:rustc-env=DASK_SPANK_BUILT_FOR={major}.{minor:02}.{micro}");
    if n >= 0x19_05_00 {
        println!("cargo:rustc-cfg=slurm_init_failure_mode");
    }
}

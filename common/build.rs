//! Names the commit a build comes from, for `--version` of every binary and
//! the plugin's load line (`dask_spank_common::build_info`).
//!
//! In order: `DASK_SPANK_COMMIT` from the environment; the `COMMIT` file at
//! the top of the source tree, which `git archive` fills in (export-subst,
//! so a source tarball or an SRPM names its commit with no git around);
//! `git rev-parse HEAD` in a checkout; else "unknown".

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn is_commit(s: &str) -> bool {
    (7..=64).contains(&s.len()) && s.chars().all(|c| c.is_ascii_hexdigit())
}

fn main() {
    println!("cargo:rerun-if-env-changed=DASK_SPANK_COMMIT");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let top = manifest.parent().map(Path::to_path_buf).unwrap_or_default();
    let file = top.join("COMMIT");
    println!("cargo:rerun-if-changed={}", file.display());

    let from_env = std::env::var("DASK_SPANK_COMMIT")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| is_commit(s));
    let from_file = std::fs::read_to_string(&file)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| is_commit(s));
    let commit = from_env.or(from_file).or_else(|| {
        let head = git(&top, &["rev-parse", "HEAD"]).filter(|s| is_commit(s))?;
        // Rebuild when HEAD moves: the HEAD file, the branch's ref, packed refs.
        let mut watch = Vec::new();
        if let Some(d) = git(&top, &["rev-parse", "--absolute-git-dir"]) {
            watch.push(PathBuf::from(d).join("HEAD"));
        }
        if let Some(common) = git(&top, &["rev-parse", "--git-common-dir"]) {
            let common = top.join(common);
            watch.push(common.join("packed-refs"));
            if let Some(r) = git(&top, &["symbolic-ref", "-q", "HEAD"]) {
                watch.push(common.join(r));
            }
        }
        for w in watch.iter().filter(|w| w.exists()) {
            println!("cargo:rerun-if-changed={}", w.display());
        }
        Some(head)
    });
    if commit.is_none() {
        // Try again once a checkout appears (a worktree's .git is a file).
        let dotgit = top.join(".git");
        if dotgit.exists() {
            println!("cargo:rerun-if-changed={}", dotgit.display());
        }
    }
    println!(
        "cargo:rustc-env=DASK_SPANK_COMMIT={}",
        commit.unwrap_or_else(|| "unknown".into())
    );
}

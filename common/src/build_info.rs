//! What a build is: the crate version and the commit it was built from
//! (set by `common/build.rs`). Every binary's `--version` and the plugin's
//! load line print [`VERSION`].

/// The commit of the source tree (40 hex digits), or "unknown".
pub const COMMIT: &str = env!("DASK_SPANK_COMMIT");

/// `0.1.0 (commit 0123456789ab…)`: the version and the full commit.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("DASK_SPANK_COMMIT"),
    ")"
);

#[cfg(test)]
mod tests {
    #[test]
    fn version_names_a_commit() {
        assert!(super::VERSION.starts_with(env!("CARGO_PKG_VERSION")));
        assert!(super::COMMIT == "unknown" || super::COMMIT.len() >= 7);
    }
}

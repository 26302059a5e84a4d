//! The user's intention for a cluster's size, recorded in its directory
//! (`target.json`) by `up`, `scale`, `adapt` and `down`, and held by the
//! scheduler job's keeper (`keeper.py`), which reports in `keeper.json`.

use dask_spank_common::files::read_small_file;
use dask_spank_common::paths::layout;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Target {
    /// Keep this many worker jobs.
    Workers { workers: u32 },
    /// dask's adaptive target, between a minimum and a maximum.
    Adapt { adapt: [u32; 2] },
    /// The cluster is going down: submit nothing more.
    Down { down: bool },
}

pub fn record(dir: &Path, t: &Target) -> Result<(), String> {
    crate::record::write_json(&dir.join(layout::TARGET), t)
        .map_err(|e| format!("cannot record the target: {e}"))
}

/// The recorded intention (`None`: none, or unreadable).
pub fn read(dir: &Path) -> Option<Target> {
    serde_json::from_slice(&read_small_file(&dir.join(layout::TARGET), 65536).ok()?).ok()
}

/// Whether the keeper holds the cluster's size (a target other than down):
/// then its worker jobs are the keeper's to end with the scheduler job.
pub fn is_kept(dir: &Path) -> bool {
    matches!(
        read(dir),
        Some(Target::Workers { .. } | Target::Adapt { .. })
    )
}

/// What the keeper reported last (`None`: no keeper yet).
pub fn keeper_status(dir: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&read_small_file(&dir.join(layout::KEEPER), 65536).ok()?).ok()
}

/// `MIN:MAX`.
pub fn parse_range(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("--adapt={s}: must be MIN:MAX, two whole numbers with MIN <= MAX");
    let (lo, hi) = s.split_once(':').ok_or_else(bad)?;
    let (lo, hi): (u32, u32) = (
        lo.parse().map_err(|_| bad())?,
        hi.parse().map_err(|_| bad())?,
    );
    if lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_what_the_keeper_reads() {
        assert_eq!(
            serde_json::to_string(&Target::Workers { workers: 4 }).unwrap(),
            r#"{"workers":4}"#
        );
        assert_eq!(
            serde_json::to_string(&Target::Adapt { adapt: [0, 16] }).unwrap(),
            r#"{"adapt":[0,16]}"#
        );
        assert_eq!(
            serde_json::to_string(&Target::Down { down: true }).unwrap(),
            r#"{"down":true}"#
        );
        assert_eq!(parse_range("0:16"), Ok((0, 16)));
        assert!(parse_range("16:0").unwrap_err().contains("--adapt=16:0"));
        assert!(parse_range("x").is_err());
    }
}

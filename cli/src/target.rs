//! The user's intention for a cluster's size, as the commands record it
//! (`up`, `scale`, `adapt`, `down`): `records::Target` in the cluster's
//! `target.json`, held by the scheduler job's keeper.

use dask_spank_common::records::{ClusterDir, Target};

pub fn record(dir: &ClusterDir, t: &Target) -> Result<(), String> {
    dir.write_target(t)
        .map_err(|e| format!("cannot record the target: {e}"))
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
    fn ranges() {
        assert_eq!(parse_range("0:16"), Ok((0, 16)));
        assert!(parse_range("16:0").unwrap_err().contains("--adapt=16:0"));
        assert!(parse_range("x").is_err());
    }
}

//! A user's cluster as the commands see it: its name, its private
//! directory, and its view (queue, reports, connections).

use crate::slurm::squeue;
use crate::view::{build, ClusterView};
use dask_spank_common::paths::{cluster_dir, make_private_dir, scheduler_file, user_root, vars};
use dask_spank_common::records::ClusterDir;
use dask_spank_common::ClusterName;
use std::path::PathBuf;

pub type Res = Result<(), String>;

pub fn parse_name(name: &str) -> Result<ClusterName, String> {
    name.parse().map_err(|e| format!("{e}"))
}

/// `$DASK_SPANK_HOME`, else `$HOME/.dask-spank`.
pub fn root() -> Result<PathBuf, String> {
    user_root(
        std::env::var(vars::HOME).ok().as_deref(),
        std::env::var("HOME").ok().as_deref(),
    )
    .ok_or_else(|| {
        "neither DASK_SPANK_HOME nor HOME is set: cannot place the cluster directory".into()
    })
}

pub fn dir_of(c: &ClusterName) -> Result<PathBuf, String> {
    Ok(cluster_dir(&root()?, c))
}

/// The cluster's directory with its records.
pub fn records_of(c: &ClusterName) -> Result<ClusterDir, String> {
    dir_of(c).map(ClusterDir)
}

/// The cluster's directory, created private to the user if missing.
pub fn private_dir_of(c: &ClusterName) -> Result<PathBuf, String> {
    let dir = dir_of(c)?;
    make_private_dir(&root()?, &dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

pub fn view(c: &ClusterName) -> Result<ClusterView, String> {
    let dir = records_of(c)?;
    let queued = squeue(Some(c.as_str()))?;
    Ok(build(
        c.as_str(),
        &queued,
        &dir.reports(),
        dir.state().as_ref(),
        &dir.connected(),
        scheduler_file(dir.path()).to_string_lossy().into_owned(),
        dir.dashboard_token().as_deref(),
    ))
}

pub fn known(v: &ClusterView) -> bool {
    v.scheduler.is_some() || !v.workers.is_empty()
}

pub fn unknown(c: &ClusterName) -> String {
    format!("unknown cluster '{c}': no job and no record of it (dask-spank ls lists your clusters)")
}

/// How to connect, printed by `up` and `wait`.
pub fn print_connect(c: &ClusterName, sf: &str) {
    println!("scheduler file: {sf}");
    println!("connect from Python (TLS credentials included):");
    println!("    from dask_spank import connect");
    println!("    client = connect(\"{c}\")");
}

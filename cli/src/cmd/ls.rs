//! `dask-spank ls`: the user's clusters.

use crate::cluster::{parse_name, view, Res};
use crate::slurm::squeue;
use dask_spank_common::names::parse_job_name;

/// List your clusters, with job counts and age.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Example:\n  dask-spank ls")]
pub struct Args {
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Res {
    let json = a.json;
    let queued = squeue(None)?;
    let mut names: Vec<String> = queued
        .iter()
        .filter_map(|q| parse_job_name(&q.name).map(|(_, c)| c.to_string()))
        .collect();
    names.sort();
    names.dedup();
    let mut views = Vec::new();
    for n in &names {
        let Ok(c) = parse_name(n) else { continue };
        let v = view(&c)?;
        let since = queued
            .iter()
            .filter(|q| parse_job_name(&q.name).is_some_and(|(_, c)| c == n))
            .map(|q| q.submit.clone())
            .min()
            .unwrap_or_default();
        views.push((v, since));
    }
    if json {
        let out: Vec<_> = views
            .iter()
            .map(|(v, since)| {
                serde_json::json!({
                "cluster": v.cluster, "scheduler": v.scheduler.as_ref().map(|s| &s.state),
                "workers": v.total(), "connected": v.connected, "pending": v.pending,
                "running": v.running, "failed": v.failed, "pools": v.pools, "submitted": since,
                "scheduler_file": v.scheduler_file})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return Ok(());
    }
    if views.is_empty() {
        println!("no dask-spank cluster (start one with: dask-spank up NAME --workers N)");
        return Ok(());
    }
    println!(
        "{:<20} {:<10} {:>7} {:>9} {:>7} {:>7} {:>6}  AGE",
        "CLUSTER", "SCHEDULER", "WORKERS", "CONNECTED", "PENDING", "RUNNING", "FAILED"
    );
    for (v, since) in &views {
        println!(
            "{:<20} {:<10} {:>7} {:>9} {:>7} {:>7} {:>6}  {}",
            v.cluster,
            v.scheduler
                .as_ref()
                .map(|s| s.state.as_str())
                .unwrap_or("-"),
            v.total(),
            v.connected,
            v.pending,
            v.running,
            v.failed,
            age(since)
        );
    }
    Ok(())
}

fn age(since: &str) -> String {
    let Ok(t) = humantime::parse_rfc3339_weak(since) else {
        return "-".into();
    };
    let secs = std::time::SystemTime::now()
        .duration_since(t)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

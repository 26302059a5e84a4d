//! `dask-spank ls`: the user's clusters.

use crate::cluster::{parse_name, view, Res};
use crate::slurm::{squeue, QueuedJob};
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
    let mut views = Vec::new();
    for (n, since) in clusters(&queued) {
        let Ok(c) = parse_name(&n) else { continue };
        views.push((view(&c)?, since));
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

/// The clusters of the queued jobs, by name, each with its earliest
/// submission time. Apart from `run` (which asks squeue) to be tested.
fn clusters(queued: &[QueuedJob]) -> Vec<(String, String)> {
    let mut names: Vec<String> = queued
        .iter()
        .filter_map(|q| parse_job_name(&q.name).map(|(_, c)| c.to_string()))
        .collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|n| {
            let since = queued
                .iter()
                .filter(|q| parse_job_name(&q.name).is_some_and(|(_, c)| c == n))
                .map(|q| q.submit.clone())
                .min()
                .unwrap_or_default();
            (n, since)
        })
        .collect()
}

fn age(since: &str) -> String {
    let Ok(t) = humantime::parse_rfc3339_weak(since) else {
        return "-".into();
    };
    let secs = std::time::SystemTime::now()
        .duration_since(t)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    age_of(secs)
}

/// An age in its largest unit: seconds under 2 minutes, minutes under 2
/// hours, hours beyond.
fn age_of(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dask_spank_common::slurm_state::SlurmState;

    fn q(label: &str, name: &str, submit: &str) -> QueuedJob {
        QueuedJob {
            label: label.into(),
            name: name.into(),
            state: SlurmState::Running,
            node: "n1".into(),
            reason: "None".into(),
            submit: submit.into(),
        }
    }

    #[test]
    fn each_cluster_of_the_queue_once_since_its_first_submission() {
        let queued = [
            q("12", "dask-scheduler-zed", "2024-03-01T08:00:00"),
            q("10", "dask-scheduler-ana", "2024-01-02T10:00:00"),
            q("11_1", "dask-worker-ana", "2024-01-02T10:00:05"),
            q("9_1", "dask-worker-ana@gpu", "2024-01-01T09:00:00"),
            q("13", "my-own-job", "2023-01-01T00:00:00"),
        ];
        let want = [
            ("ana", "2024-01-01T09:00:00"),
            ("zed", "2024-03-01T08:00:00"),
        ]
        .map(|(n, s)| (n.to_string(), s.to_string()));
        assert_eq!(clusters(&queued), want);
        assert!(clusters(&[q("13", "my-own-job", "")]).is_empty());
    }

    #[test]
    fn ages_are_told_in_their_largest_unit() {
        let ages = [
            (0, "0s"),
            (119, "119s"),
            (120, "2m"),
            (7199, "119m"),
            (7200, "2h"),
            (90000, "25h"),
        ];
        for (secs, want) in ages {
            assert_eq!(age_of(secs), want, "{secs} s");
        }
        assert_eq!(age("not a time"), "-");
        assert_eq!(age(""), "-");
        let ten_min_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(630);
        let since = humantime::format_rfc3339_seconds(ten_min_ago).to_string();
        assert_eq!(age(&since), "10m");
    }
}

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
                "running": v.running, "failed": v.failed, "pools": v.pools, "submitted": since.map(rfc3339),
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
/// submission time (seconds since the epoch). Apart from `run` (which asks
/// squeue) to be tested.
fn clusters(queued: &[QueuedJob]) -> Vec<(String, Option<u64>)> {
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
                .filter_map(|q| q.submit)
                .min();
            (n, since)
        })
        .collect()
}

fn age(since: &Option<u64>) -> String {
    let Some(since) = since else {
        return "-".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    age_of(now.saturating_sub(*since))
}

/// A time since the epoch as RFC 3339, in UTC (`ls --json`'s "submitted").
fn rfc3339(secs: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(t).to_string()
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

    fn q(label: &str, name: &str, submit: Option<u64>) -> QueuedJob {
        QueuedJob {
            label: label.into(),
            name: name.into(),
            state: SlurmState::Running,
            node: "n1".into(),
            reason: "None".into(),
            submit,
        }
    }

    #[test]
    fn each_cluster_of_the_queue_once_since_its_first_submission() {
        let queued = [
            q("12", "dask-scheduler-zed", Some(1_709_280_000)),
            q("10", "dask-scheduler-ana", Some(1_704_189_600)),
            q("11_1", "dask-worker-ana", Some(1_704_189_605)),
            q("9_1", "dask-worker-ana@gpu", Some(1_704_099_600)),
            q("13", "my-own-job", Some(1)),
            q("14", "dask-worker-old", None),
        ];
        let want = [
            ("ana", Some(1_704_099_600)),
            ("old", None),
            ("zed", Some(1_709_280_000)),
        ]
        .map(|(n, s)| (n.to_string(), s));
        assert_eq!(clusters(&queued), want);
        assert!(clusters(&[q("13", "my-own-job", None)]).is_empty());
        assert_eq!(rfc3339(1_704_099_600), "2024-01-01T09:00:00Z");
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
        assert_eq!(age(&None), "-");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert_eq!(age(&Some(now - 630)), "10m");
        // A submission in the future (clocks apart) is no negative age.
        assert_eq!(age(&Some(now + 60)), "0s");
    }
}

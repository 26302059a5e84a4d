//! `dask-spank logs`: the job logs of a cluster, where its jobs said they are.

use crate::cluster::{parse_name, records_of, unknown, Res};
use crate::slurm::squeue;
use dask_spank_common::records::ClusterDir;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

/// Print the cluster's job logs (--follow to keep printing).
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Example:\n  dask-spank logs ana --job 1234_7 --follow")]
pub struct Args {
    pub name: String,
    /// One job (id or array task, e.g. 1234_7).
    #[arg(long)]
    pub job: Option<String>,
    #[arg(long, short)]
    pub follow: bool,
    /// Where the logs are, as JSON (job label -> log file), without them.
    #[arg(long, conflicts_with = "follow")]
    pub json: bool,
}

pub fn run(a: Args) -> Res {
    let (c, job, follow) = (parse_name(&a.name)?, a.job.as_deref(), a.follow);
    let dir = records_of(&c)?;
    let files = log_files(&dir, job);
    if a.json {
        let map: std::collections::BTreeMap<&str, &PathBuf> =
            files.iter().map(|(l, f)| (l.as_str(), f)).collect();
        println!("{}", serde_json::to_string_pretty(&map).unwrap_or_default());
        return Ok(());
    }
    if files.is_empty() && !follow {
        return Err(match job {
            Some(j) => format!("no log of job {j} in cluster '{c}' (jobs log once they start)"),
            None if squeue(Some(c.as_str()))?.is_empty() => unknown(&c),
            None => format!("no job of cluster '{c}' has started yet"),
        });
    }
    // Label -> bytes printed so far.
    let mut printed: HashMap<String, u64> = HashMap::new();
    for (label, f) in &files {
        println!("==> {label}: {} <==", f.display());
        let text = std::fs::read(f).unwrap_or_default();
        print!("{}", String::from_utf8_lossy(&text));
        printed.insert(label.clone(), text.len() as u64);
    }
    if !follow {
        return Ok(());
    }
    // Like `tail -f`, until interrupted; jobs that start later (new workers,
    // walltime successors) join in with their whole log.
    loop {
        std::thread::sleep(Duration::from_millis(500));
        for (label, f) in log_files(&dir, job) {
            let Ok(text) = std::fs::read(&f) else {
                continue;
            };
            let done = printed.entry(label.clone()).or_insert_with(|| {
                println!("==> {label}: {} <==", f.display());
                0
            });
            if (text.len() as u64) > *done {
                let new = String::from_utf8_lossy(&text[*done as usize..]).into_owned();
                for line in new.lines() {
                    println!("{label}: {line}");
                }
                *done = text.len() as u64;
            }
        }
    }
}

/// The logs the cluster's jobs reported (label, path), optionally of one job.
fn log_files(dir: &ClusterDir, job: Option<&str>) -> Vec<(String, PathBuf)> {
    dir.reports()
        .iter()
        .filter(|r| job.is_none_or(|j| r.label == j || r.job_id.to_string() == j))
        .filter_map(|r| r.log.as_ref().map(|l| (r.label.clone(), PathBuf::from(l))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dask_spank_common::records::{JobReport, ReportState};

    fn report(job_id: u32, label: &str, log: Option<&str>) -> JobReport {
        JobReport {
            job_id,
            label: label.into(),
            role: "worker".into(),
            state: ReportState::Running,
            reason: None,
            node: "n1".into(),
            log: log.map(String::from),
            updated: 0,
            pool: None,
        }
    }

    #[test]
    fn the_logs_are_those_the_jobs_reported_by_label_or_job_id() {
        let d = std::env::temp_dir().join(format!("dsp-logs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let dir = ClusterDir(d.clone());
        dir.write_report(&report(10, "10", Some("/l/sched.out")))
            .unwrap();
        dir.write_report(&report(12, "11_1", Some("/l/w1.out")))
            .unwrap();
        dir.write_report(&report(13, "11_2", None)).unwrap();
        let of = |job| {
            log_files(&dir, job)
                .into_iter()
                .map(|(l, f)| (l, f.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
        };
        let pair = |l: &str, f: &str| (l.to_string(), f.to_string());
        assert_eq!(
            of(None),
            [pair("10", "/l/sched.out"), pair("11_1", "/l/w1.out")]
        );
        assert_eq!(of(Some("11_1")), [pair("11_1", "/l/w1.out")]);
        // An array task by its own job id too.
        assert_eq!(of(Some("12")), [pair("11_1", "/l/w1.out")]);
        assert!(of(Some("11_2")).is_empty(), "no log reported");
        assert!(of(Some("11")).is_empty(), "no prefix match");
        std::fs::remove_dir_all(&d).unwrap();
    }
}

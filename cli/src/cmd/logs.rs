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
            let done = printed.entry(label.clone()).or_insert_with(|| {
                println!("==> {label}: {} <==", f.display());
                0
            });
            let Ok(new) = read_from(&f, done) else {
                continue;
            };
            let (lines, used) = complete_lines(&new);
            for line in lines {
                println!("{label}: {line}");
            }
            *done += used as u64;
        }
    }
}

/// What `f` holds after its first `*done` bytes (from the start again,
/// and `*done` reset, if it was truncated).
fn read_from(f: &std::path::Path, done: &mut u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(f)?;
    if file.metadata()?.len() < *done {
        *done = 0;
    }
    file.seek(SeekFrom::Start(*done))?;
    let mut new = Vec::new();
    file.read_to_end(&mut new)?;
    Ok(new)
}

/// The complete lines at the start of `bytes`, and the bytes they take:
/// a line still being written waits for its end (printed in two pieces,
/// it would read as two lines, and a character could be cut in two).
fn complete_lines(bytes: &[u8]) -> (Vec<String>, usize) {
    let end = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let lines = String::from_utf8_lossy(&bytes[..end])
        .lines()
        .map(str::to_string)
        .collect();
    (lines, end)
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

    #[test]
    fn a_line_still_being_written_waits_for_its_end() {
        let (lines, used) = complete_lines(b"one\ntwo\nthr");
        assert_eq!(
            (lines, used),
            (vec!["one".to_string(), "two".to_string()], 8)
        );
        assert_eq!(complete_lines(b"partial"), (vec![], 0));
        // A character cut by the writer is not printed in two halves.
        let euro = "\u{20ac}\n".as_bytes();
        assert_eq!(complete_lines(&euro[..2]), (vec![], 0));
        assert_eq!(complete_lines(euro), (vec!["\u{20ac}".to_string()], 4));
    }

    #[test]
    fn a_log_is_read_from_where_it_was_left_and_again_once_truncated() {
        // Not the other test's name: the tests run side by side, and a file
        // here made that test's directory fail with "File exists".
        let f = std::env::temp_dir().join(format!("dsp-follow-{}", std::process::id()));
        std::fs::write(&f, b"abc\ndef\n").unwrap();
        let mut done = 4;
        assert_eq!(read_from(&f, &mut done).unwrap(), b"def\n");
        std::fs::write(&f, b"x\n").unwrap();
        assert_eq!(read_from(&f, &mut done).unwrap(), b"x\n");
        assert_eq!(done, 0);
        std::fs::remove_file(&f).unwrap();
    }
}

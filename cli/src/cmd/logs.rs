//! `dask-spank logs`: the job logs of a cluster, where its jobs said they are.

use crate::cluster::{dir_of, parse_name, unknown, Res};
use crate::record::read_reports;
use crate::slurm::squeue;
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
}

pub fn run(a: Args) -> Res {
    let (c, job, follow) = (parse_name(&a.name)?, a.job.as_deref(), a.follow);
    let dir = dir_of(&c)?;
    let reports = read_reports(&dir);
    let files: Vec<(String, PathBuf)> = reports
        .iter()
        .filter(|r| job.is_none_or(|j| r.label == j || r.job_id.to_string() == j))
        .filter_map(|r| r.log.as_ref().map(|l| (r.label.clone(), PathBuf::from(l))))
        .collect();
    if files.is_empty() {
        return Err(match job {
            Some(j) => format!("no log of job {j} in cluster '{c}' (jobs log once they start)"),
            None if squeue(Some(c.as_str()))?.is_empty() => unknown(&c),
            None => format!("no job of cluster '{c}' has started yet"),
        });
    }
    let mut offsets: Vec<u64> = Vec::new();
    for (label, f) in &files {
        println!("==> {label}: {} <==", f.display());
        let text = std::fs::read(f).unwrap_or_default();
        print!("{}", String::from_utf8_lossy(&text));
        offsets.push(text.len() as u64);
    }
    if !follow {
        return Ok(());
    }
    loop {
        std::thread::sleep(Duration::from_millis(500));
        for (i, (label, f)) in files.iter().enumerate() {
            let Ok(text) = std::fs::read(f) else { continue };
            if (text.len() as u64) > offsets[i] {
                let new = String::from_utf8_lossy(&text[offsets[i] as usize..]).into_owned();
                for line in new.lines() {
                    println!("{label}: {line}");
                }
                offsets[i] = text.len() as u64;
            }
        }
    }
}

//! The user subcommands: up, ls, status, wait, scale, logs, down.

use crate::record::{self, read_reports, read_state};
use crate::slurm::{self, squeue};
use crate::view::{build, ClusterView, Row};
use dask_spank_common::paths::{cluster_dir, scheduler_file, user_root, vars};
use dask_spank_common::ClusterName;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub type Res = Result<(), String>;

pub fn parse_name(name: &str) -> Result<ClusterName, String> {
    name.parse().map_err(|e| format!("{e}"))
}

pub fn dir_of(c: &ClusterName) -> Result<PathBuf, String> {
    let root = user_root(
        std::env::var(vars::HOME).ok().as_deref(),
        std::env::var("HOME").ok().as_deref(),
    )
    .ok_or("neither DASK_SPANK_HOME nor HOME is set")?;
    Ok(cluster_dir(&root, c))
}

pub fn view(c: &ClusterName) -> Result<ClusterView, String> {
    let dir = dir_of(c)?;
    let queued = squeue(Some(c.as_str()))?;
    Ok(build(
        c.as_str(),
        &queued,
        &read_reports(&dir),
        read_state(&dir).as_ref(),
        scheduler_file(&dir).to_string_lossy().into_owned(),
    ))
}

fn known(v: &ClusterView) -> bool {
    v.scheduler.is_some() || !v.workers.is_empty()
}

fn unknown(c: &ClusterName) -> String {
    format!("unknown cluster '{c}': no job and no record of it (dask-spank ls lists your clusters)")
}

/// Worker submission options remembered by `up`, reused by `scale`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerArgs {
    pub args: Vec<String>,
}

fn worker_args_file(c: &ClusterName) -> Result<PathBuf, String> {
    Ok(dir_of(c)?.join("worker-args.json"))
}

pub struct Up {
    pub name: String,
    pub workers: u32,
    pub worker_mem: Option<String>,
    pub worker_cpus: Option<u32>,
    pub worker_time: Option<String>,
    pub scheduler_mem: Option<String>,
    pub env: Option<String>,
    pub wait: Option<f64>,
    pub timeout: u64,
    pub json: bool,
}

pub fn up(u: Up) -> Res {
    let c = parse_name(&u.name)?;
    let queued = squeue(Some(c.as_str()))?;
    if !queued.is_empty() {
        let ids: Vec<&str> = queued.iter().map(|q| q.label.as_str()).collect();
        return Err(format!(
            "cluster '{c}' is already in use by jobs {} (dask-spank down {c} first, or pick another name)",
            ids.join(", ")
        ));
    }
    let dir = dir_of(&c)?;
    record::clear(&dir);
    let _ = std::fs::remove_file(scheduler_file(&dir));
    let mut common = vec![format!("--dask-cluster={c}")];
    if let Some(e) = &u.env {
        common.push(format!("--dask-env={e}"));
    }
    let mut sargs = vec!["--dask-role=scheduler".to_string()];
    sargs.extend(common.clone());
    if let Some(m) = &u.scheduler_mem {
        sargs.push(format!("--mem={m}"));
    }
    let mut wargs = vec!["--dask-role=worker".to_string()];
    wargs.extend(common);
    if let Some(m) = &u.worker_mem {
        wargs.push(format!("--mem={m}"));
    }
    if let Some(n) = u.worker_cpus {
        wargs.push(format!("--cpus-per-task={n}"));
    }
    if let Some(t) = &u.worker_time {
        wargs.push(format!("--time={t}"));
    }
    let sched = slurm::sbatch(&sargs)?;
    let workers = if u.workers > 0 {
        let mut a = wargs.clone();
        a.push(format!("--array=1-{}", u.workers));
        match slurm::sbatch(&a) {
            Ok(id) => Some(id),
            Err(e) => {
                let _ = slurm::scancel(std::slice::from_ref(&sched));
                return Err(e);
            }
        }
    } else {
        None
    };
    let _ = record::write_json(&worker_args_file(&c)?, &WorkerArgs { args: wargs });
    let sf = scheduler_file(&dir);
    if u.json {
        println!(
            "{}",
            serde_json::json!({"cluster": c.as_str(), "scheduler_job": sched, "worker_array": workers, "scheduler_file": sf})
        );
    } else {
        println!(
            "cluster '{c}': scheduler job {sched}, worker array {}",
            workers.as_deref().unwrap_or("-")
        );
        print_connect(&sf.to_string_lossy());
    }
    match u.wait {
        Some(p) => wait(&u.name, p, u.timeout, u.json),
        None => Ok(()),
    }
}

fn print_connect(sf: &str) {
    println!("scheduler file: {sf}");
    println!("connect from Python:");
    println!("    from distributed import Client");
    println!("    client = Client(scheduler_file=\"{sf}\")");
}

pub fn ls(json: bool) -> Res {
    let queued = squeue(None)?;
    let mut names: Vec<String> = queued
        .iter()
        .filter_map(|q| {
            q.name
                .strip_prefix("dask-scheduler-")
                .or_else(|| q.name.strip_prefix("dask-worker-"))
                .map(str::to_string)
        })
        .collect();
    names.sort();
    names.dedup();
    let mut views = Vec::new();
    for n in &names {
        let Ok(c) = parse_name(n) else { continue };
        let v = view(&c)?;
        let since = queued
            .iter()
            .filter(|q| {
                q.name == format!("dask-scheduler-{n}") || q.name == format!("dask-worker-{n}")
            })
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
                "running": v.running, "failed": v.failed, "submitted": since,
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

fn print_rows(rows: &[&Row]) {
    println!(
        "{:<12} {:<10} {:<10} {:<8}  REASON",
        "JOB", "ROLE", "STATE", "NODE"
    );
    for r in rows {
        println!(
            "{:<12} {:<10} {:<10} {:<8}  {}",
            r.job, r.role, r.state, r.node, r.reason
        );
    }
}

pub fn status(name: &str, json: bool) -> Res {
    let c = parse_name(name)?;
    let v = view(&c)?;
    if !known(&v) {
        return Err(unknown(&c));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!(
        "cluster '{}': {} of {} worker jobs connected ({} pending, {} running, {} failed, {} ended)",
        v.cluster, v.connected, v.total(), v.pending, v.running, v.failed, v.ended
    );
    if let Some(a) = &v.scheduler_address {
        println!(
            "scheduler {a}, dashboard {}",
            v.dashboard_address.as_deref().unwrap_or("-")
        );
    }
    println!("scheduler file: {}", v.scheduler_file);
    let mut rows: Vec<&Row> = v.scheduler.iter().collect();
    rows.extend(v.workers.iter());
    print_rows(&rows);
    Ok(())
}

/// Why the wanted share can no longer be reached, if so.
fn hopeless(v: &ClusterView, percent: f64) -> Option<String> {
    match &v.scheduler {
        None => return Some(format!("cluster '{}' has no scheduler job", v.cluster)),
        Some(s) if s.state == "failed" || s.state == "ended" => {
            return Some(format!(
                "the scheduler job {} {}: {}",
                s.job, s.state, s.reason
            ))
        }
        _ => {}
    }
    let alive = v.total() - v.failed;
    if v.total() > 0 && (alive as f64) * 100.0 < percent * v.total() as f64 {
        let reasons: Vec<String> = v
            .workers
            .iter()
            .filter(|r| r.state == "failed" || r.state == "ended")
            .take(3)
            .map(|r| format!("{}: {}", r.job, r.reason))
            .collect();
        return Some(format!(
            "only {alive} of {} worker jobs are left, fewer than {percent}%; {}",
            v.total(),
            reasons.join("; ")
        ));
    }
    None
}

pub fn wait(name: &str, percent: f64, timeout_s: u64, json: bool) -> Res {
    if !(0.0..=100.0).contains(&percent) {
        return Err(format!("--percent={percent}: must be between 0 and 100"));
    }
    let c = parse_name(name)?;
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal() && !json;
    let bar = tty.then(|| {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} workers connected {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    });
    let mut last = String::new();
    loop {
        let v = view(&c)?;
        if !known(&v) {
            return Err(unknown(&c));
        }
        let line = format!(
            "{} of {} worker jobs connected ({:.0}%), {} pending",
            v.connected,
            v.total(),
            v.percent_connected(),
            v.pending
        );
        match &bar {
            Some(b) => {
                b.set_length(v.total() as u64);
                b.set_position(v.connected as u64);
                b.set_message(format!("({} pending, {} failed)", v.pending, v.failed));
                b.tick();
            }
            None if line != last && !json => eprintln!("dask-spank: {line}"),
            None => {}
        }
        last = line.clone();
        let done = percent == 0.0 || (v.total() > 0 && v.percent_connected() >= percent);
        if done {
            if let Some(b) = &bar {
                b.finish();
            }
            if json {
                println!(
                    "{}",
                    serde_json::json!({"cluster": c.as_str(), "connected": v.connected, "workers": v.total(), "scheduler_file": v.scheduler_file})
                );
            } else {
                println!("cluster '{c}': {line}");
                print_connect(&v.scheduler_file);
            }
            return Ok(());
        }
        if let Some(why) = hopeless(&v, percent) {
            if let Some(b) = &bar {
                b.abandon();
            }
            return Err(why);
        }
        if start.elapsed() >= Duration::from_secs(timeout_s) {
            if let Some(b) = &bar {
                b.abandon();
            }
            let pending: Vec<String> = v
                .workers
                .iter()
                .filter(|r| r.state == "pending")
                .take(1)
                .map(|r| r.reason.clone())
                .collect();
            return Err(format!(
                "timed out after {timeout_s}s: {line} (wanted {percent}%){}",
                pending
                    .first()
                    .map(|r| format!("; pending jobs wait for: {r}"))
                    .unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

pub fn scale(name: &str, n: u32) -> Res {
    let c = parse_name(name)?;
    let v = view(&c)?;
    if v.scheduler.is_none() {
        return Err(unknown(&c));
    }
    let active: Vec<&Row> = v
        .workers
        .iter()
        .filter(|r| matches!(r.state.as_str(), "pending" | "running" | "connected"))
        .collect();
    let have = active.len() as u32;
    if n > have {
        let args = std::fs::read(worker_args_file(&c)?)
            .ok()
            .and_then(|b| serde_json::from_slice::<WorkerArgs>(&b).ok())
            .map(|w| w.args)
            .unwrap_or_else(|| vec!["--dask-role=worker".into(), format!("--dask-cluster={c}")]);
        let mut a = args;
        a.push(format!("--array=1-{}", n - have));
        let id = slurm::sbatch(&a)?;
        println!("cluster '{c}': {have} -> {n} worker jobs (submitted array {id})");
    } else if n < have {
        // Pending jobs go first, then the most recent running ones.
        let mut victims: Vec<&Row> = active.clone();
        victims.sort_by_key(|r| (r.state != "pending", std::cmp::Reverse(job_key(&r.job))));
        let ids: Vec<String> = victims
            .iter()
            .take((have - n) as usize)
            .map(|r| r.job.clone())
            .collect();
        slurm::scancel(&ids)?;
        println!(
            "cluster '{c}': {have} -> {n} worker jobs (cancelled {})",
            ids.join(" ")
        );
    } else {
        println!("cluster '{c}': already {n} worker jobs");
    }
    Ok(())
}

fn job_key(label: &str) -> (u64, u64) {
    let mut it = label.split('_').map(|x| x.parse::<u64>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

pub fn logs(name: &str, job: Option<&str>, follow: bool) -> Res {
    let c = parse_name(name)?;
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

pub fn down(name: &str, timeout_s: u64) -> Res {
    let c = parse_name(name)?;
    let queued = squeue(Some(c.as_str()))?;
    let dir = dir_of(&c)?;
    if queued.is_empty() && read_reports(&dir).is_empty() {
        return Err(unknown(&c));
    }
    let ids: Vec<String> = queued.iter().map(|q| q.label.clone()).collect();
    slurm::scancel(&ids)?;
    let start = Instant::now();
    loop {
        let left = squeue(Some(c.as_str()))?;
        if left.is_empty() {
            break;
        }
        if start.elapsed() > Duration::from_secs(timeout_s) {
            let l: Vec<String> = left
                .iter()
                .map(|q| format!("{} ({})", q.label, q.state))
                .collect();
            return Err(format!(
                "cluster '{c}': jobs still in the queue after {timeout_s}s: {}",
                l.join(", ")
            ));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    // A later cluster of the same name starts from a clean record.
    let _ = std::fs::remove_file(scheduler_file(&dir));
    record::clear(&dir);
    println!(
        "cluster '{c}' is down: {} jobs cancelled, none left in the queue",
        ids.len()
    );
    Ok(())
}

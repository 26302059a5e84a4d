//! `dask-spank wait`: a progress bar until enough workers are connected.

use crate::cluster::{known, parse_name, print_connect, unknown, view, Res};
use crate::view::{ClusterView, RowState};
use dask_spank_common::ClusterName;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Why the wanted share can no longer be reached, if so.
fn hopeless(v: &ClusterView, percent: f64) -> Option<String> {
    match &v.scheduler {
        None => return Some(format!("cluster '{}' has no scheduler job", v.cluster)),
        Some(s) if s.state.is_over() => {
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
            .filter(|r| r.state.is_over())
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

/// Wait until a percentage of the worker jobs is connected to the scheduler.
#[derive(clap::Args, Debug, Clone)]
#[command(
    after_help = "Example:\n  dask-spank wait ana --percent 80 --timeout 600\n\nExits non-zero with the reason on a timeout, or when the cluster failed.\n--percent 0 returns at once."
)]
pub struct Args {
    pub name: String,
    #[arg(long, default_value_t = 100.0)]
    pub percent: f64,
    /// Seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
    #[arg(long)]
    pub json: bool,
    /// Count one pool's worker jobs only (`default`: the default pool's).
    #[arg(long)]
    pub pool: Option<String>,
    /// The scheduler job (from `up`): if it ends before the cluster is
    /// known, its log tells why.
    #[arg(long, hide = true)]
    pub scheduler_job: Option<String>,
}

/// A progress bar on stderr, when a person watches it (not for `--json`).
fn progress_bar(json: bool) -> Option<ProgressBar> {
    let tty = std::io::stderr().is_terminal() && !json;
    tty.then(|| {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} workers connected {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    })
}

/// Why a cluster is not known: its scheduler job's end, if it ended.
fn not_known(c: &ClusterName, scheduler_job: Option<&str>) -> String {
    match scheduler_job.and_then(crate::slurm::job_end) {
        Some(why) => format!("cluster '{c}' did not start: {why}"),
        None => unknown(c),
    }
}

/// Show the progress: on the bar, or as a line when it changed.
fn show(bar: Option<&ProgressBar>, v: &ClusterView, line: &str, last: &str, json: bool) {
    match bar {
        Some(b) => {
            b.set_length(v.total() as u64);
            b.set_position(v.connected as u64);
            b.set_message(format!("({} pending, {} failed)", v.pending, v.failed));
            b.tick();
        }
        None if line != last && !json => eprintln!("dask-spank: {line}"),
        None => {}
    }
}

/// Print the reached cluster and how to connect (or it as JSON).
fn print_reached(c: &ClusterName, v: &ClusterView, line: &str, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({"cluster": c.as_str(), "connected": v.connected, "workers": v.total(), "scheduler_file": v.scheduler_file})
        );
    } else {
        println!("cluster '{c}': {line}");
        print_connect(c, &v.scheduler_file);
    }
}

/// The error of a hopeless cluster: the scheduler job's own log says more,
/// if it ended early (no worker connected).
fn hopeless_error(
    c: &ClusterName,
    v: &ClusterView,
    scheduler_job: Option<&str>,
    why: String,
) -> String {
    let early = scheduler_job
        .filter(|_| v.connected == 0)
        .and_then(crate::slurm::job_end);
    match early {
        Some(end) => format!("cluster '{c}' did not start: {end}"),
        None => why,
    }
}

/// The error of a timeout: the progress, and what a pending job waits for.
fn timeout_error(v: &ClusterView, line: &str, timeout_s: u64, percent: f64) -> String {
    let pending: Vec<String> = v
        .workers
        .iter()
        .filter(|r| r.state == RowState::Pending)
        .take(1)
        .map(|r| r.reason.clone())
        .collect();
    format!(
        "timed out after {timeout_s}s: {line} (wanted {percent}%){}",
        pending
            .first()
            .map(|r| format!("; pending jobs wait for: {r}"))
            .unwrap_or_default()
    )
}

pub fn run(a: Args) -> Res {
    let (name, percent, timeout_s, json) = (a.name.as_str(), a.percent, a.timeout, a.json);
    if !(0.0..=100.0).contains(&percent) {
        return Err(format!("--percent={percent}: must be between 0 and 100"));
    }
    let c = parse_name(name)?;
    if let Some(p) = &a.pool {
        dask_spank_common::names::PoolName::parse_opt(p).map_err(|e| {
            format!(
                "--pool {p}: {}",
                format!("{e}").replace("--dask-pool=", "pool name ")
            )
        })?;
    }
    let start = Instant::now();
    let bar = progress_bar(json);
    let mut last = String::new();
    loop {
        let v = view(&c)?;
        if !known(&v) {
            return Err(not_known(&c, a.scheduler_job.as_deref()));
        }
        let v = match &a.pool {
            Some(p) => v.of_pool(p),
            None => v,
        };

        let line = format!(
            "{} of {} worker jobs connected ({:.0}%), {} pending",
            v.connected,
            v.total(),
            v.percent_connected(),
            v.pending
        );
        show(bar.as_ref(), &v, &line, &last, json);
        last = line.clone();
        let done = percent == 0.0 || (v.total() > 0 && v.percent_connected() >= percent);
        if done {
            if let Some(b) = &bar {
                b.finish();
            }
            print_reached(&c, &v, &line, json);
            return Ok(());
        }
        if let Some(why) = hopeless(&v, percent) {
            if let Some(b) = &bar {
                b.abandon();
            }
            return Err(hopeless_error(&c, &v, a.scheduler_job.as_deref(), why));
        }

        if start.elapsed() >= Duration::from_secs(timeout_s) {
            if let Some(b) = &bar {
                b.abandon();
            }
            return Err(timeout_error(&v, &line, timeout_s, percent));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

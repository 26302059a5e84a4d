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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{Row, RowState};

    fn row(job: &str, role: &str, state: RowState, reason: &str) -> Row {
        Row {
            job: job.into(),
            role: role.into(),
            pool: "default".into(),
            state,
            node: "n1".into(),
            reason: reason.into(),
        }
    }

    fn cluster(scheduler: Option<Row>, workers: Vec<Row>) -> ClusterView {
        let n = |s: RowState| workers.iter().filter(|r| r.state == s).count();
        ClusterView {
            cluster: "ana".into(),
            connected: n(RowState::Connected),
            pending: n(RowState::Pending),
            running: n(RowState::Running),
            failed: n(RowState::Failed),
            ended: n(RowState::Ended),
            pools: Default::default(),
            scheduler,
            workers,
            scheduler_address: None,
            dashboard_address: None,
            dashboard_link: None,
            scheduler_file: "/h/.dask-spank/clusters/ana/scheduler.json".into(),
        }
    }

    #[test]
    fn a_cluster_is_hopeless_only_when_the_wanted_share_cannot_be_reached() {
        let sched = || Some(row("5", "scheduler", RowState::Running, ""));
        assert_eq!(
            hopeless(&cluster(None, vec![]), 50.0).as_deref(),
            Some("cluster 'ana' has no scheduler job")
        );
        let gone = cluster(Some(row("5", "scheduler", RowState::Failed, "OOM")), vec![]);
        assert_eq!(
            hopeless(&gone, 50.0).as_deref(),
            Some("the scheduler job 5 failed: OOM")
        );
        let half = cluster(
            sched(),
            vec![
                row("6_1", "worker", RowState::Failed, "bad env"),
                row("6_2", "worker", RowState::Ended, "walltime"),
                row("6_3", "worker", RowState::Connected, ""),
                row("6_4", "worker", RowState::Pending, "Priority"),
            ],
        );
        // An ended job (its walltime: replaced) is no longer counted; 2 of
        // the 3 others left: 50% can still be reached, 75% cannot.
        assert_eq!(hopeless(&half, 50.0), None);
        assert_eq!(
            hopeless(&half, 75.0).as_deref(),
            Some("only 2 of 3 worker jobs are left, fewer than 75%; 6_1: bad env; 6_2: walltime")
        );
        // No worker job yet: not hopeless (they may come).
        assert_eq!(hopeless(&cluster(sched(), vec![]), 100.0), None);
    }

    #[test]
    fn a_timeout_says_the_progress_and_what_a_pending_job_waits_for() {
        let v = cluster(
            Some(row("5", "scheduler", RowState::Running, "")),
            vec![
                row("6_1", "worker", RowState::Connected, ""),
                row("6_2", "worker", RowState::Pending, "QOSMaxJobsPerUserLimit"),
            ],
        );
        assert_eq!(
            timeout_error(&v, "1 of 2 worker jobs connected (50%), 1 pending", 60, 100.0),
            "timed out after 60s: 1 of 2 worker jobs connected (50%), 1 pending (wanted 100%); pending jobs wait for: QOSMaxJobsPerUserLimit"
        );
        let none_pending = cluster(None, vec![row("6_1", "worker", RowState::Running, "")]);
        assert_eq!(
            timeout_error(&none_pending, "0 of 1", 5, 50.0),
            "timed out after 5s: 0 of 1 (wanted 50%)"
        );
    }
}

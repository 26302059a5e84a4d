//! `dask-spank up`: one scheduler job and N worker jobs, with plain sbatch.

use crate::cluster::{parse_name, print_connect, private_dir_of, Res};
use crate::slurm::{self, squeue};
use crate::target::parse_range;
use dask_spank_common::paths::scheduler_file;
use dask_spank_common::records::{ClusterDir, Target, WorkerArgs};
use dask_spank_common::ClusterName;

/// Start a cluster: one scheduler job and N worker jobs.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Example:\n  dask-spank up ana --workers 100 --worker-mem 3G --wait 80")]
pub struct Args {
    /// Cluster name (letters, digits, '-', '_', '.').
    pub name: String,
    /// Number of worker jobs (an sbatch array), kept by the scheduler job.
    #[arg(long, default_value_t = 1)]
    pub workers: u32,
    /// Size the cluster with dask's adaptive target instead, between MIN and
    /// MAX worker jobs (MIN:MAX), in the scheduler job.
    #[arg(long, value_name = "MIN:MAX", conflicts_with = "workers")]
    pub adapt: Option<String>,
    /// Memory of each worker job (--mem), e.g. 3G.
    #[arg(long)]
    pub worker_mem: Option<String>,
    /// Cpus of each worker job (--cpus-per-task) = dask threads.
    #[arg(long)]
    pub worker_cpus: Option<u32>,
    /// Time limit of worker jobs (--time), e.g. 2:00:00.
    #[arg(long)]
    pub worker_time: Option<String>,
    /// Memory of the scheduler job.
    #[arg(long)]
    pub scheduler_mem: Option<String>,
    /// venv or conda prefix whose python has distributed (--dask-env).
    #[arg(long)]
    pub env: Option<String>,
    /// Wait until this percentage of worker jobs is connected.
    #[arg(long, value_name = "PERCENT")]
    pub wait: Option<f64>,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
    #[arg(long)]
    pub json: bool,
    /// Show the sbatch command lines and the job options once the site's
    /// defaults are in (the plugin's own planning), and submit nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// The sbatch options of the scheduler job and of the worker jobs.
fn submission(u: &Args, c: &ClusterName) -> (Vec<String>, Vec<String>) {
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
    (sargs, wargs)
}

/// `--dry-run`: what each submission would be.
fn dry_run(u: &Args, c: &ClusterName) -> Res {
    let (sargs, mut wargs) = submission(u, c);
    let workers = u.adapt.as_ref().map_or(u.workers, |_| 1).max(1);
    wargs.push(format!("--array=1-{workers}"));
    let sched = slurm::sbatch_dry_run(&sargs)?;
    let work = slurm::sbatch_dry_run(&wargs)?;
    if u.json {
        println!(
            "{}",
            serde_json::json!({"scheduler": sched, "workers": work})
        );
        return Ok(());
    }
    for (what, v) in [("scheduler job", &sched), ("worker jobs", &work)] {
        let line: Vec<String> = v["sbatch"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str()).map(shell_word).collect())
            .unwrap_or_default();
        println!("{what}: {}", line.join(" "));
        if let Some(vals) = v["values"].as_object() {
            let shown: Vec<String> = vals
                .iter()
                .map(|(k, x)| format!("{k}={}", x.as_str().unwrap_or_default()))
                .collect();
            println!("  {}", shown.join(" "));
        }
    }
    println!("nothing was submitted (dry run)");
    Ok(())
}

/// A word as a shell would need it.
fn shell_word(w: &str) -> String {
    if !w.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@".contains(c)) {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

pub fn run(u: Args) -> Res {
    let c = parse_name(&u.name)?;
    if u.dry_run {
        return dry_run(&u, &c);
    }
    let queued = squeue(Some(c.as_str()))?;
    if !queued.is_empty() {
        let ids: Vec<&str> = queued.iter().map(|q| q.label.as_str()).collect();
        return Err(format!(
            "cluster '{c}' is already in use by jobs {} (dask-spank down {c} first, or pick another name)",
            ids.join(", ")
        ));
    }
    let dir = ClusterDir(private_dir_of(&c)?);
    dir.clear();
    let _ = std::fs::remove_file(scheduler_file(dir.path()));
    let (target, first) = match &u.adapt {
        Some(r) => {
            let (lo, hi) = parse_range(r)?;
            (Target::Adapt { adapt: [lo, hi] }, lo)
        }
        None => (Target::Workers { workers: u.workers }, u.workers),
    };
    // Before the jobs: the keeper of the scheduler job reads it.
    let (sargs, wargs) = submission(&u, &c);
    let _ = dir.write_worker_args(&WorkerArgs {
        args: wargs.clone(),
        source: "up".into(),
    });
    crate::target::record(&dir, &target)?;
    let sched = slurm::sbatch(&sargs)?;
    let workers = if first > 0 {
        let mut a = wargs.clone();
        a.push(format!("--array=1-{first}"));
        match slurm::sbatch(&a) {
            Ok(id) => Some(id),
            // Over a queue limit: the scheduler job's keeper submits what
            // the limit allows, and the rest when it allows.
            Err(e) if slurm::is_queue_limit(&e) => {
                eprintln!(
                    "dask-spank: {first} worker jobs would pass your queue limit now ({e}); \
                     the scheduler job submits what the limit allows, the rest later \
                     (`dask-spank status {c}` says why the cluster is short)"
                );
                None
            }
            Err(e) => {
                let _ = slurm::scancel(std::slice::from_ref(&sched));
                return Err(e);
            }
        }
    } else {
        None
    };
    let sf = scheduler_file(dir.path());

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
        print_connect(&c, &sf.to_string_lossy());
    }
    match u.wait {
        Some(p) => super::wait::run(super::wait::Args {
            name: u.name,
            percent: p,
            timeout: u.timeout,
            json: u.json,
            scheduler_job: Some(sched),
        }),

        None => Ok(()),
    }
}

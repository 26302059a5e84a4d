//! `dask-spank up`: one scheduler job and N worker jobs, with plain sbatch.

use crate::cluster::{parse_name, print_connect, private_dir_of, Res};
use crate::pools::{self, PoolSpec};
use crate::slurm::{self, squeue};
use crate::target::parse_range;
use dask_spank_common::paths::scheduler_file;
use dask_spank_common::records::{ClusterDir, Target, WorkerArgs};
use dask_spank_common::ClusterName;
use std::path::Path;

/// Start a cluster: one scheduler job and N worker jobs.
#[derive(clap::Args, Debug, Clone)]
#[command(
    after_help = "Examples:\n  dask-spank up ana --workers 100 --worker-mem 3G --wait 80\n  dask-spank up ana --workers 8 --pool gpu:workers=2,gres=gpu:1,resources=GPU=1"
)]
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
    /// Account of both jobs (--account), where the site lets you choose.
    #[arg(long)]
    pub account: Option<String>,
    /// QOS of both jobs (--qos).
    #[arg(long)]
    pub qos: Option<String>,
    /// Partition of the worker jobs (--partition), where the site lets you choose.
    #[arg(long)]
    pub worker_partition: Option<String>,
    /// Partition of the scheduler job.
    #[arg(long)]
    pub scheduler_partition: Option<String>,
    /// Node features the worker jobs need (--constraint).
    #[arg(long)]
    pub constraint: Option<String>,
    /// Generic resources of each worker job (--gres), e.g. gpu:1.
    #[arg(long)]
    pub gres: Option<String>,
    /// A variable for both jobs' environment, VAR=VALUE (repeatable).
    #[arg(long, value_name = "VAR=VALUE")]
    pub export: Vec<String>,
    /// A dask worker resource, NAME=AMOUNT (repeatable), e.g. GPU=1: tasks
    /// submitted with resources={"GPU": 1} run only there.
    #[arg(long, value_name = "NAME=AMOUNT")]
    pub worker_resources: Vec<String>,
    /// Where workers spill and keep their scratch files.
    #[arg(long, value_name = "DIR")]
    pub worker_local_directory: Option<String>,
    /// A module or script each worker preloads (repeatable).
    #[arg(long, value_name = "MODULE")]
    pub worker_preload: Vec<String>,
    /// Any other sbatch option for the worker jobs (repeatable), e.g.
    /// --worker-sbatch=--reservation=ana.
    #[arg(long, value_name = "OPTION", allow_hyphen_values = true)]
    pub worker_sbatch: Vec<String>,
    /// A pool of other workers (repeatable): NAME:KEY=VALUE,... with keys
    /// workers=N or adapt=MIN:MAX, gres, resources=NAME=AMOUNT
    /// (repeatable), partition, mem, cpus, time, constraint, sbatch=OPTION,
    /// worker_class=MODULE.CLASS (a distributed.Worker subclass).
    /// Tasks submitted with resources={"GPU": 1} run on a pool with
    /// resources=GPU=1 only; --export, --env, --account, --qos,
    /// --worker-local-directory and --worker-preload apply to it too.
    #[arg(long, value_name = "NAME:KEY=VALUE,...")]
    pub pool: Vec<String>,
    /// Pools from a TOML file, a table per pool with the keys of --pool
    /// ([gpu] workers = 4, gres = "gpu:1", resources = { GPU = 1 }).
    #[arg(long, value_name = "FILE")]
    pub pools: Option<std::path::PathBuf>,
    /// Any other sbatch option for the scheduler job (repeatable).
    #[arg(long, value_name = "OPTION", allow_hyphen_values = true)]
    pub scheduler_sbatch: Vec<String>,
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

fn opt(flag: &str, v: &Option<String>) -> Option<String> {
    v.as_ref().map(|v| format!("--{flag}={v}"))
}

/// The options of every job of the cluster.
fn common(u: &Args, c: &ClusterName) -> Vec<String> {
    let mut common = vec![format!("--dask-cluster={c}")];
    common.extend(opt("dask-env", &u.env));
    common.extend(opt("account", &u.account));
    common.extend(opt("qos", &u.qos));
    common
}

/// A pool's worker jobs: the cluster's options and the pool's own (none of
/// the default pool's `--worker-*` sbatch options: the site's defaults,
/// or the pool's, fill them in).
fn pool_submission(u: &Args, c: &ClusterName, p: &PoolSpec) -> Vec<String> {
    let mut args = vec![
        "--dask-role=worker".to_string(),
        format!("--dask-pool={}", p.name),
    ];
    args.extend(common(u, c));
    args.extend(p.sbatch.iter().cloned());
    args
}

/// A pool's worker jobs' environment (see `worker_env`).
fn pool_env(u: &Args, p: &PoolSpec) -> Result<Vec<(String, String)>, String> {
    let mut env = worker_env(
        &u.export,
        &p.resources,
        u.worker_local_directory.as_deref(),
        &u.worker_preload,
    )?;
    if let Some(class) = &p.worker_class {
        env.push((pools::WORKER_CLASS_ENV.to_string(), class.clone()));
    }
    Ok(env)
}

/// The sbatch options of the scheduler job and of the worker jobs.
fn submission(u: &Args, c: &ClusterName) -> (Vec<String>, Vec<String>) {
    let common = common(u, c);
    let mut sargs = vec!["--dask-role=scheduler".to_string()];
    sargs.extend(common.clone());
    sargs.extend(opt("mem", &u.scheduler_mem));
    sargs.extend(opt("partition", &u.scheduler_partition));
    sargs.extend(u.scheduler_sbatch.iter().cloned());
    let mut wargs = vec!["--dask-role=worker".to_string()];
    wargs.extend(common);
    wargs.extend(opt("mem", &u.worker_mem));
    wargs.extend(u.worker_cpus.map(|n| format!("--cpus-per-task={n}")));
    wargs.extend(opt("time", &u.worker_time));
    wargs.extend(opt("partition", &u.worker_partition));
    wargs.extend(opt("constraint", &u.constraint));
    wargs.extend(opt("gres", &u.gres));
    wargs.extend(u.worker_sbatch.iter().cloned());
    (sargs, wargs)
}

/// The worker jobs' environment: the user's `--export` variables and the
/// dask worker options, as dask's configuration variables (dask reads
/// them; the agent starts dask with the job's environment).
pub fn worker_env(
    export: &[String],
    resources: &[String],
    local_directory: Option<&str>,
    preload: &[String],
) -> Result<Vec<(String, String)>, String> {
    let mut env = exported(export)?;
    let mut named = Vec::new();
    for r in resources {
        let (name, amount) = r
            .split_once('=')
            .filter(|(n, a)| {
                !n.is_empty()
                    && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && a.parse::<f64>().is_ok()
            })
            .ok_or_else(|| format!("--worker-resources={r}: must be NAME=AMOUNT, e.g. GPU=1"))?;
        named.push(format!("{name:?}: {amount}"));
    }
    // One variable holding the whole mapping: dask lowercases the keys of
    // nested variables (…__RESOURCES__GPU would be "gpu"), not a value's.
    if !named.is_empty() {
        env.push((
            "DASK_DISTRIBUTED__WORKER__RESOURCES".into(),
            format!("{{{}}}", named.join(", ")),
        ));
    }
    if let Some(d) = local_directory {
        env.push(("DASK_TEMPORARY_DIRECTORY".into(), d.to_string()));
    }
    if !preload.is_empty() {
        let list: Vec<String> = preload.iter().map(|p| format!("{p:?}")).collect();
        env.push((
            "DASK_DISTRIBUTED__WORKER__PRELOAD".into(),
            format!("[{}]", list.join(", ")),
        ));
    }
    Ok(env)
}

/// The `--export VAR=VALUE` variables.
pub fn exported(export: &[String]) -> Result<Vec<(String, String)>, String> {
    export
        .iter()
        .map(|e| {
            e.split_once('=')
                .filter(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                })
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| format!("--export={e}: must be VAR=VALUE"))
        })
        .collect()
}

/// `--dry-run`: what each submission would be.
fn dry_run(u: &Args, c: &ClusterName) -> Res {
    let (sargs, mut wargs) = submission(u, c);
    let workers = u.adapt.as_ref().map_or(u.workers, |_| 1).max(1);
    // Where the real submission puts it: before the rest.
    wargs.insert(0, format!("--array=1-{workers}"));
    worker_env(
        &u.export,
        &u.worker_resources,
        u.worker_local_directory.as_deref(),
        &u.worker_preload,
    )?;
    let sched = slurm::sbatch_dry_run(&sargs)?;
    let work = slurm::sbatch_dry_run(&wargs)?;
    let mut planned = serde_json::Map::new();
    for p in pools::parse_all(&u.pool, u.pools.as_deref())? {
        pool_env(u, &p)?;
        planned.insert(p.name.to_string(), pool_plan(u, c, &p)?);
    }
    if u.json {
        println!(
            "{}",
            serde_json::json!({"scheduler": sched, "workers": work, "pools": planned})
        );
        return Ok(());
    }
    let mut shown = vec![
        ("scheduler job".to_string(), &sched),
        ("worker jobs".into(), &work),
    ];
    shown.extend(
        planned
            .iter()
            .map(|(p, v)| (format!("pool {p} worker jobs"), v)),
    );
    for (what, v) in shown {
        let line: Vec<String> = v["sbatch"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str())
                    .map(shell_word)
                    .collect()
            })
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

/// The plugin's plan of a pool's first worker jobs (at least one: its
/// site limits are checked even when it starts empty).
fn pool_plan(u: &Args, c: &ClusterName, p: &PoolSpec) -> Result<serde_json::Value, String> {
    let mut args = vec![format!("--array=1-{}", p.target().1.max(1))];
    args.extend(pool_submission(u, c, p));
    slurm::sbatch_dry_run(&args).map_err(|e| format!("--pool {}: {e}", p.name))
}

/// A word as a shell would need it.
fn shell_word(w: &str) -> String {
    if !w.is_empty()
        && w.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@".contains(c))
    {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

/// Refuse a cluster name that queued or running jobs still carry.
fn refuse_name_in_use(c: &ClusterName) -> Res {
    let queued = squeue(Some(c.as_str()))?;
    if !queued.is_empty() {
        let ids: Vec<&str> = queued.iter().map(|q| q.label.as_str()).collect();
        return Err(format!(
            "cluster '{c}' is already in use by jobs {} (dask-spank down {c} first, or pick another name)",
            ids.join(", ")
        ));
    }
    Ok(())
}

/// The cluster's private directory, emptied of a former cluster's records.
fn fresh_dir(c: &ClusterName) -> Result<ClusterDir, String> {
    let dir = ClusterDir(private_dir_of(c)?);
    dir.clear();
    dir.clear_pools();
    let _ = std::fs::remove_file(scheduler_file(dir.path()));
    Ok(dir)
}

/// The size the scheduler job keeps, and how many worker jobs to submit now.
fn target_of(u: &Args) -> Result<(Target, u32), String> {
    Ok(match &u.adapt {
        Some(r) => {
            let (lo, hi) = parse_range(r)?;
            (Target::Adapt { adapt: [lo, hi] }, lo)
        }
        None => (Target::Workers { workers: u.workers }, u.workers),
    })
}

/// This process's environment with `extra` after it (so `extra` wins).
fn with(extra: &[(String, String)]) -> Vec<(String, String)> {
    std::env::vars().chain(extra.iter().cloned()).collect()
}

/// Submit the first `first` worker jobs as one array: its id, or none when
/// there are none or a queue limit leaves them to the scheduler job's
/// keeper. Any other failure cancels the scheduler job `sched`.
fn submit_workers(
    c: &ClusterName,
    first: u32,
    wargs: &[String],
    wenv: &[(String, String)],
    sched: &str,
) -> Result<Option<String>, String> {
    if first == 0 {
        return Ok(None);
    }
    let mut a = vec![format!("--array=1-{first}")];
    a.extend(wargs.iter().cloned());
    match slurm::sbatch_in(&a, Some(&with(wenv))) {
        Ok(id) => Ok(Some(id)),
        // Over a queue limit: the scheduler job's keeper submits what
        // the limit allows, and the rest when it allows.
        Err(e) if slurm::is_queue_limit(&e) => {
            eprintln!(
                "dask-spank: {first} worker jobs would pass your queue limit now ({e}); \
                 the scheduler job submits what the limit allows, the rest later \
                 (`dask-spank status {c}` says why the cluster is short)"
            );
            Ok(None)
        }
        Err(e) => {
            let _ = slurm::scancel(&[sched.to_string()]);
            Err(e)
        }
    }
}

/// Print the submitted jobs and how to connect (or them as JSON).
fn print_started(
    json: bool,
    c: &ClusterName,
    sched: &str,
    workers: Option<&str>,
    pools: &[(String, Option<String>)],
    sf: &Path,
) {
    if json {
        let pools: serde_json::Map<String, serde_json::Value> = pools
            .iter()
            .map(|(p, a)| (p.clone(), serde_json::json!(a)))
            .collect();
        println!(
            "{}",
            serde_json::json!({"cluster": c.as_str(), "scheduler_job": sched, "worker_array": workers, "pool_arrays": pools, "scheduler_file": sf})
        );
    } else {
        let pools: String = pools
            .iter()
            .map(|(p, a)| format!(", pool {p} array {}", a.as_deref().unwrap_or("-")))
            .collect();
        println!(
            "cluster '{c}': scheduler job {sched}, worker array {}{pools}",
            workers.unwrap_or("-")
        );
        print_connect(c, &sf.to_string_lossy());
    }
}

/// Record each pool's options and size, for the keeper (before the
/// scheduler job: it reads them from its start), after the site's policy
/// planned its first jobs: a pool the site refuses fails `up` with the
/// plugin's line before anything is submitted.
fn record_pools(u: &Args, c: &ClusterName, dir: &ClusterDir) -> Result<Vec<Pool>, String> {
    let mut out = vec![];
    for p in pools::parse_all(&u.pool, u.pools.as_deref())? {
        let env = pool_env(u, &p)?;
        pool_plan(u, c, &p)?;
        let args = pool_submission(u, c, &p);
        let (target, first) = p.target();
        dir.write_worker_args_of(
            Some(&p.name),
            &WorkerArgs {
                args: args.clone(),
                env: env.clone(),
                source: "up".into(),
                resources: pools::amounts(&p.resources),
            },
        )
        .and_then(|()| dir.write_target_of(Some(&p.name), &target))
        .map_err(|e| format!("cannot record pool {}: {e}", p.name))?;
        out.push(Pool {
            name: p.name.to_string(),
            first,
            args,
            env,
        });
    }
    Ok(out)
}

/// A pool's first submission.
struct Pool {
    name: String,
    first: u32,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

/// Submit each pool's first worker jobs; a refusal cancels what `up`
/// submitted (`submitted`: the scheduler job first).
fn submit_pools(
    c: &ClusterName,
    pools: &[Pool],
    submitted: &mut Vec<String>,
) -> Result<Vec<(String, Option<String>)>, String> {
    let mut arrays = vec![];
    for p in pools {
        match submit_workers(c, p.first, &p.args, &p.env, &submitted[0]) {
            Ok(id) => {
                submitted.extend(id.clone());
                arrays.push((p.name.clone(), id));
            }
            Err(e) => {
                let _ = slurm::scancel(submitted);
                return Err(format!("--pool {}: {e}", p.name));
            }
        }
    }
    Ok(arrays)
}

pub fn run(u: Args) -> Res {
    let c = parse_name(&u.name)?;
    if u.dry_run {
        return dry_run(&u, &c);
    }
    refuse_name_in_use(&c)?;
    let dir = fresh_dir(&c)?;
    let pools = record_pools(&u, &c, &dir)?;
    let (target, first) = target_of(&u)?;
    // Before the jobs: the keeper of the scheduler job reads it.
    let (sargs, wargs) = submission(&u, &c);
    let wenv = worker_env(
        &u.export,
        &u.worker_resources,
        u.worker_local_directory.as_deref(),
        &u.worker_preload,
    )?;
    let senv = exported(&u.export)?;
    // The site's rules for the worker jobs before any job, as for the
    // pools: worker options the plugin refuses fail `up` with nothing
    // submitted (not a scheduler job started, then cancelled).
    if first > 0 {
        let mut planned = vec![format!("--array=1-{first}")];
        planned.extend(wargs.iter().cloned());
        slurm::sbatch_dry_run(&planned)?;
    }
    let _ = dir.write_worker_args(&WorkerArgs {
        args: wargs.clone(),
        env: wenv.clone(),
        source: "up".into(),
        resources: pools::amounts(&u.worker_resources),
    });
    crate::target::record(&dir, &target)?;
    let sched = slurm::sbatch_in(&sargs, Some(&with(&senv)))?;
    let workers = submit_workers(&c, first, &wargs, &wenv, &sched)?;
    let mut submitted: Vec<String> = std::iter::once(sched.clone())
        .chain(workers.clone())
        .collect();
    let arrays = submit_pools(&c, &pools, &mut submitted)?;
    let sf = scheduler_file(dir.path());
    print_started(u.json, &c, &sched, workers.as_deref(), &arrays, &sf);
    match u.wait {
        Some(p) => super::wait::run(super::wait::Args {
            name: u.name,
            percent: p,
            timeout: u.timeout,
            json: u.json,
            pool: None,
            scheduler_job: Some(sched),
        }),

        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Up {
        #[command(flatten)]
        a: Args,
    }

    /// `dask-spank up` with these words, as clap parses them.
    fn up(words: &[&str]) -> Result<Args, clap::Error> {
        Up::try_parse_from(std::iter::once("up").chain(words.iter().copied())).map(|u| u.a)
    }

    #[test]
    fn every_option_goes_to_its_job_and_the_raw_sbatch_options_last() {
        let u = up(&[
            "ana",
            "--workers",
            "3",
            "--worker-mem",
            "3G",
            "--worker-cpus",
            "4",
            "--worker-time",
            "2:00:00",
            "--scheduler-mem",
            "1G",
            "--env",
            "/venv",
            "--account",
            "acc",
            "--qos",
            "q",
            "--worker-partition",
            "wp",
            "--scheduler-partition",
            "sp",
            "--constraint",
            "ib",
            "--gres",
            "gpu:1",
            "--worker-sbatch=--reservation=r",
            "--scheduler-sbatch",
            "--exclusive",
        ])
        .unwrap();
        let c: ClusterName = "ana".parse().unwrap();
        let (sargs, wargs) = submission(&u, &c);
        let common = [
            "--dask-cluster=ana",
            "--dask-env=/venv",
            "--account=acc",
            "--qos=q",
        ];
        let mut want_s = vec!["--dask-role=scheduler"];
        want_s.extend(common);
        want_s.extend(["--mem=1G", "--partition=sp", "--exclusive"]);
        assert_eq!(sargs, want_s);
        let mut want_w = vec!["--dask-role=worker"];
        want_w.extend(common);
        want_w.extend([
            "--mem=3G",
            "--cpus-per-task=4",
            "--time=2:00:00",
            "--partition=wp",
            "--constraint=ib",
            "--gres=gpu:1",
            "--reservation=r",
        ]);
        assert_eq!(wargs, want_w);
        // Nothing given: the role and the cluster only.
        let (sargs, wargs) = submission(&up(&["ana"]).unwrap(), &c);
        assert_eq!((sargs.len(), wargs.len()), (2, 2));
    }

    #[test]
    fn a_pools_jobs_have_its_own_options_not_the_default_pools() {
        let u = up(&["ana", "--worker-mem", "3G", "--qos", "q", "--export", "A=1"]).unwrap();
        let c: ClusterName = "ana".parse().unwrap();
        let p = pools::parse("gpu:workers=2,gres=gpu:1,resources=GPU=1,worker_class=m.W").unwrap();
        assert_eq!(
            pool_submission(&u, &c, &p),
            [
                "--dask-role=worker",
                "--dask-pool=gpu",
                "--dask-cluster=ana",
                "--qos=q",
                "--gres=gpu:1"
            ]
        );
        let env = pool_env(&u, &p).unwrap();
        let want = [
            ("A", "1"),
            ("DASK_DISTRIBUTED__WORKER__RESOURCES", "{\"GPU\": 1}"),
            (pools::WORKER_CLASS_ENV, "m.W"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        assert_eq!(env, want);
    }

    #[test]
    fn an_adaptive_cluster_starts_with_its_minimum() {
        let t = |words: &[&str]| target_of(&up(words).unwrap());
        assert_eq!(t(&["ana"]), Ok((Target::Workers { workers: 1 }, 1)));
        assert_eq!(
            t(&["ana", "--workers", "0"]),
            Ok((Target::Workers { workers: 0 }, 0))
        );
        assert_eq!(
            t(&["ana", "--adapt", "2:8"]),
            Ok((Target::Adapt { adapt: [2, 8] }, 2))
        );
        assert!(t(&["ana", "--adapt", "8:2"]).is_err());
        // Both at once is refused by the parser.
        let both = up(&["ana", "--workers", "3", "--adapt", "1:2"])
            .err()
            .unwrap();
        assert_eq!(both.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    #[test]
    fn dry_run_lines_quote_only_the_words_a_shell_would_split() {
        assert_eq!(shell_word("--gres=gpu:1"), "--gres=gpu:1");
        assert_eq!(shell_word("/p/a_b.sh,x@y+z"), "/p/a_b.sh,x@y+z");
        assert_eq!(shell_word(""), "''");
        assert_eq!(shell_word("a b"), "'a b'");
        assert_eq!(shell_word("$HOME"), "'$HOME'");
        assert_eq!(shell_word("it's"), "'it'\\''s'");
    }

    #[test]
    fn dask_worker_options_become_dasks_configuration_variables() {
        let env = worker_env(
            &["FOO=a,b".into()],
            &["GPU=1".into(), "MEM=2e9".into()],
            Some("/scratch/u"),
            &["mymod".into(), "/p/s.py".into()],
        )
        .unwrap();
        assert_eq!(
            env,
            [
                ("FOO", "a,b"),
                (
                    "DASK_DISTRIBUTED__WORKER__RESOURCES",
                    "{\"GPU\": 1, \"MEM\": 2e9}"
                ),
                ("DASK_TEMPORARY_DIRECTORY", "/scratch/u"),
                (
                    "DASK_DISTRIBUTED__WORKER__PRELOAD",
                    "[\"mymod\", \"/p/s.py\"]"
                ),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        assert!(worker_env(&[], &["GPU".into()], None, &[])
            .unwrap_err()
            .contains("--worker-resources=GPU: must be NAME=AMOUNT"));
        assert!(worker_env(&["=x".into()], &[], None, &[])
            .unwrap_err()
            .contains("--export==x"));
    }
}

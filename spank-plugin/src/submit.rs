//! What the plugin adds to an sbatch command line: site defaults for what
//! the user left out, and a job script when none was given. Pure logic; the
//! allocator glue (`allocator.rs`) applies it by re-executing sbatch with
//! the extra arguments inserted right after argv[0], where the user's own
//! flags, coming later, still win.

use crate::sbatch_args::Request;
use dask_spank_common::config::Config;
use dask_spank_common::names::PoolName;
use dask_spank_common::paths::log_pattern;
use dask_spank_common::policy::check_submit;
use dask_spank_common::{ClusterName, Role};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitPlan {
    /// Arguments to insert after argv[0].
    pub insert: Vec<String>,
    /// The log directory to create before sbatch runs, when the plugin set
    /// the output path (Slurm does not create missing directories).
    pub log_dir: Option<PathBuf>,
}

/// Quote a word for /bin/sh.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The job script supplied when the user gives none: hand over to the agent.
pub fn supplied_script(cfg: &Config) -> String {
    format!(
        "exec {} attach",
        sh_quote(&cfg.attach_cmd.to_string_lossy())
    )
}

/// The plugstack.conf key that set an argument the plan inserted, for the
/// options Slurm itself can reject (a partition, licence or account the
/// cluster does not have, a limit above the partition's).
pub fn policy_key(role: Role, inserted: &str) -> Option<String> {
    let (opt, _) = inserted.split_once('=')?;
    let r = role.as_str();
    Some(match opt {
        "--partition" => format!("{r}_partition"),
        "--licenses" => format!("{r}_licenses"),
        "--account" => "account".into(),
        "--mem" => format!("{r}_mem"),
        "--time" => format!("{r}_time"),
        "--cpus-per-task" if role == Role::Worker => "worker_cpus".into(),
        _ => return None,
    })
}

/// When sbatch failed with the site's values inserted: the one line that
/// tells the user which of them Slurm rejected, and which key set it.
/// `stderr` is what sbatch printed. None when the failure names none of
/// the inserted values.
pub fn explain_rejection(role: Role, inserted: &[String], stderr: &str) -> Option<String> {
    let err = stderr.to_ascii_lowercase();
    let rejected = |opt: &str| -> bool {
        let words: &[&str] = match opt {
            "--partition" => &["invalid partition", "partition not available", "partition"],
            "--licenses" => &["license"],
            // Not "accounting/QOS policy" (a queue limit such as
            // MaxSubmitJobs, which no inserted value caused).
            "--account" => &["invalid account"],
            "--mem" => &["memory"],
            "--time" => &["requested time limit"],
            "--cpus-per-task" => &["processors", "cpu count"],
            _ => &[],
        };
        words.iter().any(|w| err.contains(w))
    };
    let blamed: Vec<String> = inserted
        .iter()
        .filter_map(|a| {
            let key = policy_key(role, a)?;
            let (opt, _) = a.split_once('=')?;
            rejected(opt).then(|| format!("{a} was set by dask-spank's {key}"))
        })
        .collect();
    if blamed.is_empty() {
        return None;
    }
    Some(format!(
        "{} (the site policy in plugstack.conf); tell your site administrator",
        blamed.join(", ")
    ))
}

/// Plan the submission, or explain in one line why it is refused.
pub fn plan(
    req: &Request,
    cfg: &Config,
    role: Role,
    cluster: &ClusterName,
    pool: Option<&PoolName>,
    cwd: &Path,
    primary_group: &str,
) -> Result<SubmitPlan, String> {
    let mut insert = Vec::new();
    let mut log_dir = None;
    // The job name identifies the cluster's jobs, and a pool's (squeue -n;
    // the node agent checks it: see names::pool_job_name).
    let name = dask_spank_common::names::pool_job_name(role, cluster.as_str(), pool);
    match req.get("job-name") {
        Some(n) if n != name => {
            return Err(format!(
                "--job-name={n} is not allowed: dask-spank names this job {name} (it identifies the cluster's jobs)"
            ))
        }
        Some(_) => {}
        None => insert.push(format!("--job-name={name}")),
    }
    if !req.has("output") {
        let array = req.has("array");
        insert.push(format!(
            "--output={}",
            log_pattern(&cfg.log_dir, role, array)
        ));
        let base = match req.get("chdir") {
            Some(d) if d.starts_with('/') => PathBuf::from(d),
            Some(d) => cwd.join(d),
            None => cwd.to_path_buf(),
        };
        log_dir = Some(base.join(&cfg.log_dir));
    }
    insert.extend(check_submit(role, pool, req, &cfg.policy, primary_group)?);
    if req.cmdline.script.is_none() && !req.has("wrap") {
        insert.push(format!("--wrap={}", supplied_script(cfg)));
    }
    Ok(SubmitPlan { insert, log_dir })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sbatch_args::{parse_cmdline, parse_script};

    fn req(cmd: &str, script: &str) -> Request {
        let args: Vec<String> = cmd.split_whitespace().map(String::from).collect();
        Request {
            cmdline: parse_cmdline(&args),
            env_opts: vec![],
            script_opts: parse_script(script),
        }
    }

    /// The keys of the example site policy (packaging/examples/cc-in2p3.conf).
    fn cc_in2p3() -> Config {
        Config::parse([
            "scheduler_partition=htc_daemon",
            "worker_partition=htc",
            "worker_licenses=sps",
            "account=primary-group",
        ])
        .unwrap() // ok: test
    }

    #[test]
    fn rejections_by_slurm_name_the_key_that_set_the_value() {
        let ins: Vec<String> = [
            "--job-name=dask-worker-a",
            "--partition=htc",
            "--licenses=sps",
            "--mem=3G",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            explain_rejection(
                Role::Worker,
                &ins,
                "sbatch: error: Batch job submission failed: Invalid partition name specified\n"
            )
            .as_deref(),
            Some("--partition=htc was set by dask-spank's worker_partition (the site policy in plugstack.conf); tell your site administrator")
        );
        assert_eq!(
            explain_rejection(Role::Worker, &ins, "sbatch: error: Invalid license specification").as_deref(),
            Some("--licenses=sps was set by dask-spank's worker_licenses (the site policy in plugstack.conf); tell your site administrator")
        );
        // The user's own option, or an unrelated failure: nothing to add.
        assert_eq!(
            explain_rejection(Role::Worker, &ins, "sbatch: error: Invalid account"),
            None
        );
        // A queue limit (MaxSubmitJobs): nobody's value to blame, though
        // Slurm's text says "accounting" and "time limits".
        let with_account_and_time = [
            ins.clone(),
            vec!["--account=grp".into(), "--time=2:00:00".into()],
        ]
        .concat();
        assert_eq!(
            explain_rejection(
                Role::Worker,
                &with_account_and_time,
                "sbatch: error: AssocMaxSubmitJobLimit\nsbatch: error: Batch job submission failed: \
                 Job violates accounting/QOS policy (job submit limit, user's size and/or time limits)"
            ),
            None
        );
        assert_eq!(
            explain_rejection(
                Role::Worker,
                &with_account_and_time,
                "sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified"
            )
            .as_deref(),
            // (the pair is what Slurm refused)
            Some("--partition=htc was set by dask-spank's worker_partition, --account=grp was set by dask-spank's account (the site policy in plugstack.conf); tell your site administrator")
        );
        assert_eq!(
            explain_rejection(
                Role::Worker,
                &with_account_and_time,
                "sbatch: error: Batch job submission failed: Requested time limit is invalid (missing or exceeds some limit)"
            )
            .as_deref(),
            Some("--time=2:00:00 was set by dask-spank's worker_time (the site policy in plugstack.conf); tell your site administrator")
        );
        assert_eq!(
            explain_rejection(
                Role::Worker,
                &ins,
                "sbatch: error: Unable to contact slurm controller"
            ),
            None
        );
        assert_eq!(
            policy_key(Role::Scheduler, "--time=8:00:00").as_deref(),
            Some("scheduler_time")
        );
        assert_eq!(policy_key(Role::Scheduler, "--cpus-per-task=1"), None);
        assert_eq!(policy_key(Role::Worker, "--wrap=x"), None);
    }

    #[test]
    fn site_neutral_defaults_insert_no_partition_licence_or_account() {
        let r = req("--dask-role=worker", "");
        let p = plan(
            &r,
            &Config::default(),
            Role::Worker,
            &Default::default(),
            None,
            Path::new("/w"),
            "g",
        )
        .unwrap(); // ok: test
        assert!(!p.insert.iter().any(|a| a.starts_with("--partition")
            || a.starts_with("--licenses")
            || a.starts_with("--account")));
    }

    #[test]
    fn bare_worker_array_gets_name_log_policy_and_script() {
        let cfg = cc_in2p3();
        let r = req("--dask-role=worker --dask-cluster=ana --array=1-100", "");
        let p = plan(
            &r,
            &cfg,
            Role::Worker,
            &"ana".parse().unwrap(), // ok: test
            None,
            Path::new("/home/u"),
            "phys",
        )
        .unwrap(); // ok: test
        assert_eq!(
            p.insert,
            [
                "--job-name=dask-worker-ana",
                "--output=log/dask-worker-%A_%a.log",
                "--partition=htc",
                "--account=phys",
                "--licenses=sps",
                "--ntasks=1",
                "--cpus-per-task=1",
                "--mem=3G",
                "--time=2:00:00",
                "--wrap=exec /usr/bin/dask-spank attach"
            ]
        );
        assert_eq!(p.log_dir, Some(PathBuf::from("/home/u/log")));
    }

    #[test]
    fn user_choices_are_kept() {
        let cfg = cc_in2p3();
        let r = req(
            "-D sub --dask-role=scheduler --mem=2G my.sh",
            "#SBATCH -J dask-scheduler-default\n#SBATCH -t 1:00:00 -A g -p htc_daemon\n",
        );
        let p = plan(
            &r,
            &cfg,
            Role::Scheduler,
            &Default::default(),
            None,
            Path::new("/w"),
            "g",
        )
        .unwrap(); // ok: test
        assert_eq!(
            p.insert,
            [
                "--output=log/dask-scheduler-%j.log",
                "--ntasks=1",
                "--cpus-per-task=1"
            ]
        );
        assert_eq!(p.log_dir, Some(PathBuf::from("/w/sub/log")));
        let r = req("-o out.txt --wrap=true", "");
        let p = plan(
            &r,
            &cfg,
            Role::Worker,
            &Default::default(),
            None,
            Path::new("/w"),
            "g",
        )
        .unwrap(); // ok: test
        assert_eq!(p.insert[0], "--job-name=dask-worker-default");
        assert_eq!(p.log_dir, None);
        assert!(!p.insert.iter().any(|a| a.starts_with("--wrap")));
    }

    #[test]
    fn refusals() {
        let cfg = cc_in2p3();
        let r = req("--dask-role=worker -J mine", "");
        let e = plan(
            &r,
            &cfg,
            Role::Worker,
            &"ana".parse().unwrap(), // ok: test
            None,
            Path::new("/w"),
            "g",
        )
        .unwrap_err();
        assert_eq!(e, "--job-name=mine is not allowed: dask-spank names this job dask-worker-ana (it identifies the cluster's jobs)");
        let r = req("--dask-role=worker", "#SBATCH --mem=64G\n");
        let e = plan(
            &r,
            &cfg,
            Role::Worker,
            &"ana".parse().unwrap(), // ok: test
            None,
            Path::new("/w"),
            "g",
        )
        .unwrap_err();
        assert_eq!(e, "--mem=64G exceeds worker_mem_max=32G");
    }

    #[test]
    fn a_pools_workers_are_named_for_it_and_held_to_its_rules() {
        let cfg = Config::parse(["gres=gpu", "pool_gres_max=gpu=1", "worker_pools=gpu"]).unwrap(); // ok: test
        let gpu: PoolName = "gpu".parse().unwrap(); // ok: test
        let ana: ClusterName = "ana".parse().unwrap(); // ok: test
        let r = req("--dask-role=worker --dask-pool=gpu --gres=gpu:1", "");
        let p = plan(
            &r,
            &cfg,
            Role::Worker,
            &ana,
            Some(&gpu),
            Path::new("/w"),
            "g",
        )
        .unwrap(); // ok: test
        assert_eq!(p.insert[0], "--job-name=dask-worker-ana@gpu");
        // The default pool's name is no pool's.
        let r = req("--dask-role=worker -J dask-worker-ana", "");
        let e = plan(
            &r,
            &cfg,
            Role::Worker,
            &ana,
            Some(&gpu),
            Path::new("/w"),
            "g",
        )
        .unwrap_err();
        assert_eq!(e, "--job-name=dask-worker-ana is not allowed: dask-spank names this job dask-worker-ana@gpu (it identifies the cluster's jobs)");
        let r = req("--dask-role=worker --gres=gpu:2", "");
        let e = plan(
            &r,
            &cfg,
            Role::Worker,
            &ana,
            Some(&gpu),
            Path::new("/w"),
            "g",
        )
        .unwrap_err();
        assert_eq!(
            e,
            "--gres=gpu:2 asks for 2 gpu, more than pool_gres_max=1 for pool gpu"
        );
        let other: PoolName = "other".parse().unwrap(); // ok: test
        let e = plan(
            &req("", ""),
            &cfg,
            Role::Worker,
            &ana,
            Some(&other),
            Path::new("/w"),
            "g",
        )
        .unwrap_err();
        assert_eq!(e, "--dask-pool=other is not allowed: worker_pools=gpu");
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("/usr/bin/x"), "/usr/bin/x");
        assert_eq!(sh_quote("/a b/it's"), "'/a b/it'\\''s'");
    }
}

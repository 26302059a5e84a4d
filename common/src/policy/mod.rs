//! The site policy: what dask-spank jobs may ask for, and the defaults for
//! what they leave out. Set by the admin in plugstack.conf (see `config`),
//! applied at submit (the plugin fills in and rejects), and checked again on
//! the node against what the job really got (the agent, from slurmctld's
//! view of the job), where a user cannot get around it.

use crate::names::{PoolName, Role};
use crate::pool_policy::{self, Gres, PoolPolicy};
use serde::{Deserialize, Serialize};

pub mod rules;

/// Limits and defaults of one role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(deny_unknown_fields))]
pub struct RolePolicy {
    /// Partition the role's jobs must run in (`None`: not enforced).
    pub partition: Option<String>,
    /// Licences the role's jobs must request (names, e.g. `sps`).
    pub licenses: Vec<String>,
    pub cpus: u32,
    pub cpus_max: u32,
    pub mem_mb: u64,
    pub mem_max_mb: u64,
    pub time_s: u64,
    pub time_max_s: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "kind", content = "name", rename_all = "kebab-case")]
pub enum AccountPolicy {
    /// The user's primary group name (CC-IN2P3's rule).
    PrimaryGroup,
    /// One fixed account for every dask job.
    Fixed(String),
    /// Not set, not checked.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(deny_unknown_fields))]
pub struct Policy {
    pub scheduler: RolePolicy,
    pub worker: RolePolicy,
    pub account: AccountPolicy,
    /// Worker jobs (array tasks count one each) per user and cluster.
    pub max_worker_jobs: u32,
    /// The scheduler ends after this long with no tasks and no clients.
    pub idle_timeout_s: u64,
    /// The scheduler ends after this long with no client, tasks or not
    /// (0: never). Defaulted when absent (an older plugin's registration).
    #[serde(default)]
    pub no_client_timeout_s: u64,
    /// Nanny duties of the agent for workers.
    pub nanny: NannyPolicy,
    /// Whether clusters talk TLS with per-cluster credentials. Defaulted
    /// when absent, so that registrations of an older plugin still load.
    #[serde(default)]
    pub tls: TlsMode,
    /// Worker pools and generic resources. Defaulted when absent (an older
    /// plugin's registration: no pool rules, as then).
    #[serde(default)]
    pub pools: PoolPolicy,
}

/// How a cluster's scheduler, workers and clients talk (`tls`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// TLS with a certificate made for each cluster by its scheduler job:
    /// only its owner can connect a client or a worker.
    #[default]
    Required,
    /// Plain TCP: anybody who reaches the scheduler's port can run code as
    /// the cluster's owner.
    Off,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Required => "required",
            TlsMode::Off => "off",
        }
    }
}

impl std::str::FromStr for TlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "required" => Ok(TlsMode::Required),
            "off" => Ok(TlsMode::Off),
            _ => Err("must be required or off".into()),
        }
    }
}

/// How the agent supervises worker processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(deny_unknown_fields))]
pub struct NannyPolicy {
    /// A worker that cannot reach its scheduler leaves after this long.
    pub death_timeout_s: u64,
    /// Give up after this many crashes within `restart_window_s`.
    pub restart_max: u32,
    pub restart_window_s: u64,
    /// Workers retire this long before their job's walltime (`--lifetime`).
    pub lifetime_margin_s: u64,
    /// The scheduler job's keeper submits a worker's successor this long
    /// before the worker retires for its walltime. Defaulted when absent.
    #[serde(default = "default_successor_lead")]
    pub successor_lead_s: u64,
    /// Memory use, in percent of the job's memory, at which a worker is
    /// terminated and restarted (the Nanny's 95%).
    pub memory_kill_percent: u32,
    /// How worker processes start. Defaulted when absent, so that the
    /// state files of an older agent still load after an upgrade.
    #[serde(default)]
    pub start: WorkerStart,
}

fn default_successor_lead() -> u64 {
    600
}

/// How the agent starts a worker process (`worker_start`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum WorkerStart {
    /// A fresh `python -m distributed.cli.dask_worker` each time: nothing
    /// but the worker stays resident.
    #[default]
    Exec,
    /// A per-job fork server imports distributed once and forks each
    /// worker: restarts skip the cold start, at the price of the server's
    /// memory (about that of an idle Python with distributed imported).
    Forkserver,
}

impl std::fmt::Display for WorkerStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WorkerStart::Exec => "exec",
            WorkerStart::Forkserver => "forkserver",
        })
    }
}

impl Default for NannyPolicy {
    fn default() -> Self {
        NannyPolicy {
            death_timeout_s: 60,
            restart_max: 5,
            restart_window_s: 60,
            lifetime_margin_s: 300,
            successor_lead_s: default_successor_lead(),

            memory_kill_percent: 95,
            start: WorkerStart::Exec,
        }
    }
}

const GIB: u64 = 1024;
const HOUR: u64 = 3600;

impl Default for Policy {
    /// Site-neutral: no partition, licence or account is set or checked
    /// (a job gets what Slurm gives any job); one cpu, modest memory and
    /// time. CC-IN2P3's dask4in2p3 policy is an example configuration
    /// (packaging/examples/cc-in2p3.conf).
    fn default() -> Self {
        Policy {
            scheduler: RolePolicy {
                partition: None,
                licenses: vec![],
                cpus: 1,
                cpus_max: 1,
                mem_mb: GIB,
                mem_max_mb: 32 * GIB,
                time_s: 8 * HOUR,
                time_max_s: 8 * HOUR,
            },
            worker: RolePolicy {
                partition: None,
                licenses: vec![],
                cpus: 1,
                cpus_max: 32,
                mem_mb: 3 * GIB,
                mem_max_mb: 32 * GIB,
                time_s: 2 * HOUR,
                time_max_s: 8 * HOUR,
            },
            account: AccountPolicy::None,
            max_worker_jobs: 3000,
            idle_timeout_s: 2 * HOUR,
            no_client_timeout_s: 0,
            nanny: NannyPolicy::default(),
            tls: TlsMode::Required,
            pools: PoolPolicy::default(),
        }
    }
}

impl Policy {
    pub fn role(&self, role: Role) -> &RolePolicy {
        match role {
            Role::Scheduler => &self.scheduler,
            Role::Worker => &self.worker,
        }
    }

    /// The account a user's dask jobs must use, if any.
    pub fn expected_account(&self, primary_group: &str) -> Option<String> {
        match &self.account {
            AccountPolicy::PrimaryGroup => Some(primary_group.to_string()),
            AccountPolicy::Fixed(a) => Some(a.clone()),
            AccountPolicy::None => None,
        }
    }
}

/// What a job asked for at submission: option name (sbatch's long name) to
/// value, command line over environment over `#SBATCH` lines.
pub trait Asked {
    fn get(&self, option: &str) -> Option<&str>;
    fn has(&self, option: &str) -> bool;
}

/// Number of tasks an `--array` specification creates (`1-100`, `1,3,5-9`,
/// `0-99:2`, `1-3000%50`).
pub fn array_task_count(spec: &str) -> Option<u64> {
    let spec = spec.split('%').next()?;
    let mut n = 0u64;
    for part in spec.split(',') {
        let (range, step) = match part.split_once(':') {
            Some((r, s)) => (r, s.parse::<u64>().ok().filter(|s| *s > 0)?),
            None => (part, 1),
        };
        let (a, b) = match range.split_once('-') {
            Some((a, b)) => (a.parse::<u64>().ok()?, b.parse::<u64>().ok()?),
            None => {
                let v = range.parse::<u64>().ok()?;
                (v, v)
            }
        };
        if b < a {
            return None;
        }
        n += (b - a) / step + 1;
    }
    Some(n)
}

/// Check a submission (of `pool`'s workers; None: the default pool)
/// against the policy and return the sbatch arguments that fill in what
/// the user left out. Errors are one line that names the option, the
/// value and the limit.
pub fn check_submit(
    role: Role,
    pool: Option<&PoolName>,
    asked: &dyn Asked,
    policy: &Policy,
    primary_group: &str,
) -> Result<Vec<String>, String> {
    pool_policy::check_submit(role, pool, asked, policy)?;
    let policy = policy.for_pool(role, pool);
    let s = rules::Submit {
        role,
        asked,
        policy: &policy,
        primary_group,
    };
    let mut insert = Vec::new();
    for rule in rules::RULES {
        (rule.submit)(&s, &mut insert)?;
    }
    Ok(insert)
}

/// What slurmctld granted a job (from `scontrol show job` on the node).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFacts {
    pub partition: String,
    pub account: String,
    pub licenses: Vec<String>,
    pub num_tasks: u32,
    pub num_nodes: u32,
    pub cpus: u32,
    /// Memory per node in MiB; 0 means the whole node (no limit).
    pub mem_mb: u64,
    /// None: unlimited.
    pub time_limit_s: Option<u64>,
    /// Generic resources of the job (per job: one node, one task).
    pub gres: Vec<Gres>,
}

/// The authoritative check, on the node, of a job of `pool` (None: the
/// default pool), by the same rules as `check_submit`. `Err` is the
/// reason, one line.
pub fn check_job(
    role: Role,
    pool: Option<&PoolName>,
    facts: &JobFacts,
    policy: &Policy,
    primary_group: &str,
) -> Result<(), String> {
    pool_policy::check_job(
        role,
        pool,
        &facts.gres,
        facts.mem_mb,
        facts.time_limit_s,
        policy,
    )?;
    let policy = policy.for_pool(role, pool);
    let n = rules::OnNode {
        role,
        facts,
        policy: &policy,
        primary_group,
    };
    rules::RULES.iter().try_for_each(|rule| (rule.on_node)(&n))
}

/// When a worker retires, given its job's walltime (or what is left of
/// it): a margin before the end, or half the time for short jobs. The
/// agent passes it to dask (`--lifetime`); the keeper submits successors
/// ahead of it. One rule for both.
pub fn worker_lifetime_s(remaining_s: u64, margin_s: u64) -> u64 {
    if remaining_s > 2 * margin_s {
        remaining_s - margin_s
    } else {
        remaining_s / 2
    }
}

/// Fixtures of the policy checks' tests (here, in `rules` and in
/// pool_policy): the options a test asks for, as the plugin's parsed
/// command line would give them, an example site and a conforming job.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::{AccountPolicy, Asked, JobFacts, Policy};
    use std::collections::HashMap;

    pub struct Map(HashMap<&'static str, &'static str>);
    impl Asked for Map {
        fn get(&self, o: &str) -> Option<&str> {
            self.0.get(o).copied()
        }
        fn has(&self, o: &str) -> bool {
            self.0.contains_key(o)
        }
    }
    pub fn asked(pairs: &[(&'static str, &'static str)]) -> Map {
        Map(pairs.iter().copied().collect())
    }

    /// The example site policy (packaging/examples/cc-in2p3.conf).
    pub fn cc_in2p3() -> Policy {
        let mut p = Policy::default();
        p.scheduler.partition = Some("htc_daemon".into());
        p.worker.partition = Some("htc".into());
        p.worker.licenses = vec!["sps".into()];
        p.account = AccountPolicy::PrimaryGroup;
        p
    }

    /// What slurmctld grants a conforming worker job of that site.
    pub fn good_facts() -> JobFacts {
        JobFacts {
            partition: "htc".into(),
            account: "phys".into(),
            licenses: vec!["sps".into()],
            num_tasks: 1,
            num_nodes: 1,
            cpus: 1,
            mem_mb: 3072,
            time_limit_s: Some(7200),
            gres: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use fixtures::{asked, cc_in2p3, good_facts};

    #[test]
    fn site_neutral_defaults_set_no_partition_licence_or_account() {
        let ins =
            check_submit(Role::Worker, None, &asked(&[]), &Policy::default(), "phys").unwrap();
        assert_eq!(
            ins,
            [
                "--ntasks=1",
                "--cpus-per-task=1",
                "--mem=3G",
                "--time=2:00:00"
            ]
        );
        let any = asked(&[("partition", "any"), ("account", "x"), ("licenses", "y")]);
        assert!(check_submit(Role::Scheduler, None, &any, &Policy::default(), "g").is_ok());
    }

    #[test]
    fn defaults_fill_in_everything() {
        let ins = check_submit(Role::Worker, None, &asked(&[]), &cc_in2p3(), "phys").unwrap();
        assert_eq!(
            ins,
            [
                "--partition=htc",
                "--account=phys",
                "--licenses=sps",
                "--ntasks=1",
                "--cpus-per-task=1",
                "--mem=3G",
                "--time=2:00:00"
            ]
        );
        let ins = check_submit(Role::Scheduler, None, &asked(&[]), &cc_in2p3(), "phys").unwrap();
        assert_eq!(
            ins,
            [
                "--partition=htc_daemon",
                "--account=phys",
                "--ntasks=1",
                "--cpus-per-task=1",
                "--mem=1G",
                "--time=8:00:00"
            ]
        );
    }

    #[test]
    fn allowed_user_values_are_kept() {
        let a = asked(&[
            ("partition", "htc"),
            ("account", "phys"),
            ("licenses", "sps:2,other"),
            ("cpus-per-task", "4"),
            ("mem", "32G"),
            ("time", "8:00:00"),
            ("array", "1-3000%100"),
        ]);
        let ins = check_submit(Role::Worker, None, &a, &cc_in2p3(), "phys").unwrap();
        assert_eq!(ins, ["--ntasks=1"]);
    }

    #[test]
    fn violations_name_option_value_and_limit() {
        let p = cc_in2p3();
        type Case<'a> = (Role, &'a [(&'a str, &'a str)], &'a str);
        let cases: &[Case] = &[
            (Role::Worker, &[("mem", "64G")], "--mem=64G exceeds worker_mem_max=32G"),
            (Role::Scheduler, &[("mem", "33G")], "--mem=33G exceeds scheduler_mem_max=32G"),
            (Role::Worker, &[("mem", "0")], "--mem=0 (all of the node's memory) exceeds worker_mem_max=32G"),
            (Role::Worker, &[("mem-per-cpu", "9G"), ("cpus-per-task", "4")], "--mem-per-cpu=9G with 4 cpus exceeds worker_mem_max=32G"),
            (Role::Worker, &[("cpus-per-task", "33")], "--cpus-per-task=33 exceeds worker_cpus_max=32"),
            (Role::Scheduler, &[("cpus-per-task", "2")], "--cpus-per-task=2 is not allowed: the dask scheduler runs on 1 cpu"),
            (Role::Worker, &[("time", "8:00:01")], "--time=8:00:01 exceeds worker_time_max=8:00:00"),
            (Role::Worker, &[("time", "UNLIMITED")], "--time=UNLIMITED exceeds worker_time_max=8:00:00"),
            (Role::Worker, &[("partition", "debug")], "--partition=debug is not allowed for dask workers: worker_partition=htc"),
            (Role::Scheduler, &[("partition", "htc")], "--partition=htc is not allowed for dask schedulers: scheduler_partition=htc_daemon"),
            (Role::Worker, &[("account", "other")], "--account=other is not allowed for dask jobs: they are charged to account phys (account=primary-group)"),
            (Role::Worker, &[("licenses", "foo")], "--licenses=foo must include sps for dask workers: worker_licenses=sps"),
            (Role::Worker, &[("ntasks", "2")], "--ntasks=2 is not allowed: a dask-spank job runs 1 task"),
            (Role::Worker, &[("nodes", "2")], "--nodes=2 is not allowed: a dask-spank job runs on 1 node"),
            (Role::Worker, &[("array", "1-3001")], "--array=1-3001 asks for 3001 worker jobs, more than max_worker_jobs=3000"),
            (Role::Scheduler, &[("array", "1-2")], "--array=1-2 is not allowed for the scheduler: a dask cluster has one scheduler job"),
            (Role::Worker, &[("mem", "lots")], "--mem=lots: not a memory size (e.g. 3G)"),
            (Role::Worker, &[("time", "2h")], "--time=2h: not a Slurm time (e.g. 2:00:00)"),
            (Role::Worker, &[("cpus-per-task", "0")], "--cpus-per-task=0: not a positive whole number"),
        ];
        for (role, pairs, want) in cases {
            let got = check_submit(*role, None, &asked(pairs), &p, "phys").unwrap_err();
            assert_eq!(&got, want);
        }
    }

    #[test]
    fn unset_partition_and_account_are_not_enforced() {
        let mut p = cc_in2p3();
        p.worker.partition = None;
        p.account = AccountPolicy::None;
        let ins = check_submit(
            Role::Worker,
            None,
            &asked(&[("partition", "any"), ("account", "x")]),
            &p,
            "g",
        )
        .unwrap();
        assert!(!ins
            .iter()
            .any(|a| a.starts_with("--partition") || a.starts_with("--account")));
        p.account = AccountPolicy::Fixed("dask".into());
        let ins = check_submit(Role::Worker, None, &asked(&[]), &p, "g").unwrap();
        assert!(ins.contains(&"--account=dask".to_string()));
    }

    #[test]
    fn array_counts() {
        assert_eq!(array_task_count("1-100"), Some(100));
        assert_eq!(array_task_count("0-99:2"), Some(50));
        assert_eq!(array_task_count("1,3,5-9%2"), Some(7));
        assert_eq!(array_task_count("5-1"), None);
        assert_eq!(array_task_count("x"), None);
    }

    #[test]
    fn node_check_accepts_a_conforming_job() {
        assert_eq!(
            check_job(Role::Worker, None, &good_facts(), &cc_in2p3(), "phys"),
            Ok(())
        );
    }

    #[test]
    fn node_check_refuses_each_violation() {
        let p = cc_in2p3();
        type Edit = fn(&mut JobFacts);
        let cases: &[(Edit, &str)] = &[
            (
                |f| f.partition = "debug".into(),
                "partition debug is not allowed for dask workers: worker_partition=htc",
            ),
            (
                |f| f.account = "other".into(),
                "account other is not allowed: dask jobs of this user are charged to account phys",
            ),
            (
                |f| f.licenses.clear(),
                "licence sps is missing: worker_licenses=sps",
            ),
            (|f| f.num_tasks = 2, "2 tasks: a dask-spank job runs 1 task"),
            (
                |f| f.num_nodes = 2,
                "2 nodes: a dask-spank job runs on 1 node",
            ),
            (|f| f.cpus = 64, "64 cpus exceed worker_cpus_max=32"),
            (
                |f| f.mem_mb = 0,
                "no memory limit (all of the node's memory) exceeds worker_mem_max=32G",
            ),
            (
                |f| f.mem_mb = 65536,
                "memory 64G exceeds worker_mem_max=32G",
            ),
            (
                |f| f.time_limit_s = None,
                "time limit UNLIMITED exceeds worker_time_max=8:00:00",
            ),
            (
                |f| f.time_limit_s = Some(9 * 3600),
                "time limit 9:00:00 exceeds worker_time_max=8:00:00",
            ),
        ];
        for (edit, want) in cases {
            let mut f = good_facts();
            edit(&mut f);
            assert_eq!(
                check_job(Role::Worker, None, &f, &p, "phys").unwrap_err(),
                *want
            );
        }
        let mut f = good_facts();
        f.partition = "htc_daemon".into();
        f.licenses.clear();
        f.cpus = 2;
        assert_eq!(
            check_job(Role::Scheduler, None, &f, &p, "phys").unwrap_err(),
            "2 cpus: the dask scheduler runs on 1 cpu"
        );
    }

    #[test]
    fn worker_lifetimes() {
        assert_eq!(worker_lifetime_s(7200, 300), 6900);
        assert_eq!(worker_lifetime_s(400, 300), 200);
        assert_eq!(worker_lifetime_s(0, 300), 0);
    }
}

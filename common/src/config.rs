//! The plugin's arguments in plugstack.conf: `key=value` words after the
//! plugin's path. Every key has a default (`docs/admin.md` lists them), so a
//! bare `required /usr/lib64/slurm/spank_dask.so` line works.
//!
//! Strict on purpose: an unknown key, a repeated key, a malformed value or
//! a default above its maximum is an error that names the key, never
//! something silently ignored.

use crate::paths::DEFAULT_AGENT_DIR;
use crate::policy::{AccountPolicy, Policy, WorkerStart};
use crate::pool_policy::{Allowed, PerPool};
use crate::units::{
    format_duration_s, format_mem_mb, format_time_s, parse_duration_s, parse_mem_mb, parse_time_s,
};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Directory holding the node agents' sockets (`agent-<node>.sock`).
    pub agent_dir: PathBuf,
    /// The `dask-spank` program on compute nodes; the job script the plugin
    /// supplies runs `<attach_cmd> attach`.
    pub attach_cmd: PathBuf,
    /// Directory for job logs, relative to the submit directory.
    pub log_dir: String,
    /// Bound on every call to the agent from slurmstepd.
    pub agent_timeout: Duration,
    /// How long a job's attach waits for a restarted agent before it stops
    /// the job's dask processes itself (an agent stopped for good).
    pub agent_restart_grace: Duration,
    pub policy: Policy,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            agent_dir: PathBuf::from(DEFAULT_AGENT_DIR),
            attach_cmd: PathBuf::from("/usr/bin/dask-spank"),
            log_dir: "log".to_string(),
            agent_timeout: Duration::from_secs(5),
            agent_restart_grace: Duration::from_secs(30),
            policy: Policy::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("plugstack.conf: argument '{0}' is not of the form key=value")]
    NotKeyValue(String),
    #[error("plugstack.conf: unknown key '{key}' (known keys: {known})")]
    UnknownKey { key: String, known: String },
    #[error("plugstack.conf: key '{0}' is given twice")]
    Repeated(String),
    #[error("plugstack.conf: {key}={value}: {why}")]
    BadValue {
        key: String,
        value: String,
        why: String,
    },
    #[error("plugstack.conf: {0}")]
    Inconsistent(String),
}

/// Every key, in the order of the admin guide.
pub const KEYS: &[&str] = &[
    "scheduler_partition",
    "worker_partition",
    "scheduler_licenses",
    "worker_licenses",
    "account",
    "worker_cpus",
    "worker_cpus_max",
    "scheduler_mem",
    "scheduler_mem_max",
    "worker_mem",
    "worker_mem_max",
    "scheduler_time",
    "scheduler_time_max",
    "worker_time",
    "worker_time_max",
    "max_worker_jobs",
    "worker_pools",
    "gres",
    "pool_gres_max",
    "pool_mem_max",
    "pool_time_max",
    "pool_jobs_max",
    "idle_timeout",
    "no_client_timeout",
    "tls",
    "worker_death_timeout",
    "worker_restart_max",
    "worker_restart_window",
    "worker_lifetime_margin",
    "worker_successor_lead",
    "worker_memory_kill",
    "worker_start",
    "log_dir",
    "agent_dir",
    "attach_cmd",
    "agent_timeout",
    "agent_restart_grace",
];

fn bad(key: &str, value: &str, why: &str) -> ConfigError {
    ConfigError::BadValue {
        key: key.to_string(),
        value: value.to_string(),
        why: why.to_string(),
    }
}

/// Slurm names (partitions, accounts, licences): no separators, no spaces.
fn slurm_name(key: &str, value: &str) -> Result<String, ConfigError> {
    if value.is_empty()
        || !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(bad(
            key,
            value,
            "must be a Slurm name (letters, digits, '-', '_', '.')",
        ));
    }
    Ok(value.to_string())
}

fn partition(key: &str, value: &str) -> Result<Option<String>, ConfigError> {
    if value == "none" {
        Ok(None)
    } else {
        slurm_name(key, value).map(Some)
    }
}

fn licenses(key: &str, value: &str) -> Result<Vec<String>, ConfigError> {
    if value == "none" {
        return Ok(vec![]);
    }
    value
        .split(',')
        .map(|l| {
            slurm_name(key, l).map_err(|_| {
                bad(
                    key,
                    value,
                    "must be none or a comma-separated list of licence names",
                )
            })
        })
        .collect()
}

fn account(key: &str, value: &str) -> Result<AccountPolicy, ConfigError> {
    Ok(match value {
        "primary-group" => AccountPolicy::PrimaryGroup,
        "none" => AccountPolicy::None,
        other => AccountPolicy::Fixed(slurm_name(key, other).map_err(|_| {
            bad(
                key,
                value,
                "must be primary-group, none or a Slurm account name",
            )
        })?),
    })
}

/// `any`, `none` or a list of names (`pools` says which).
fn allowed(key: &str, value: &str, what: &str) -> Result<Allowed, ConfigError> {
    match value {
        "any" => Ok(Allowed::Any),
        "none" => Ok(Allowed::None),
        _ => value
            .split(',')
            .map(|n| {
                let ok = if what == "pool" {
                    n.parse::<crate::names::PoolName>().is_ok()
                } else {
                    slurm_name(key, n).is_ok()
                };
                ok.then(|| n.to_string())
            })
            .collect::<Option<Vec<_>>>()
            .map(Allowed::Only)
            .ok_or_else(|| {
                bad(
                    key,
                    value,
                    &format!("must be any, none or a comma-separated list of {what} names"),
                )
            }),
    }
}

/// `none`, `VALUE` (every pool) or `POOL=VALUE,...`.
fn per_pool<T: Copy>(
    key: &str,
    value: &str,
    one: impl Fn(&str) -> Option<T>,
    example: &str,
) -> Result<PerPool<T>, ConfigError> {
    PerPool::parse(value, one).ok_or_else(|| {
        bad(
            key,
            value,
            &format!("must be none, or {example} for every pool and/or POOL={example} entries, comma-separated"),
        )
    })
}

fn count(key: &str, value: &str, max: u64) -> Result<u64, ConfigError> {
    match value.parse::<u64>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(bad(
            key,
            value,
            &format!("must be a whole number from 1 to {max}"),
        )),
    }
}

fn mem(key: &str, value: &str) -> Result<u64, ConfigError> {
    match parse_mem_mb(value) {
        Some(m) if m > 0 => Ok(m),
        _ => Err(bad(
            key,
            value,
            "must be a memory size such as 512M, 3G or 1T",
        )),
    }
}

fn time(key: &str, value: &str) -> Result<u64, ConfigError> {
    match parse_time_s(value) {
        Some(Some(t)) if t > 0 => Ok(t),
        _ => Err(bad(
            key,
            value,
            "must be a Slurm time limit such as 30, 2:00:00 or 1-00:00:00 (not UNLIMITED)",
        )),
    }
}

fn duration(key: &str, value: &str) -> Result<u64, ConfigError> {
    parse_duration_s(value)
        .filter(|s| *s > 0)
        .ok_or_else(|| bad(key, value, "must be a duration such as 2h, 30m or 600s"))
}

fn absolute_path(key: &str, value: &str) -> Result<PathBuf, ConfigError> {
    if !value.starts_with('/') {
        return Err(bad(key, value, "must be an absolute path"));
    }
    Ok(PathBuf::from(value))
}

fn relative_dir(key: &str, value: &str) -> Result<String, ConfigError> {
    if value.is_empty() || value.starts_with('/') || value.split('/').any(|c| c == "..") {
        return Err(bad(
            key,
            value,
            "must be a relative directory without '..' (it is created under the submit directory)",
        ));
    }
    if value.contains('%') || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad(
            key,
            value,
            "must not contain '%', spaces or control characters",
        ));
    }
    Ok(value.trim_end_matches('/').to_string())
}

/// `no_client_timeout`: off (0, never) or a duration.
fn off_or_duration(key: &str, value: &str) -> Result<u64, ConfigError> {
    match value {
        "off" => Ok(0),
        _ => duration(key, value).map_err(|_| {
            bad(
                key,
                value,
                "must be off or a duration such as 2h, 30m or 600s",
            )
        }),
    }
}

/// `worker_memory_kill`: a percentage from 50% to 100%.
fn kill_percent(key: &str, value: &str) -> Result<u32, ConfigError> {
    match value.strip_suffix('%').map(|n| n.parse::<u32>()) {
        Some(Ok(n)) if (50..=100).contains(&n) => Ok(n),
        _ => Err(bad(key, value, "must be a percentage from 50% to 100%")),
    }
}

/// `worker_start`: how the agent starts a worker's python.
fn worker_start(key: &str, value: &str) -> Result<WorkerStart, ConfigError> {
    match value {
        "exec" => Ok(WorkerStart::Exec),
        "forkserver" => Ok(WorkerStart::Forkserver),
        _ => Err(bad(key, value, "must be exec or forkserver")),
    }
}

/// The key and value of `arg`, a known key not in `seen` (then added).
fn known_key<'a>(
    arg: &'a str,
    seen: &mut Vec<&'static str>,
) -> Result<(&'a str, &'a str), ConfigError> {
    let (key, v) = arg
        .split_once('=')
        .ok_or_else(|| ConfigError::NotKeyValue(arg.to_string()))?;
    let Some(known) = KEYS.iter().find(|k| **k == key) else {
        return Err(ConfigError::UnknownKey {
            key: key.to_string(),
            known: KEYS.join(", "),
        });
    };
    if seen.contains(known) {
        return Err(ConfigError::Repeated(key.to_string()));
    }
    seen.push(known);
    Ok((key, v))
}

impl Config {
    pub fn parse<'a, I: IntoIterator<Item = &'a str>>(args: I) -> Result<Config, ConfigError> {
        let mut c = Config::default();
        let mut seen: Vec<&'static str> = Vec::new();
        for arg in args {
            let (key, v) = known_key(arg, &mut seen)?;
            c.set(key, v)?;
        }
        c.check()?;
        Ok(c)
    }

    /// Set the known `key` to its checked value `v`.
    fn set(&mut self, key: &str, v: &str) -> Result<(), ConfigError> {
        let p = &mut self.policy;
        match key {
            "scheduler_partition" => p.scheduler.partition = partition(key, v)?,
            "worker_partition" => p.worker.partition = partition(key, v)?,
            "scheduler_licenses" => p.scheduler.licenses = licenses(key, v)?,
            "worker_licenses" => p.worker.licenses = licenses(key, v)?,
            "account" => p.account = account(key, v)?,
            "worker_cpus" => p.worker.cpus = count(key, v, 4096)? as u32,
            "worker_cpus_max" => p.worker.cpus_max = count(key, v, 4096)? as u32,
            "scheduler_mem" => p.scheduler.mem_mb = mem(key, v)?,
            "scheduler_mem_max" => p.scheduler.mem_max_mb = mem(key, v)?,
            "worker_mem" => p.worker.mem_mb = mem(key, v)?,
            "worker_mem_max" => p.worker.mem_max_mb = mem(key, v)?,
            "scheduler_time" => p.scheduler.time_s = time(key, v)?,
            "scheduler_time_max" => p.scheduler.time_max_s = time(key, v)?,
            "worker_time" => p.worker.time_s = time(key, v)?,
            "worker_time_max" => p.worker.time_max_s = time(key, v)?,
            "max_worker_jobs" => p.max_worker_jobs = count(key, v, 1_000_000)? as u32,
            "worker_pools" => p.pools.pools = allowed(key, v, "pool")?,
            "gres" => p.pools.gres = allowed(key, v, "gres")?,
            "pool_gres_max" => {
                p.pools.gres_max = per_pool(key, v, |x| x.parse::<u64>().ok(), "a count")?
            }
            "pool_mem_max" => {
                p.pools.mem_max_mb = per_pool(
                    key,
                    v,
                    |x| parse_mem_mb(x).filter(|m| *m > 0),
                    "a memory size",
                )?
            }
            "pool_time_max" => {
                p.pools.time_max_s = per_pool(
                    key,
                    v,
                    |x| parse_time_s(x).flatten().filter(|t| *t > 0),
                    "a time limit",
                )?
            }
            "pool_jobs_max" => {
                p.pools.jobs_max = per_pool(
                    key,
                    v,
                    |x| {
                        x.parse::<u32>()
                            .ok()
                            .filter(|n| (1..=1_000_000).contains(n))
                    },
                    "a number of jobs",
                )?
            }
            "idle_timeout" => p.idle_timeout_s = duration(key, v)?,
            "no_client_timeout" => p.no_client_timeout_s = off_or_duration(key, v)?,
            "tls" => p.tls = v.parse().map_err(|why: String| bad(key, v, &why))?,
            "worker_death_timeout" => p.nanny.death_timeout_s = duration(key, v)?,
            "worker_restart_max" => p.nanny.restart_max = count(key, v, 1000)? as u32,
            "worker_restart_window" => p.nanny.restart_window_s = duration(key, v)?,
            "worker_lifetime_margin" => p.nanny.lifetime_margin_s = duration(key, v)?,
            "worker_successor_lead" => p.nanny.successor_lead_s = duration(key, v)?,
            "worker_memory_kill" => p.nanny.memory_kill_percent = kill_percent(key, v)?,
            "worker_start" => p.nanny.start = worker_start(key, v)?,
            "log_dir" => self.log_dir = relative_dir(key, v)?,
            "agent_dir" => self.agent_dir = absolute_path(key, v)?,
            "attach_cmd" => self.attach_cmd = absolute_path(key, v)?,
            "agent_timeout" => {
                self.agent_timeout = std::time::Duration::from_secs(count(key, v, 300)?)
            }
            "agent_restart_grace" => {
                self.agent_restart_grace = Duration::from_secs(duration(key, v)?)
            }
            _ => {
                return Err(ConfigError::Inconsistent(format!(
                    "key '{key}' is listed but not handled"
                )))
            }
        }
        Ok(())
    }

    /// What every key resolves to, in `KEYS` order, written as the key
    /// takes it (`dask-node-agent check-config` prints it; the admin
    /// guide's defaults are checked against it).
    pub fn resolved(&self) -> Vec<(&'static str, String)> {
        let p = &self.policy;
        let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "none".into());
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(",")
            }
        };
        let value = |key: &str| -> String {
            match key {
                "scheduler_partition" => opt(&p.scheduler.partition),
                "worker_partition" => opt(&p.worker.partition),
                "scheduler_licenses" => list(&p.scheduler.licenses),
                "worker_licenses" => list(&p.worker.licenses),
                "account" => match &p.account {
                    AccountPolicy::PrimaryGroup => "primary-group".into(),
                    AccountPolicy::None => "none".into(),
                    AccountPolicy::Fixed(a) => a.clone(),
                },
                "worker_cpus" => p.worker.cpus.to_string(),
                "worker_cpus_max" => p.worker.cpus_max.to_string(),
                "scheduler_mem" => format_mem_mb(p.scheduler.mem_mb),
                "scheduler_mem_max" => format_mem_mb(p.scheduler.mem_max_mb),
                "worker_mem" => format_mem_mb(p.worker.mem_mb),
                "worker_mem_max" => format_mem_mb(p.worker.mem_max_mb),
                "scheduler_time" => format_time_s(p.scheduler.time_s),
                "scheduler_time_max" => format_time_s(p.scheduler.time_max_s),
                "worker_time" => format_time_s(p.worker.time_s),
                "worker_time_max" => format_time_s(p.worker.time_max_s),
                "max_worker_jobs" => p.max_worker_jobs.to_string(),
                "worker_pools" => p.pools.pools.as_value(),
                "gres" => p.pools.gres.as_value(),
                "pool_gres_max" => p.pools.gres_max.as_value(|v| v.to_string()),
                "pool_mem_max" => p.pools.mem_max_mb.as_value(format_mem_mb),
                "pool_time_max" => p.pools.time_max_s.as_value(format_time_s),
                "pool_jobs_max" => p.pools.jobs_max.as_value(|v| v.to_string()),
                "idle_timeout" => format_duration_s(p.idle_timeout_s),
                "no_client_timeout" => match p.no_client_timeout_s {
                    0 => "off".into(),
                    s => format_duration_s(s),
                },
                "tls" => p.tls.as_str().into(),
                "worker_death_timeout" => format_duration_s(p.nanny.death_timeout_s),
                "worker_restart_max" => p.nanny.restart_max.to_string(),
                "worker_restart_window" => format_duration_s(p.nanny.restart_window_s),
                "worker_lifetime_margin" => format_duration_s(p.nanny.lifetime_margin_s),
                "worker_successor_lead" => format_duration_s(p.nanny.successor_lead_s),

                "worker_memory_kill" => format!("{}%", p.nanny.memory_kill_percent),
                "worker_start" => p.nanny.start.to_string(),
                "log_dir" => self.log_dir.clone(),
                "agent_dir" => self.agent_dir.display().to_string(),
                "attach_cmd" => self.attach_cmd.display().to_string(),
                "agent_timeout" => self.agent_timeout.as_secs().to_string(),
                "agent_restart_grace" => format_duration_s(self.agent_restart_grace.as_secs()),
                _ => "?".into(),
            }
        };
        KEYS.iter().map(|k| (*k, value(k))).collect()
    }

    /// Defaults must lie within their maxima.
    fn check(&self) -> Result<(), ConfigError> {
        let p = &self.policy;
        let over = |k: &str, v: String, kmax: &str, vmax: String| {
            Err(ConfigError::Inconsistent(format!(
                "{k}={v} exceeds {kmax}={vmax}"
            )))
        };
        if p.worker.cpus > p.worker.cpus_max {
            return over(
                "worker_cpus",
                p.worker.cpus.to_string(),
                "worker_cpus_max",
                p.worker.cpus_max.to_string(),
            );
        }
        // A pool's maxima hold the site's defaults, which its jobs get
        // when they ask for nothing else.
        let pools = &p.pools;
        for (pool, m) in pools.mem_max_mb.all.iter().map(|m| ("", m)).chain(
            pools
                .mem_max_mb
                .by_pool
                .iter()
                .map(|(k, m)| (k.as_str(), m)),
        ) {
            if p.worker.mem_mb > *m {
                let at = if pool.is_empty() {
                    String::new()
                } else {
                    format!("{pool}=")
                };
                return over(
                    "worker_mem",
                    format_mem_mb(p.worker.mem_mb),
                    "pool_mem_max",
                    format!("{at}{}", format_mem_mb(*m)),
                );
            }
        }
        for (pool, t) in pools.time_max_s.all.iter().map(|t| ("", t)).chain(
            pools
                .time_max_s
                .by_pool
                .iter()
                .map(|(k, t)| (k.as_str(), t)),
        ) {
            if p.worker.time_s > *t {
                let at = if pool.is_empty() {
                    String::new()
                } else {
                    format!("{pool}=")
                };
                return over(
                    "worker_time",
                    format_time_s(p.worker.time_s),
                    "pool_time_max",
                    format!("{at}{}", format_time_s(*t)),
                );
            }
        }
        for (role, r) in [("scheduler", &p.scheduler), ("worker", &p.worker)] {
            if r.mem_mb > r.mem_max_mb {
                return over(
                    &format!("{role}_mem"),
                    format_mem_mb(r.mem_mb),
                    &format!("{role}_mem_max"),
                    format_mem_mb(r.mem_max_mb),
                );
            }
            if r.time_s > r.time_max_s {
                return over(
                    &format!("{role}_time"),
                    format_time_s(r.time_s),
                    &format!("{role}_time_max"),
                    format_time_s(r.time_max_s),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::TlsMode;

    #[test]
    fn empty_argument_list_gives_the_documented_defaults() {
        let c = Config::parse([]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.agent_dir, PathBuf::from("/run/dask-spank"));
        assert_eq!(c.log_dir, "log");
        assert_eq!(c.policy.worker.mem_mb, 3072);
        assert_eq!(c.policy.max_worker_jobs, 3000);
    }

    #[test]
    fn every_key_is_applied() {
        let c = Config::parse([
            "scheduler_partition=daemons",
            "worker_partition=none",
            "scheduler_licenses=a,b",
            "worker_licenses=none",
            "account=dask",
            "worker_cpus=2",
            "worker_cpus_max=8",
            "scheduler_mem=2G",
            "scheduler_mem_max=4G",
            "worker_mem=1500M",
            "worker_mem_max=16G",
            "scheduler_time=1:00:00",
            "scheduler_time_max=2:00:00",
            "worker_time=30",
            "worker_time_max=1-00:00:00",
            "max_worker_jobs=10",
            "worker_pools=gpu,big-mem",
            "gres=gpu",
            "pool_gres_max=0,gpu=2",
            "pool_mem_max=big-mem=256G",
            "pool_time_max=gpu=4:00:00",
            "pool_jobs_max=gpu=8",
            "idle_timeout=15m",
            "no_client_timeout=45m",
            "worker_death_timeout=30s",
            "worker_restart_max=3",
            "worker_restart_window=2m",
            "worker_lifetime_margin=90",
            "worker_memory_kill=90%",
            "worker_start=forkserver",
            "log_dir=logs/dask/",
            "agent_dir=/tmp/a",
            "attach_cmd=/opt/bin/dask-spank",
            "agent_timeout=9",
        ])
        .unwrap();
        let p = &c.policy;
        assert_eq!(p.scheduler.partition.as_deref(), Some("daemons"));
        assert_eq!(p.worker.partition, None);
        assert_eq!(p.scheduler.licenses, ["a", "b"]);
        assert!(p.worker.licenses.is_empty());
        assert_eq!(p.account, AccountPolicy::Fixed("dask".into()));
        assert_eq!((p.worker.cpus, p.worker.cpus_max), (2, 8));
        assert_eq!((p.scheduler.mem_mb, p.scheduler.mem_max_mb), (2048, 4096));
        assert_eq!((p.worker.mem_mb, p.worker.mem_max_mb), (1500, 16384));
        assert_eq!((p.scheduler.time_s, p.scheduler.time_max_s), (3600, 7200));
        assert_eq!((p.worker.time_s, p.worker.time_max_s), (1800, 86400));
        assert_eq!(p.max_worker_jobs, 10);
        let gpu: crate::names::PoolName = "gpu".parse().unwrap();
        assert_eq!(
            p.pools.pools,
            Allowed::Only(vec!["gpu".into(), "big-mem".into()])
        );
        assert_eq!(p.pools.gres, Allowed::Only(vec!["gpu".into()]));
        assert_eq!(p.pools.gres_max.get(Some(&gpu)), Some(2));
        assert_eq!(p.pools.gres_max.get(None), Some(0));
        assert_eq!(
            p.pools.mem_max_mb.get(Some(&"big-mem".parse().unwrap())),
            Some(256 * 1024)
        );
        assert_eq!(p.pools.time_max_s.get(Some(&gpu)), Some(4 * 3600));
        assert_eq!(p.pools.jobs_max.get(Some(&gpu)), Some(8));
        assert_eq!(p.pools.jobs_max.get(None), None);
        assert_eq!(p.idle_timeout_s, 900);
        assert_eq!(p.no_client_timeout_s, 2700);
        assert_eq!(p.nanny.death_timeout_s, 30);
        assert_eq!((p.nanny.restart_max, p.nanny.restart_window_s), (3, 120));
        assert_eq!(p.nanny.lifetime_margin_s, 90);
        assert_eq!(p.nanny.memory_kill_percent, 90);
        assert_eq!(p.nanny.start, WorkerStart::Forkserver);
        assert_eq!(c.log_dir, "logs/dask");
        assert_eq!(c.agent_dir, PathBuf::from("/tmp/a"));
        assert_eq!(c.attach_cmd, PathBuf::from("/opt/bin/dask-spank"));
        assert_eq!(c.agent_timeout, Duration::from_secs(9));
        assert_eq!(
            Config::parse(["account=none"]).unwrap().policy.account,
            AccountPolicy::None
        );
        assert_eq!(Config::default().policy.tls, TlsMode::Required);
        assert_eq!(Config::parse(["tls=off"]).unwrap().policy.tls, TlsMode::Off);
        assert_eq!(
            Config::parse(["account=primary-group"])
                .unwrap()
                .policy
                .account,
            AccountPolicy::PrimaryGroup
        );
    }

    #[test]
    fn every_key_resolves_and_parses_back_to_the_same_config() {
        let c = Config::parse([
            "worker_partition=htc",
            "worker_licenses=sps,x",
            "account=phys",
            "tls=off",
            "gres=none",
            "worker_pools=gpu",
            "pool_gres_max=gpu=1",
            "pool_mem_max=4G,gpu=8G",
            "pool_time_max=gpu=3:00:00",
            "pool_jobs_max=7",
        ])
        .unwrap();
        let r = c.resolved();
        assert_eq!(r.len(), KEYS.len());
        assert!(r.iter().all(|(_, v)| v != "?"));
        let args: Vec<String> = r.iter().map(|(k, v)| format!("{k}={v}")).collect();
        assert_eq!(Config::parse(args.iter().map(String::as_str)).unwrap(), c);
        let d: Vec<String> = Config::default()
            .resolved()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        assert_eq!(
            Config::parse(d.iter().map(String::as_str)).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn errors_name_the_key_and_value() {
        let cases: &[(&[&str], &str)] = &[
            (&["bogus=1"], "plugstack.conf: unknown key 'bogus' (known keys: scheduler_partition, worker_partition, scheduler_licenses, worker_licenses, account, worker_cpus, worker_cpus_max, scheduler_mem, scheduler_mem_max, worker_mem, worker_mem_max, scheduler_time, scheduler_time_max, worker_time, worker_time_max, max_worker_jobs, worker_pools, gres, pool_gres_max, pool_mem_max, pool_time_max, pool_jobs_max, idle_timeout, no_client_timeout, tls, worker_death_timeout, worker_restart_max, worker_restart_window, worker_lifetime_margin, worker_successor_lead, worker_memory_kill, worker_start, log_dir, agent_dir, attach_cmd, agent_timeout, agent_restart_grace)"),
            (&["worker_memory_kill=95"], "plugstack.conf: worker_memory_kill=95: must be a percentage from 50% to 100%"),
            (&["worker_start=fork"], "plugstack.conf: worker_start=fork: must be exec or forkserver"),
            (&["tls=yes"], "plugstack.conf: tls=yes: must be required or off"),
            (&["agent_dir"], "plugstack.conf: argument 'agent_dir' is not of the form key=value"),
            (&["agent_dir=rel"], "plugstack.conf: agent_dir=rel: must be an absolute path"),
            (&["log_dir=../x"], "plugstack.conf: log_dir=../x: must be a relative directory without '..' (it is created under the submit directory)"),
            (&["log_dir=a%j"], "plugstack.conf: log_dir=a%j: must not contain '%', spaces or control characters"),
            (&["agent_timeout=0"], "plugstack.conf: agent_timeout=0: must be a whole number from 1 to 300"),
            (&["log_dir=a", "log_dir=b"], "plugstack.conf: key 'log_dir' is given twice"),
            (&["worker_mem=3X"], "plugstack.conf: worker_mem=3X: must be a memory size such as 512M, 3G or 1T"),
            (&["worker_mem=0"], "plugstack.conf: worker_mem=0: must be a memory size such as 512M, 3G or 1T"),
            (&["worker_time=UNLIMITED"], "plugstack.conf: worker_time=UNLIMITED: must be a Slurm time limit such as 30, 2:00:00 or 1-00:00:00 (not UNLIMITED)"),
            (&["worker_cpus=0"], "plugstack.conf: worker_cpus=0: must be a whole number from 1 to 4096"),
            (&["max_worker_jobs=-1"], "plugstack.conf: max_worker_jobs=-1: must be a whole number from 1 to 1000000"),
            (&["idle_timeout=soon"], "plugstack.conf: idle_timeout=soon: must be a duration such as 2h, 30m or 600s"),
            (&["no_client_timeout=0"], "plugstack.conf: no_client_timeout=0: must be off or a duration such as 2h, 30m or 600s"),
            (&["worker_partition=a b"], "plugstack.conf: worker_partition=a b: must be a Slurm name (letters, digits, '-', '_', '.')"),
            (&["worker_licenses=sps,"], "plugstack.conf: worker_licenses=sps,: must be none or a comma-separated list of licence names"),
            (&["account=a/b"], "plugstack.conf: account=a/b: must be primary-group, none or a Slurm account name"),
            (&["worker_mem=64G"], "plugstack.conf: worker_mem=64G exceeds worker_mem_max=32G"),
            (&["worker_cpus=4", "worker_cpus_max=2"], "plugstack.conf: worker_cpus=4 exceeds worker_cpus_max=2"),
            (&["scheduler_time_max=1:00:00"], "plugstack.conf: scheduler_time=8:00:00 exceeds scheduler_time_max=1:00:00"),
            (&["gres=gpu,"], "plugstack.conf: gres=gpu,: must be any, none or a comma-separated list of gres names"),
            (&["worker_pools=a.b"], "plugstack.conf: worker_pools=a.b: must be any, none or a comma-separated list of pool names"),
            (&["pool_gres_max=gpu=x"], "plugstack.conf: pool_gres_max=gpu=x: must be none, or a count for every pool and/or POOL=a count entries, comma-separated"),
            (&["pool_mem_max=gpu=0"], "plugstack.conf: pool_mem_max=gpu=0: must be none, or a memory size for every pool and/or POOL=a memory size entries, comma-separated"),
            (&["pool_jobs_max=1,2"], "plugstack.conf: pool_jobs_max=1,2: must be none, or a number of jobs for every pool and/or POOL=a number of jobs entries, comma-separated"),
            (&["pool_time_max=gpu=UNLIMITED"], "plugstack.conf: pool_time_max=gpu=UNLIMITED: must be none, or a time limit for every pool and/or POOL=a time limit entries, comma-separated"),
            (&["pool_mem_max=gpu=2G"], "plugstack.conf: worker_mem=3G exceeds pool_mem_max=gpu=2G"),
            (&["pool_time_max=1:00:00"], "plugstack.conf: worker_time=2:00:00 exceeds pool_time_max=1:00:00"),
        ];
        for (args, want) in cases {
            let got = Config::parse(args.iter().copied()).unwrap_err().to_string();
            assert_eq!(&got, want);
        }
    }
}

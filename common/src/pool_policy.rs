//! The site's rules for worker pools and generic resources (GPUs): which
//! pools and which gres a site lets through dask, and each pool's maxima.
//! Like every other rule, applied at submit (the plugin, `check_submit`)
//! and again on the node against what the job really got (`check_job`),
//! where a private plugstack.conf cannot get around it.
//!
//! A pool is named by the job's `--dask-pool` (None: the default pool). Its
//! maxima override the role's (`pool_mem_max=bigmem=256G` lets the bigmem
//! pool past `worker_mem_max`, or holds the gpu pool below it).

use crate::names::{PoolName, Role, DEFAULT_POOL};
use crate::policy::{array_task_count, Asked, Policy};
use crate::units::{format_mem_mb, format_time_s, parse_mem_mb, parse_time_s};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// Which names a site allows (`worker_pools`, `gres`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Allowed {
    /// Every name.
    #[default]
    Any,
    /// None at all.
    None,
    /// These names only.
    Only(Vec<String>),
}

impl Allowed {
    pub fn allows(&self, name: &str) -> bool {
        match self {
            Allowed::Any => true,
            Allowed::None => false,
            Allowed::Only(v) => v.iter().any(|n| n == name),
        }
    }

    /// As the key takes it.
    pub fn as_value(&self) -> String {
        match self {
            Allowed::Any => "any".into(),
            Allowed::None => "none".into(),
            Allowed::Only(v) => v.join(","),
        }
    }
}

/// A maximum per pool: a bare value for every pool, `POOL=VALUE` entries
/// for one pool each (`default` names the default pool), which win.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(deny_unknown_fields))]
pub struct PerPool<T> {
    pub all: Option<T>,
    pub by_pool: BTreeMap<String, T>,
}

impl<T> Default for PerPool<T> {
    fn default() -> Self {
        PerPool {
            all: None,
            by_pool: BTreeMap::new(),
        }
    }
}

impl<T: Copy> PerPool<T> {
    pub fn get(&self, pool: Option<&PoolName>) -> Option<T> {
        let name = pool.map_or(DEFAULT_POOL, |p| p.as_str());
        self.by_pool.get(name).copied().or(self.all)
    }

    /// Parse `none`, `VALUE` or `POOL=VALUE,...` (a bare value at most once).
    pub fn parse(value: &str, one: impl Fn(&str) -> Option<T>) -> Option<PerPool<T>> {
        let mut p = PerPool::default();
        if value == "none" {
            return Some(p);
        }
        for entry in value.split(',') {
            match entry.split_once('=') {
                Some((pool, v)) => {
                    if pool != DEFAULT_POOL && pool.parse::<PoolName>().is_err() {
                        return None;
                    }
                    if p.by_pool.insert(pool.to_string(), one(v)?).is_some() {
                        return None;
                    }
                }
                None if p.all.is_none() => p.all = Some(one(entry)?),
                None => return None,
            }
        }
        Some(p)
    }

    /// As the key takes it.
    pub fn as_value(&self, show: impl Fn(T) -> String) -> String {
        let mut v: Vec<String> = self.all.iter().map(|x| show(*x)).collect();
        v.extend(
            self.by_pool
                .iter()
                .map(|(k, x)| format!("{k}={}", show(*x))),
        );
        if v.is_empty() {
            "none".into()
        } else {
            v.join(",")
        }
    }
}

/// The pool and gres rules of a site.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(deny_unknown_fields))]
pub struct PoolPolicy {
    /// Pools a worker job may name (`worker_pools`); the default pool is
    /// always allowed.
    pub pools: Allowed,
    /// Generic resources any dask job may ask for (`gres`): `none` keeps
    /// GPUs (and every other gres) out of dask entirely.
    pub gres: Allowed,
    /// Largest count of each gres per worker job (`pool_gres_max`).
    pub gres_max: PerPool<u64>,
    /// Largest memory of a pool's worker job (`pool_mem_max`), MiB.
    pub mem_max_mb: PerPool<u64>,
    /// Longest worker job of a pool (`pool_time_max`), seconds.
    pub time_max_s: PerPool<u64>,
    /// Largest number of a pool's worker jobs in one submission
    /// (`pool_jobs_max`), as `max_worker_jobs` for every worker.
    pub jobs_max: PerPool<u32>,
}

fn pool_word(pool: Option<&PoolName>) -> String {
    match pool {
        Some(p) => format!("pool {p}"),
        None => format!("the {DEFAULT_POOL} pool"),
    }
}

impl Policy {
    /// The policy a worker job of `pool` is held to by the role's checks:
    /// the pool's memory and time maxima in place of the role's (the pool
    /// checks name the pool's keys themselves).
    pub fn for_pool(&self, role: Role, pool: Option<&PoolName>) -> Cow<'_, Policy> {
        let p = &self.pools;
        let (mem, time) = (p.mem_max_mb.get(pool), p.time_max_s.get(pool));
        if role != Role::Worker || (mem.is_none() && time.is_none()) {
            return Cow::Borrowed(self);
        }
        let mut adjusted = self.clone();
        if let Some(m) = mem {
            adjusted.worker.mem_max_mb = m;
        }
        if let Some(t) = time {
            adjusted.worker.time_max_s = t;
        }
        Cow::Owned(adjusted)
    }
}

/// One gres a job asks for or got: its name and count per job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gres {
    pub name: String,
    pub count: u64,
}

/// The gres of one `--gres`-style list (`gpu:2,mps:50`, `gpu:tesla:1`,
/// `gres/gpu:1`, `gres:gpu:1`, `gres/gpu=1`; no count: 1). None when a
/// word is not one.
pub fn parse_gres_list(list: &str) -> Option<Vec<Gres>> {
    let mut out = Vec::new();
    for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        if word == "(null)" || word == "N/A" {
            continue;
        }
        let word = word
            .strip_prefix("gres/")
            .or_else(|| word.strip_prefix("gres:"))
            .unwrap_or(word);
        let parts: Vec<&str> = word.split([':', '=']).collect();
        let name = parts.first().copied().unwrap_or("");
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return None;
        }
        // The count is the last part when it is a number (`gpu:tesla`
        // names a type, one of it); a `(IDX:...)` suffix is dropped.
        let last = parts[1..].last().map(|l| l.split('(').next().unwrap_or(""));
        let count = match last.map(|l| l.parse::<u64>()) {
            Some(Ok(n)) => n,
            _ => 1,
        };
        add(&mut out, name, count);
    }
    Some(out)
}

fn add(out: &mut Vec<Gres>, name: &str, count: u64) {
    match out.iter_mut().find(|g| g.name == name) {
        Some(g) => g.count = g.count.saturating_add(count),
        None => out.push(Gres {
            name: name.to_string(),
            count,
        }),
    }
}

/// Every way sbatch takes generic resources, read as gres per job (a
/// dask-spank job is one task on one node): `--gres`, `--gpus` and its
/// per-node, per-task and per-socket forms (counted as asked: one socket
/// at least), `--tres-per-task`'s `gres/...` entries. The option as the
/// user wrote it goes with each, for errors.
pub fn gres_asked(asked: &dyn Asked) -> Result<Vec<(Gres, String)>, String> {
    let mut out: Vec<(Gres, String)> = Vec::new();
    for opt in [
        "gres",
        "gpus",
        "gpus-per-node",
        "gpus-per-task",
        "gpus-per-socket",
    ] {
        let Some(v) = asked.get(opt) else { continue };
        let list = if opt == "gres" {
            v.to_string()
        } else {
            // [type:]count, of GPUs.
            format!("gpu:{v}")
        };
        let g = parse_gres_list(&list)
            .ok_or_else(|| format!("--{opt}={v}: not a generic resource list (e.g. gpu:1)"))?;
        out.extend(g.into_iter().map(|g| (g, format!("--{opt}={v}"))));
    }
    if let Some(v) = asked.get("tres-per-task") {
        for w in v.split(',').filter(|w| w.starts_with("gres")) {
            let g = parse_gres_list(w)
                .ok_or_else(|| format!("--tres-per-task={v}: not a TRES list (e.g. gres/gpu=1)"))?;
            out.extend(g.into_iter().map(|g| (g, format!("--tres-per-task={v}"))));
        }
    }
    Ok(out)
}

/// The gres rules, for gres asked (`what` the option) or got (`what` None).
fn check_gres(
    role: Role,
    pool: Option<&PoolName>,
    gres: &Gres,
    what: Option<&str>,
    p: &PoolPolicy,
) -> Result<(), String> {
    let name = &gres.name;
    let subject = match what {
        Some(opt) => format!("{opt} is not allowed"),
        None => format!("gres {name}:{} is not allowed", gres.count),
    };
    match &p.gres {
        Allowed::None => {
            return Err(format!(
                "{subject}: this site gives dask jobs no generic resources (gres=none)"
            ))
        }
        Allowed::Only(v) if !v.contains(name) => {
            return Err(format!(
                "{subject}: gres {name} is not one dask jobs may use (gres={})",
                v.join(",")
            ))
        }
        _ => {}
    }
    if role == Role::Worker {
        if let Some(max) = p.gres_max.get(pool) {
            if gres.count > max {
                let got = match what {
                    Some(opt) => format!("{opt} asks for"),
                    None => "the job has".to_string(),
                };
                return Err(format!(
                    "{got} {} {name}, more than pool_gres_max={max} for {}",
                    gres.count,
                    pool_word(pool)
                ));
            }
        }
    }
    Ok(())
}

fn check_pool_allowed(role: Role, pool: Option<&PoolName>, p: &PoolPolicy) -> Result<(), String> {
    match pool {
        Some(name) if role == Role::Scheduler => Err(format!(
            "--dask-pool={name} is for worker jobs: a scheduler belongs to no pool"
        )),
        Some(name) if !p.pools.allows(name.as_str()) => Err(format!(
            "--dask-pool={name} is not allowed: worker_pools={}",
            p.pools.as_value()
        )),
        _ => Ok(()),
    }
}

/// The pool's memory and time maxima, as the role's checks would word them
/// with the pool's key.
fn over_pool_max(
    pool: Option<&PoolName>,
    p: &PoolPolicy,
    mem_mb: Option<(u64, String)>,
    time_s: Option<(Option<u64>, String)>,
) -> Result<(), String> {
    let whose = pool_word(pool);
    if let (Some(max), Some((m, what))) = (p.mem_max_mb.get(pool), mem_mb) {
        if m == 0 || m > max {
            return Err(format!(
                "{what} exceeds pool_mem_max={} for {whose}",
                format_mem_mb(max)
            ));
        }
    }
    if let (Some(max), Some((t, what))) = (p.time_max_s.get(pool), time_s) {
        if t.is_none_or(|t| t > max) {
            return Err(format!(
                "{what} exceeds pool_time_max={} for {whose}",
                format_time_s(max)
            ));
        }
    }
    Ok(())
}

/// The pool rules at submit, before the role's own (`policy::check_submit`).
pub fn check_submit(
    role: Role,
    pool: Option<&PoolName>,
    asked: &dyn Asked,
    policy: &Policy,
) -> Result<(), String> {
    let p = &policy.pools;
    check_pool_allowed(role, pool, p)?;
    for (g, opt) in gres_asked(asked)? {
        check_gres(role, pool, &g, Some(&opt), p)?;
    }
    if role != Role::Worker {
        return Ok(());
    }
    let cpus = asked
        .get("cpus-per-task")
        .and_then(|c| c.parse::<u64>().ok())
        .unwrap_or(policy.worker.cpus as u64);
    let mem = match (asked.get("mem"), asked.get("mem-per-cpu")) {
        (Some(v), _) => parse_mem_mb(v).map(|m| (m, format!("--mem={v}"))),
        (None, Some(v)) => parse_mem_mb(v).map(|m| {
            (
                m.saturating_mul(cpus),
                format!("--mem-per-cpu={v} with {cpus} cpus"),
            )
        }),
        (None, None) => Some((
            policy.worker.mem_mb,
            format!("--mem={} (worker_mem)", format_mem_mb(policy.worker.mem_mb)),
        )),
    };
    let time = match asked.get("time") {
        Some(v) => parse_time_s(v).map(|t| (t, format!("--time={v}"))),
        None => Some((
            Some(policy.worker.time_s),
            format!(
                "--time={} (worker_time)",
                format_time_s(policy.worker.time_s)
            ),
        )),
    };
    over_pool_max(pool, p, mem, time)?;
    if let (Some(a), Some(max)) = (asked.get("array"), p.jobs_max.get(pool)) {
        if let Some(n) = array_task_count(a).filter(|n| *n > max as u64) {
            return Err(format!(
                "--array={a} asks for {n} worker jobs, more than pool_jobs_max={max} for {}",
                pool_word(pool)
            ));
        }
    }
    Ok(())
}

/// The pool rules on the node, before the role's own (`policy::check_job`).
pub fn check_job(
    role: Role,
    pool: Option<&PoolName>,
    gres: &[Gres],
    mem_mb: u64,
    time_limit_s: Option<u64>,
    policy: &Policy,
) -> Result<(), String> {
    let p = &policy.pools;
    check_pool_allowed(role, pool, p)?;
    for g in gres {
        check_gres(role, pool, g, None, p)?;
    }
    if role != Role::Worker {
        return Ok(());
    }
    let mem = Some((mem_mb, format!("memory {}", format_mem_mb(mem_mb))));
    let time = Some((
        time_limit_s,
        format!(
            "time limit {}",
            time_limit_s.map_or("UNLIMITED".into(), format_time_s)
        ),
    ));
    over_pool_max(pool, p, mem, time)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::policy::fixtures::asked;
    fn gpu() -> Option<PoolName> {
        Some("gpu".parse().unwrap())
    }

    /// A site with a gpu pool (2 GPUs, 16G, 4 h, 8 jobs at once) and a
    /// bigmem pool, and no other pool.
    fn site() -> Policy {
        Policy {
            pools: PoolPolicy {
                pools: Allowed::Only(vec!["gpu".into(), "bigmem".into()]),
                gres: Allowed::Only(vec!["gpu".into()]),
                gres_max: PerPool::parse("0,gpu=2", |v| v.parse().ok()).unwrap(),
                mem_max_mb: PerPool::parse("gpu=16G,bigmem=256G", parse_mem_mb).unwrap(),
                time_max_s: PerPool::parse("gpu=4:00:00", |v| parse_time_s(v).flatten()).unwrap(),
                jobs_max: PerPool::parse("gpu=8", |v| v.parse().ok()).unwrap(),
            },
            ..Policy::default()
        }
    }

    #[test]
    fn gres_lists_in_every_form_slurm_writes_them() {
        let g = |s| {
            parse_gres_list(s).map(|v| v.into_iter().map(|g| (g.name, g.count)).collect::<Vec<_>>())
        };
        let one = |n: &str, c| Some(vec![(n.to_string(), c)]);
        assert_eq!(g("gpu:2"), one("gpu", 2));
        assert_eq!(g("gpu"), one("gpu", 1));
        assert_eq!(g("gpu:tesla:3"), one("gpu", 3));
        assert_eq!(g("gpu:tesla"), one("gpu", 1));
        assert_eq!(g("gres:gpu:1"), one("gpu", 1));
        assert_eq!(g("gres/gpu:1"), one("gpu", 1));
        assert_eq!(g("gres/gpu=4"), one("gpu", 4));
        assert_eq!(g("gpu:1(IDX:0)"), one("gpu", 1));
        assert_eq!(g("gpu:1,gpu:tesla:2"), one("gpu", 3));
        assert_eq!(g("(null)"), Some(vec![]));
        assert_eq!(g("N/A"), Some(vec![]));
        assert_eq!(g("gpu:1,mps:50").unwrap().len(), 2);
        assert_eq!(g("g|u:1"), None);
    }

    #[test]
    fn per_pool_values_parse_and_print_back() {
        let p = PerPool::parse("1,gpu=2,default=0", |v| v.parse::<u64>().ok()).unwrap();
        assert_eq!(p.get(gpu().as_ref()), Some(2));
        assert_eq!(p.get(None), Some(0));
        assert_eq!(p.get(Some(&"x".parse().unwrap())), Some(1));
        assert_eq!(p.as_value(|v| v.to_string()), "1,default=0,gpu=2");
        assert_eq!(
            PerPool::<u64>::parse("none", |v| v.parse().ok()),
            Some(PerPool::default())
        );
        for bad in ["1,2", "gpu=1,gpu=2", "g.u=1", "gpu=x", ""] {
            assert_eq!(
                PerPool::<u64>::parse(bad, |v| v.parse().ok()),
                None,
                "{bad}"
            );
        }
    }

    #[test]
    fn a_conforming_pool_job_passes_at_submit_and_on_the_node() {
        let p = site();
        let a = asked(&[
            ("gres", "gpu:2"),
            ("mem", "16G"),
            ("time", "4:00:00"),
            ("array", "1-8"),
        ]);
        assert_eq!(check_submit(Role::Worker, gpu().as_ref(), &a, &p), Ok(()));
        let g = parse_gres_list("gpu:2").unwrap();
        assert_eq!(
            check_job(Role::Worker, gpu().as_ref(), &g, 16384, Some(14400), &p),
            Ok(())
        );
        // bigmem may go past worker_mem_max: its own maximum is higher.
        let big: PoolName = "bigmem".parse().unwrap();
        let a = asked(&[("mem", "200G")]);
        assert_eq!(check_submit(Role::Worker, Some(&big), &a, &p), Ok(()));
        assert_eq!(
            p.for_pool(Role::Worker, Some(&big)).worker.mem_max_mb,
            256 * 1024
        );
        assert_eq!(p.for_pool(Role::Worker, None).worker.mem_max_mb, 32 * 1024);
    }

    #[test]
    fn submit_refusals_name_the_option_the_value_and_the_key() {
        let p = site();
        let gpu = gpu();
        type Case<'a> = (
            Role,
            Option<&'a str>,
            &'a [(&'static str, &'static str)],
            &'a str,
        );
        let cases: &[Case] = &[
            (Role::Worker, Some("other"), &[], "--dask-pool=other is not allowed: worker_pools=gpu,bigmem"),
            (Role::Scheduler, Some("gpu"), &[], "--dask-pool=gpu is for worker jobs: a scheduler belongs to no pool"),
            (Role::Worker, Some("gpu"), &[("gres", "gpu:3")], "--gres=gpu:3 asks for 3 gpu, more than pool_gres_max=2 for pool gpu"),
            (Role::Worker, Some("gpu"), &[("gpus", "3")], "--gpus=3 asks for 3 gpu, more than pool_gres_max=2 for pool gpu"),
            (Role::Worker, Some("gpu"), &[("tres-per-task", "cpu=1,gres/gpu=3")], "--tres-per-task=cpu=1,gres/gpu=3 asks for 3 gpu, more than pool_gres_max=2 for pool gpu"),
            (Role::Worker, None, &[("gres", "gpu:1")], "--gres=gpu:1 asks for 1 gpu, more than pool_gres_max=0 for the default pool"),
            (Role::Worker, Some("gpu"), &[("gres", "mps:10")], "--gres=mps:10 is not allowed: gres mps is not one dask jobs may use (gres=gpu)"),
            (Role::Worker, Some("gpu"), &[("mem", "17G")], "--mem=17G exceeds pool_mem_max=16G for pool gpu"),
            (Role::Worker, Some("gpu"), &[("mem-per-cpu", "9G"), ("cpus-per-task", "2")], "--mem-per-cpu=9G with 2 cpus exceeds pool_mem_max=16G for pool gpu"),
            (Role::Worker, Some("gpu"), &[("time", "4:00:01")], "--time=4:00:01 exceeds pool_time_max=4:00:00 for pool gpu"),
            (Role::Worker, Some("gpu"), &[("time", "UNLIMITED")], "--time=UNLIMITED exceeds pool_time_max=4:00:00 for pool gpu"),
            (Role::Worker, Some("gpu"), &[("array", "1-9")], "--array=1-9 asks for 9 worker jobs, more than pool_jobs_max=8 for pool gpu"),
            (Role::Worker, Some("gpu"), &[("gres", "g|pu")], "--gres=g|pu: not a generic resource list (e.g. gpu:1)"),
        ];
        for (role, pool, pairs, want) in cases {
            let pool: Option<PoolName> = pool.map(|p| p.parse().unwrap());
            let got = check_submit(*role, pool.as_ref(), &asked(pairs), &p);
            assert_eq!(got, Err(want.to_string()), "{pairs:?}");
        }
        // The site's default memory and time count against a pool's maxima.
        let mut small = site();
        small.pools.mem_max_mb = PerPool::parse("gpu=2G", parse_mem_mb).unwrap();
        assert_eq!(
            check_submit(Role::Worker, gpu.as_ref(), &asked(&[]), &small).unwrap_err(),
            "--mem=3G (worker_mem) exceeds pool_mem_max=2G for pool gpu"
        );
    }

    #[test]
    fn a_site_without_gres_through_dask_says_so_in_one_line() {
        let mut p = Policy::default();
        p.pools.gres = Allowed::None;
        for role in Role::ALL {
            assert_eq!(
                check_submit(role, None, &asked(&[("gres", "gpu:1")]), &p).unwrap_err(),
                "--gres=gpu:1 is not allowed: this site gives dask jobs no generic resources (gres=none)"
            );
        }
        assert_eq!(
            check_job(
                Role::Worker,
                gpu().as_ref(),
                &parse_gres_list("gpu:1").unwrap(),
                1024,
                Some(60),
                &p
            )
            .unwrap_err(),
            "gres gpu:1 is not allowed: this site gives dask jobs no generic resources (gres=none)"
        );
        assert_eq!(check_submit(Role::Worker, None, &asked(&[]), &p), Ok(()));
    }

    #[test]
    fn node_refusals_name_what_the_job_got_and_the_key() {
        let p = site();
        let gpu = gpu();
        let g3 = parse_gres_list("gpu:3").unwrap();
        let g1 = parse_gres_list("gpu:1").unwrap();
        type Case<'a> = (Option<&'a PoolName>, &'a [Gres], u64, Option<u64>, &'a str);
        let cases: &[Case] = &[
            (
                gpu.as_ref(),
                &g3,
                1024,
                Some(60),
                "the job has 3 gpu, more than pool_gres_max=2 for pool gpu",
            ),
            (
                None,
                &g1,
                1024,
                Some(60),
                "the job has 1 gpu, more than pool_gres_max=0 for the default pool",
            ),
            (
                gpu.as_ref(),
                &g1,
                17 * 1024,
                Some(60),
                "memory 17G exceeds pool_mem_max=16G for pool gpu",
            ),
            (
                gpu.as_ref(),
                &g1,
                1024,
                None,
                "time limit UNLIMITED exceeds pool_time_max=4:00:00 for pool gpu",
            ),
            (
                gpu.as_ref(),
                &g1,
                1024,
                Some(5 * 3600),
                "time limit 5:00:00 exceeds pool_time_max=4:00:00 for pool gpu",
            ),
        ];
        for (pool, gres, mem, time, want) in cases {
            let got = check_job(Role::Worker, *pool, gres, *mem, *time, &p);
            assert_eq!(got, Err(want.to_string()));
        }
        let other: PoolName = "other".parse().unwrap();
        assert_eq!(
            check_job(Role::Worker, Some(&other), &[], 1024, Some(60), &p).unwrap_err(),
            "--dask-pool=other is not allowed: worker_pools=gpu,bigmem"
        );
    }
}

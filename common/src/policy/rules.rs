//! The site's rules for a role's jobs, one table for both checks: each
//! rule has its side at submission (`check_submit`: the options the user
//! gave, filled in with the defaults) and its side on the node
//! (`check_job`: what slurmctld granted, which a private plugstack or a
//! changed job cannot get around). A rule added here is checked in both
//! places, in the same order, with messages naming the same key.

use super::{AccountPolicy, Asked, JobFacts, Policy, RolePolicy};
use crate::names::Role;
use crate::units::{format_mem_mb, format_time_s, parse_mem_mb, parse_time_s};

/// What a rule sees at submission.
pub struct Submit<'a> {
    pub role: Role,
    pub asked: &'a dyn Asked,
    /// With the pool's maxima in place of the role's (`Policy::for_pool`).
    pub policy: &'a Policy,
    pub primary_group: &'a str,
}

/// What a rule sees on the node.
pub struct OnNode<'a> {
    pub role: Role,
    pub facts: &'a JobFacts,
    /// With the pool's maxima in place of the role's (`Policy::for_pool`).
    pub policy: &'a Policy,
    pub primary_group: &'a str,
}

impl Submit<'_> {
    fn p(&self) -> &RolePolicy {
        self.policy.role(self.role)
    }
}

impl OnNode<'_> {
    fn p(&self) -> &RolePolicy {
        self.policy.role(self.role)
    }
}

/// One rule: what it is about, its check at submission (which may add
/// sbatch arguments for what the user left out) and on the node.
pub struct Rule {
    pub about: &'static str,
    pub submit: fn(&Submit, &mut Vec<String>) -> Result<(), String>,
    pub on_node: fn(&OnNode) -> Result<(), String>,
}

/// Every rule, in the order both checks apply them (the first broken one
/// is the one said).
pub const RULES: &[Rule] = &[
    Rule {
        about: "partition",
        submit: submit_partition,
        on_node: node_partition,
    },
    Rule {
        about: "account",
        submit: submit_account,
        on_node: node_account,
    },
    Rule {
        about: "licences",
        submit: submit_licenses,
        on_node: node_licenses,
    },
    Rule {
        about: "one task on one node",
        submit: submit_one_task,
        on_node: node_one_task,
    },
    Rule {
        about: "cpus",
        submit: submit_cpus,
        on_node: node_cpus,
    },
    Rule {
        about: "memory",
        submit: submit_mem,
        on_node: node_mem,
    },
    Rule {
        about: "time",
        submit: submit_time,
        on_node: node_time,
    },
    Rule {
        about: "worker jobs per submission",
        submit: submit_array,
        on_node: node_array,
    },
];

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Scheduler => "dask schedulers",
        Role::Worker => "dask workers",
    }
}

/// `--partition`: the role's partition, if the site sets one.
fn submit_partition(s: &Submit, insert: &mut Vec<String>) -> Result<(), String> {
    let key = s.role.as_str();
    match (s.asked.get("partition"), &s.p().partition) {
        (Some(v), Some(want)) if v != want => {
            return Err(format!(
                "--partition={v} is not allowed for {}: {key}_partition={want}",
                role_name(s.role)
            ))
        }
        (None, Some(want)) => insert.push(format!("--partition={want}")),
        _ => {}
    }
    Ok(())
}

fn node_partition(n: &OnNode) -> Result<(), String> {
    let key = n.role.as_str();
    match &n.p().partition {
        Some(want) if &n.facts.partition != want => Err(format!(
            "partition {} is not allowed for {}: {key}_partition={want}",
            n.facts.partition,
            role_name(n.role)
        )),
        _ => Ok(()),
    }
}

/// `--account`: the account the user's dask jobs are charged to, if the
/// site sets one.
fn submit_account(s: &Submit, insert: &mut Vec<String>) -> Result<(), String> {
    if let Some(want) = s.policy.expected_account(s.primary_group) {
        match s.asked.get("account") {
            Some(v) if v != want => {
                return Err(format!(
                    "--account={v} is not allowed for dask jobs: they are charged to account {want} ({})",
                    match s.policy.account {
                        AccountPolicy::PrimaryGroup => "account=primary-group".to_string(),
                        _ => format!("account={want}"),
                    }
                ))
            }
            Some(_) => {}
            None => insert.push(format!("--account={want}")),
        }
    }
    Ok(())
}

fn node_account(n: &OnNode) -> Result<(), String> {
    match n.policy.expected_account(n.primary_group) {
        Some(want) if n.facts.account != want => Err(format!(
            "account {} is not allowed: dask jobs of this user are charged to account {want}",
            if n.facts.account.is_empty() {
                "(none)"
            } else {
                &n.facts.account
            }
        )),
        _ => Ok(()),
    }
}

/// `--licenses`: must include each of the role's licences.
fn submit_licenses(s: &Submit, insert: &mut Vec<String>) -> Result<(), String> {
    let (key, p) = (s.role.as_str(), s.p());
    if p.licenses.is_empty() {
        return Ok(());
    }
    match s.asked.get("licenses") {
        Some(v) => {
            let names: Vec<&str> = v
                .split(',')
                .map(|l| l.split([':', '@']).next().unwrap_or(""))
                .collect();
            if let Some(missing) = p.licenses.iter().find(|l| !names.contains(&l.as_str())) {
                return Err(format!(
                    "--licenses={v} must include {missing} for {}: {key}_licenses={}",
                    role_name(s.role),
                    p.licenses.join(",")
                ));
            }
        }
        None => insert.push(format!("--licenses={}", p.licenses.join(","))),
    }
    Ok(())
}

fn node_licenses(n: &OnNode) -> Result<(), String> {
    let (key, p) = (n.role.as_str(), n.p());
    match p.licenses.iter().find(|l| !n.facts.licenses.contains(l)) {
        Some(l) => Err(format!(
            "licence {l} is missing: {key}_licenses={}",
            p.licenses.join(",")
        )),
        None => Ok(()),
    }
}

/// `--ntasks` and `--nodes`: a dask-spank job is one task on one node.
fn submit_one_task(s: &Submit, insert: &mut Vec<String>) -> Result<(), String> {
    if let Some(n) = s.asked.get("ntasks") {
        if n != "1" {
            return Err(format!(
                "--ntasks={n} is not allowed: a dask-spank job runs 1 task"
            ));
        }
    } else {
        insert.push("--ntasks=1".into());
    }
    if let Some(n) = s.asked.get("nodes") {
        if n != "1" && n != "1-1" {
            return Err(format!(
                "--nodes={n} is not allowed: a dask-spank job runs on 1 node"
            ));
        }
    }
    Ok(())
}

fn node_one_task(n: &OnNode) -> Result<(), String> {
    if n.facts.num_tasks != 1 {
        return Err(format!(
            "{} tasks: a dask-spank job runs 1 task",
            n.facts.num_tasks
        ));
    }
    if n.facts.num_nodes != 1 {
        return Err(format!(
            "{} nodes: a dask-spank job runs on 1 node",
            n.facts.num_nodes
        ));
    }
    Ok(())
}

/// The cpus a submission asks for (`--cpus-per-task`, else the role's
/// default).
fn asked_cpus(s: &Submit) -> Result<u32, String> {
    match s.asked.get("cpus-per-task") {
        Some(v) => v
            .parse()
            .ok()
            .filter(|c| *c > 0)
            .ok_or_else(|| format!("--cpus-per-task={v}: not a positive whole number")),
        None => Ok(s.p().cpus),
    }
}

/// `--cpus-per-task`: at most the role's maximum.
fn submit_cpus(s: &Submit, insert: &mut Vec<String>) -> Result<(), String> {
    let c = asked_cpus(s)?;
    match s.asked.get("cpus-per-task") {
        Some(v) if c > s.p().cpus_max => Err(match s.role {
            Role::Scheduler => format!(
                "--cpus-per-task={v} is not allowed: the dask scheduler runs on {} cpu",
                s.p().cpus_max
            ),
            Role::Worker => format!(
                "--cpus-per-task={v} exceeds {}_cpus_max={}",
                s.role.as_str(),
                s.p().cpus_max
            ),
        }),
        Some(_) => Ok(()),
        None => {
            insert.push(format!("--cpus-per-task={c}"));
            Ok(())
        }
    }
}

fn node_cpus(n: &OnNode) -> Result<(), String> {
    let (cpus, max) = (n.facts.cpus, n.p().cpus_max);
    if cpus <= max {
        return Ok(());
    }
    Err(match n.role {
        Role::Scheduler => format!("{cpus} cpus: the dask scheduler runs on {max} cpu"),
        Role::Worker => format!("{cpus} cpus exceed worker_cpus_max={max}"),
    })
}

/// `--mem` (or `--mem-per-cpu` times the job's cpus): at most the role's
/// maximum, never the whole node; no `--mem-per-gpu`.
fn submit_mem(s: &Submit, insert: &mut Vec<String>) -> Result<(), String> {
    let (key, p) = (s.role.as_str(), s.p());
    let mem_max = format_mem_mb(p.mem_max_mb);
    if let Some(v) = s.asked.get("mem") {
        let m = parse_mem_mb(v).ok_or_else(|| format!("--mem={v}: not a memory size (e.g. 3G)"))?;
        if m == 0 {
            return Err(format!(
                "--mem={v} (all of the node's memory) exceeds {key}_mem_max={mem_max}"
            ));
        }
        if m > p.mem_max_mb {
            return Err(format!("--mem={v} exceeds {key}_mem_max={mem_max}"));
        }
    } else if let Some(v) = s.asked.get("mem-per-cpu") {
        let m = parse_mem_mb(v)
            .ok_or_else(|| format!("--mem-per-cpu={v}: not a memory size (e.g. 3G)"))?;
        // The cpus rule ran first: they are valid.
        let cpus = asked_cpus(s).unwrap_or(p.cpus);
        if m == 0 || m.saturating_mul(cpus as u64) > p.mem_max_mb {
            return Err(format!(
                "--mem-per-cpu={v} with {cpus} cpus exceeds {key}_mem_max={mem_max}"
            ));
        }
    } else if s.asked.has("mem-per-gpu") {
        return Err("--mem-per-gpu is not allowed for dask-spank jobs: use --mem".into());
    } else {
        insert.push(format!("--mem={}", format_mem_mb(p.mem_mb)));
    }
    Ok(())
}

fn node_mem(n: &OnNode) -> Result<(), String> {
    let (key, p) = (n.role.as_str(), n.p());
    let mem_max = format_mem_mb(p.mem_max_mb);
    if n.facts.mem_mb == 0 {
        return Err(format!(
            "no memory limit (all of the node's memory) exceeds {key}_mem_max={mem_max}"
        ));
    }
    if n.facts.mem_mb > p.mem_max_mb {
        return Err(format!(
            "memory {} exceeds {key}_mem_max={mem_max}",
            format_mem_mb(n.facts.mem_mb)
        ));
    }
    Ok(())
}

/// `--time`: at most the role's maximum, never UNLIMITED.
fn submit_time(s: &Submit, insert: &mut Vec<String>) -> Result<(), String> {
    let (key, p) = (s.role.as_str(), s.p());
    let time_max = format_time_s(p.time_max_s);
    if let Some(v) = s.asked.get("time") {
        match parse_time_s(v) {
            None => return Err(format!("--time={v}: not a Slurm time (e.g. 2:00:00)")),
            Some(None) => return Err(format!("--time={v} exceeds {key}_time_max={time_max}")),
            Some(Some(t)) if t > p.time_max_s => {
                return Err(format!("--time={v} exceeds {key}_time_max={time_max}"))
            }
            Some(Some(_)) => {}
        }
    } else {
        insert.push(format!("--time={}", format_time_s(p.time_s)));
    }
    Ok(())
}

fn node_time(n: &OnNode) -> Result<(), String> {
    let (key, p) = (n.role.as_str(), n.p());
    let time_max = format_time_s(p.time_max_s);
    match n.facts.time_limit_s {
        None => Err(format!(
            "time limit UNLIMITED exceeds {key}_time_max={time_max}"
        )),
        Some(t) if t > p.time_max_s => Err(format!(
            "time limit {} exceeds {key}_time_max={time_max}",
            format_time_s(t)
        )),
        _ => Ok(()),
    }
}

/// `--array`: workers only, at most `max_worker_jobs` tasks.
fn submit_array(s: &Submit, _insert: &mut Vec<String>) -> Result<(), String> {
    let Some(a) = s.asked.get("array") else {
        return Ok(());
    };
    match s.role {
        Role::Scheduler => Err(format!(
            "--array={a} is not allowed for the scheduler: a dask cluster has one scheduler job"
        )),
        Role::Worker => {
            let n = super::array_task_count(a)
                .ok_or_else(|| format!("--array={a}: not an array specification (e.g. 1-100)"))?;
            if n > s.policy.max_worker_jobs as u64 {
                return Err(format!(
                    "--array={a} asks for {n} worker jobs, more than max_worker_jobs={}",
                    s.policy.max_worker_jobs
                ));
            }
            Ok(())
        }
    }
}

/// Not checked on the node, deliberately: each array task is a job of its
/// own there, and `max_worker_jobs` is a guard against typos at sbatch; a
/// per-user cap nobody can get past is Slurm's (a QOS or association
/// limit; the admin guide says so).
fn node_array(_n: &OnNode) -> Result<(), String> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{asked, cc_in2p3 as site, good_facts as facts};
    use super::super::{check_job, check_submit};
    use super::*;

    /// Each rule, broken at submission and on the node: both checks refuse
    /// it, and both say the same thing (the key, or the rule's words).
    #[test]
    fn both_sides_of_each_rule_refuse_it_in_the_same_words() {
        type Bend = fn(&mut JobFacts);
        type Case = (
            &'static str,
            &'static [(&'static str, &'static str)],
            Bend,
            &'static str,
        );
        let cases: [Case; 7] = [
            (
                "partition",
                &[("partition", "gpu")],
                |f| f.partition = "gpu".into(),
                "worker_partition=htc",
            ),
            (
                "account",
                &[("account", "other")],
                |f| f.account = "other".into(),
                "charged to account phys",
            ),
            (
                "licences",
                &[("licenses", "foo")],
                |f| f.licenses.clear(),
                "worker_licenses=sps",
            ),
            (
                "one task on one node",
                &[("ntasks", "2")],
                |f| f.num_tasks = 2,
                "a dask-spank job runs 1 task",
            ),
            (
                "cpus",
                &[("cpus-per-task", "64")],
                |f| f.cpus = 64,
                "worker_cpus_max=32",
            ),
            (
                "memory",
                &[("mem", "64G")],
                |f| f.mem_mb = 65536,
                "worker_mem_max=32G",
            ),
            (
                "time",
                &[("time", "9:00:00")],
                |f| f.time_limit_s = Some(32400),
                "worker_time_max=8:00:00",
            ),
        ];
        let p = site();
        assert!(check_submit(Role::Worker, None, &asked(&[]), &p, "phys").is_ok());
        assert!(check_job(Role::Worker, None, &facts(), &p, "phys").is_ok());
        for (about, opts, bend, said) in cases {
            assert!(RULES.iter().any(|r| r.about == about), "{about}");
            let e = check_submit(Role::Worker, None, &asked(opts), &p, "phys").unwrap_err();
            assert!(e.contains(said), "submit, {about}: {e}");
            let mut f = facts();
            bend(&mut f);
            let e = check_job(Role::Worker, None, &f, &p, "phys").unwrap_err();
            assert!(e.contains(said), "node, {about}: {e}");
        }
    }
}

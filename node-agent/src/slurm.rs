//! What slurmctld says about a job, read with `scontrol` and `squeue`.
//!
//! SPANK does not expose a job's partition, account, licences or time limit
//! to slurmstepd, so the agent asks the controller: the answer reflects what
//! the job was really granted, whatever the submit side did.

use dask_spank_common::policy::JobFacts;
use dask_spank_common::units::{parse_mem_mb, parse_time_s};
use std::collections::HashMap;
use std::time::Duration;
use tokio::process::Command;

/// Bound on one scontrol/squeue call.
const SLURM_CMD_TIMEOUT: Duration = Duration::from_secs(15);

/// Split `scontrol -o show job` output into fields. Values may contain
/// spaces (paths); a word that does not look like `Key=` continues the
/// previous value.
pub fn parse_show_job(line: &str) -> HashMap<String, String> {
    let mut out: HashMap<String, String> = HashMap::new();
    let mut last: Option<String> = None;
    for word in line.trim().split(' ') {
        let key = word.split_once('=').map(|(k, _)| k).filter(|k| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/:_".contains(c))
        });
        match (key, &last) {
            (Some(k), _) => {
                let v = &word[k.len() + 1..];
                out.insert(k.to_string(), v.to_string());
                last = Some(k.to_string());
            }
            (None, Some(k)) => {
                if let Some(v) = out.get_mut(k) {
                    v.push(' ');
                    v.push_str(word);
                }
            }
            (None, None) => {}
        }
    }
    out
}

fn num<T: std::str::FromStr>(f: &HashMap<String, String>, k: &str) -> Result<T, String> {
    f.get(k)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("scontrol shows no usable {k}"))
}

/// The policy-relevant facts, and the job name.
pub fn facts(f: &HashMap<String, String>) -> Result<(JobFacts, String), String> {
    let cpus: u32 = num(f, "NumCPUs")?;
    let mem_mb = match (f.get("MinMemoryNode"), f.get("MinMemoryCPU")) {
        (Some(v), _) => parse_mem_mb(v).ok_or_else(|| format!("unreadable MinMemoryNode={v}"))?,
        (None, Some(v)) => {
            parse_mem_mb(v).ok_or_else(|| format!("unreadable MinMemoryCPU={v}"))? * cpus as u64
        }
        (None, None) => 0,
    };
    let licenses = match f.get("Licenses").map(String::as_str) {
        None | Some("(null)") | Some("") => vec![],
        Some(l) => l
            .split(',')
            .map(|x| x.split([':', '*', '@']).next().unwrap_or("").to_string())
            .collect(),
    };
    let time_limit_s = match f.get("TimeLimit") {
        Some(t) => parse_time_s(t).flatten(),
        None => None,
    };
    let account = match f.get("Account").map(String::as_str) {
        None | Some("(null)") => String::new(),
        Some(a) => a.to_string(),
    };
    Ok((
        JobFacts {
            partition: f.get("Partition").cloned().unwrap_or_default(),
            account,
            licenses,
            num_tasks: num(f, "NumTasks")?,
            num_nodes: f
                .get("NumNodes")
                .and_then(|n| n.split('-').next().and_then(|x| x.parse().ok()))
                .ok_or("scontrol shows no usable NumNodes")?,
            cpus,
            mem_mb,
            time_limit_s,
        },
        f.get("JobName").cloned().unwrap_or_default(),
    ))
}

async fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = tokio::time::timeout(
        SLURM_CMD_TIMEOUT,
        Command::new(cmd).args(args).kill_on_drop(true).output(),
    )
    .await
    .map_err(|_| {
        format!(
            "{cmd} did not answer within {}s",
            SLURM_CMD_TIMEOUT.as_secs()
        )
    })?
    .map_err(|e| format!("cannot run {cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub async fn show_job(job_id: u32) -> Result<HashMap<String, String>, String> {
    let out = run("scontrol", &["-o", "show", "job", &job_id.to_string()]).await?;
    Ok(parse_show_job(out.lines().next().unwrap_or("")))
}

/// Number of RUNNING jobs of `user` named `name` (array tasks counted one by one).
pub async fn running_jobs_named(user: &str, name: &str) -> Result<usize, String> {
    let out = run(
        "squeue",
        &[
            "-h", "-r", "-u", user, "-n", name, "-t", "RUNNING", "-o", "%i",
        ],
    )
    .await?;
    Ok(out.lines().filter(|l| !l.trim().is_empty()).count())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "JobId=31 JobName=dask-worker-ana UserId=u(1001) GroupId=u(1001) Account=phys QOS=(null) JobState=RUNNING TimeLimit=02:00:00 Partition=htc NumNodes=1 NumCPUs=2 NumTasks=1 CPUs/Task=2 TRES=cpu=2,mem=3G,node=1 MinMemoryNode=3G Licenses=sps:2,other Command=/home/u/my job.sh WorkDir=/home/u/a b StdOut=/x";

    #[test]
    fn fields_with_spaces() {
        let f = parse_show_job(LINE);
        assert_eq!(f["Command"], "/home/u/my job.sh");
        assert_eq!(f["WorkDir"], "/home/u/a b");
        assert_eq!(f["TRES"], "cpu=2,mem=3G,node=1");
        assert_eq!(f["CPUs/Task"], "2");
    }

    #[test]
    fn facts_from_scontrol() {
        let (got, name) = facts(&parse_show_job(LINE)).unwrap();
        assert_eq!(name, "dask-worker-ana");
        assert_eq!(
            got,
            JobFacts {
                partition: "htc".into(),
                account: "phys".into(),
                licenses: vec!["sps".into(), "other".into()],
                num_tasks: 1,
                num_nodes: 1,
                cpus: 2,
                mem_mb: 3072,
                time_limit_s: Some(7200),
            }
        );
        let (f2, _) = facts(&parse_show_job(
            "JobName=x Account=(null) TimeLimit=UNLIMITED Partition=p NumNodes=1 NumCPUs=4 NumTasks=1 MinMemoryCPU=1G Licenses=(null)",
        ))
        .unwrap();
        assert_eq!(
            (f2.mem_mb, f2.time_limit_s, f2.account.as_str()),
            (4096, None, "")
        );
        assert!(f2.licenses.is_empty());
        assert!(facts(&parse_show_job("JobName=x")).is_err());
    }
}

//! What slurmctld says about a job: one `squeue` call per job start (two
//! RPCs to slurmctld: the job, and the partitions squeue always loads).
//!
//! SPANK does not expose a job's partition, account, licences or time limit
//! to slurmstepd, so the agent asks the controller. The answer must not be
//! forgeable by the job's owner, who controls free-text fields (job name,
//! comment, command, work dir, and the account where no accounting
//! database checks it). So the agent asks for exactly the fields it needs,
//! separated by `|`, with the admin-defined fields first (numbers, state,
//! partition and licence names, which Slurm validates) and the only two
//! free-text fields last: the account, then the job name. The job name is
//! known in advance (`dask-<role>-<cluster>`), so it is checked as the
//! suffix of the line, and the account is what lies between the fixed
//! fields and the name. No user text can shift a field.
//!
//! Memory and cpus come from slurmstepd itself (the registration), not
//! from here.

use crate::spawning::spawn::{self, Starter};
use dask_spank_common::pool_policy::{parse_gres_list, Gres};
use dask_spank_common::units::parse_time_s;
use std::time::Duration;

/// Bound on one squeue call.
const SLURM_CMD_TIMEOUT: Duration = Duration::from_secs(15);

/// The fields asked for, in this order; the last two are free text.
pub const FIELDS: &[&str] = &[
    "JobID",
    "UserId",
    "NumNodes",
    "NumTasks",
    "TimeLimit",
    "TimeLeft",
    "State",
    "Partition",
    "Licenses",
    // Generic resources, in each way a job can ask for them (validated
    // names: the site's GresTypes). One task on one node: a count per
    // node, per job or per task is the job's.
    "tres-per-node",
    "tres-per-job",
    "tres-per-task",
    "tres-per-socket",
    "Account",
    "Name",
];
/// Where the gres fields are among `FIELDS`.
const GRES_FIELDS: std::ops::Range<usize> = 9..13;
const FIXED: usize = FIELDS.len() - 2;

/// What the controller says about one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerFacts {
    pub job_id: u32,
    pub uid: u32,
    pub num_nodes: u32,
    pub num_tasks: u32,
    /// None: unlimited.
    pub time_limit_s: Option<u64>,
    /// None: unlimited.
    pub time_left_s: Option<u64>,
    pub state: String,
    pub partition: String,
    /// Licence names (counts dropped).
    pub licenses: Vec<String>,
    /// Empty when the job has none.
    pub account: String,
    /// Generic resources of the job (the largest count of each that any
    /// of the tres-per-* fields shows).
    pub gres: Vec<Gres>,
}

/// Why the controller's answer cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FactsError {
    /// The job's name is not the one its role and cluster give it.
    #[error(
        "job name is not {expected} (the name of cluster {cluster}'s {role} jobs): got `{got}`"
    )]
    Name {
        expected: String,
        cluster: String,
        role: String,
        got: String,
    },
    /// The controller could not be asked, or answered nonsense.
    #[error("{0}")]
    Slurm(String),
}

/// The `-O` argument of squeue.
pub fn format_arg() -> String {
    FIELDS
        .iter()
        .map(|f| format!("{f}:|"))
        .collect::<Vec<_>>()
        .join(",")
}

fn time(field: &str, v: &str) -> Result<Option<u64>, FactsError> {
    parse_time_s(v)
        .ok_or_else(|| FactsError::Slurm(format!("squeue shows an unreadable {field} {v}")))
}

fn num<T: std::str::FromStr>(field: &str, v: &str) -> Result<T, FactsError> {
    v.parse()
        .map_err(|_| FactsError::Slurm(format!("squeue shows an unreadable {field} {v}")))
}

/// Parse squeue's line for a job that must be named `expected_name`.
/// `what` names the role and cluster for the error.
pub fn parse(
    line: &str,
    expected_name: &str,
    what: (&str, &str),
) -> Result<ControllerFacts, FactsError> {
    // Every field ends with `|`, the last one too.
    let line = line.strip_suffix('\n').unwrap_or(line);
    let line = line.strip_suffix('|').unwrap_or(line);
    let mut fixed = line.splitn(FIXED + 1, '|');
    let f: Vec<&str> = fixed.by_ref().take(FIXED).collect();
    let rest = fixed.next().unwrap_or("");
    if f.len() != FIXED || line.is_empty() {
        return Err(FactsError::Slurm(format!(
            "squeue printed an unexpected line: {line}"
        )));
    }
    let Some(account) = rest
        .strip_suffix(expected_name)
        .and_then(|r| r.strip_suffix('|'))
    else {
        return Err(FactsError::Name {
            expected: expected_name.to_string(),
            cluster: what.1.to_string(),
            role: what.0.to_string(),
            got: rest.to_string(),
        });
    };
    let nodes: String = f[2].split('-').next().unwrap_or("").to_string();
    Ok(ControllerFacts {
        job_id: num("JobID", f[0])?,
        uid: num("UserId", f[1])?,
        num_nodes: num("NumNodes", &nodes)?,
        num_tasks: num("NumTasks", f[3])?,
        time_limit_s: time("TimeLimit", f[4])?,
        time_left_s: time("TimeLeft", f[5])?,
        state: f[6].to_string(),
        partition: f[7].to_string(),
        licenses: match f[8] {
            "" | "(null)" => vec![],
            l => l
                .split(',')
                .map(|x| x.split([':', '*', '@']).next().unwrap_or("").to_string())
                .collect(),
        },
        account: match account {
            "(null)" => String::new(),
            a => a.to_string(),
        },
        gres: gres(&f[GRES_FIELDS])?,
    })
}

/// The job's gres from the tres-per-* fields: the largest count of each
/// name (a job that asked per node and per job shows both).
fn gres(fields: &[&str]) -> Result<Vec<Gres>, FactsError> {
    let mut out: Vec<Gres> = Vec::new();
    for f in fields {
        // Only the gres entries: tres-per-task also carries `cpu=N`.
        let words: Vec<&str> = f.split(',').filter(|w| w.starts_with("gres")).collect();
        let list = parse_gres_list(&words.join(","))
            .ok_or_else(|| FactsError::Slurm(format!("squeue shows unreadable gres {f}")))?;
        for g in list {
            match out.iter_mut().find(|o| o.name == g.name) {
                Some(o) => o.count = o.count.max(g.count),
                None => out.push(g),
            }
        }
    }
    Ok(out)
}

/// Ask the controller about one job (one squeue call). `label` names it
/// as squeue does: `1234_5` for an array task (the array's own id would
/// list all its tasks), the job id otherwise.
pub async fn job_facts(
    via: &Starter,
    label: &str,
    expected_name: &str,
    what: (&str, &str),
) -> Result<ControllerFacts, FactsError> {
    // --local: the job is this cluster's, so squeue need not first ask for
    // the federation (one RPC of three saved per job start; the other two,
    // the job and the partitions squeue always loads, remain; see
    // docs/performance.md).
    let args = ["--local", "-h", "-j", label, "-O", &format_arg()].map(String::from);
    let out = spawn::output(via, "squeue", &args, SLURM_CMD_TIMEOUT)
        .await
        .map_err(|e| FactsError::Slurm(format!("cannot run squeue: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    if text.trim().is_empty() && (out.status.success() || err.contains("Invalid job id")) {
        return Err(FactsError::Slurm(format!(
            "slurmctld does not know job {label}"
        )));
    }
    if !out.status.success() {
        return Err(FactsError::Slurm(format!(
            "squeue -j {label} failed: {}",
            err.trim()
        )));
    }
    parse(&text, expected_name, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "dask-worker-ana";
    const WHAT: (&str, &str) = ("worker", "ana");

    #[test]
    fn the_format_asks_for_every_field_with_a_separator() {
        assert!(format_arg().starts_with("JobID:|,UserId:|,"));
        assert!(format_arg().ends_with("Account:|,Name:|"));
    }

    #[test]
    fn parses_a_line() {
        let f = parse(
            "31|1001|1|1|2:00:00|1:59:30|RUNNING|htc|sps:2,other|gres:gpu:1|gres/gpu:2|cpu=1|N/A|phys|dask-worker-ana\n",
            NAME,
            WHAT,
        )
        .unwrap();
        assert_eq!(
            f,
            ControllerFacts {
                job_id: 31,
                uid: 1001,
                num_nodes: 1,
                num_tasks: 1,
                time_limit_s: Some(7200),
                time_left_s: Some(7170),
                state: "RUNNING".into(),
                partition: "htc".into(),
                licenses: vec!["sps".into(), "other".into()],
                account: "phys".into(),
                gres: vec![Gres {
                    name: "gpu".into(),
                    count: 2
                }],
            }
        );
        let g = parse(
            "7|1|1|1|UNLIMITED|UNLIMITED|RUNNING|p|(null)|(null)|(null)|(null)|(null)|(null)|dask-worker-ana",
            NAME,
            WHAT,
        )
        .unwrap();
        assert_eq!(
            (g.time_limit_s, g.licenses.len(), g.account.as_str()),
            (None, 0, "")
        );
    }

    #[test]
    fn free_text_cannot_shift_or_forge_fields() {
        // An account and a job name full of separators and key=value words.
        let acct = "a|b NumCPUs=1|Partition=htc";
        let line = format!("31|1001|1|1|2:00:00|1:00:00|RUNNING|other|(null)|||||{acct}|{NAME}");
        let f = parse(&line, NAME, WHAT).unwrap();
        assert_eq!((f.partition.as_str(), f.account.as_str()), ("other", acct));
        // A name with a line break cannot forge a second record.
        let nl = format!("31|1001|1|1|2:00:00|1:00:00|RUNNING|p|(null)|||||a|x\n31|1001|1|1|2:00:00|1:00:00|RUNNING|htc|sps|||||a|{NAME}|\n");
        let f = parse(&nl, NAME, WHAT).unwrap();
        assert_eq!((f.partition.as_str(), f.licenses.len()), ("p", 0));
        assert!(f.account.contains('\n'));
        // A name that merely starts with the expected one is refused.
        let forged = "31|1001|1|1|2:00:00|1:00:00|RUNNING|p|(null)|||||x|dask-worker-ana|htc";
        assert!(matches!(
            parse(forged, NAME, WHAT),
            Err(FactsError::Name { .. })
        ));
        let other = "31|1001|1|1|2:00:00|1:00:00|RUNNING|p|(null)|||||x|dask-worker-bob";
        let e = parse(other, NAME, WHAT).unwrap_err().to_string();
        assert!(
            e.contains("dask-worker-ana") && e.contains("x|dask-worker-bob"),
            "{e}"
        );
        assert!(matches!(parse("", NAME, WHAT), Err(FactsError::Slurm(_))));
        assert!(matches!(
            parse("1|2|3", NAME, WHAT),
            Err(FactsError::Slurm(_))
        ));
        assert!(matches!(
            parse(
                "x|1001|1|1|2:00:00|1:00:00|RUNNING|p|(null)|||||a|dask-worker-ana",
                NAME,
                WHAT
            ),
            Err(FactsError::Slurm(_))
        ));
    }
}

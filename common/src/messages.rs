//! Requests and responses. JSON inside length-prefixed frames (see
//! [`crate::frame`]). Every connection starts with [`Hello`].

use crate::names::{ClusterName, Role};
use crate::policy::Policy;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// First frame a client sends on every connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(deny_unknown_fields))]
pub struct Hello {
    pub version: u32,
    /// Who is talking ("spank", "attach", "cli"), for the agent's log.
    pub client: String,
}

/// Everything the agent needs to run one job's dask processes. Sent by the
/// plugin from slurmstepd (as root) when a `--dask-role` job step starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(deny_unknown_fields))]
pub struct JobSpec {
    pub job_id: u32,
    /// Set for array tasks: the array's master job id (%A) and task id (%a).
    pub array_job_id: Option<u32>,
    pub array_task_id: Option<u32>,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups of the job, as Slurm resolved them.
    pub groups: Vec<u32>,
    pub user: String,
    pub role: Role,
    pub cluster: ClusterName,
    /// `--dask-env`: a venv or conda prefix whose `bin/python` has distributed.
    pub env_prefix: Option<PathBuf>,
    pub cpus: u32,
    /// Memory allocated to the job on this node, in MiB (0: unknown/unlimited).
    pub mem_mb: u64,
    /// The job's time limit in seconds, when known.
    pub time_limit_s: Option<u64>,
    pub submit_dir: PathBuf,
    pub node: String,
    /// The slurmstepd that owns the job: user requests must come from one of
    /// its descendants.
    pub stepd_pid: i32,
    /// The node's site policy (from its root-owned plugstack.conf), which
    /// the agent checks the job against before starting anything.
    pub policy: Policy,
    /// `--dask-pool` of a worker job (None: the default pool). Defaulted
    /// when absent: an older plugin's registration is the default pool's.
    #[serde(default)]
    pub pool: Option<crate::names::PoolName>,
}

impl JobSpec {
    /// `1234_5` for an array task, `1234` otherwise: the name used in logs,
    /// in dask worker names and in file names.
    pub fn label(&self) -> String {
        crate::names::job_label(self.job_id, self.array_job_id, self.array_task_id)
    }
}

/// Where a job stands on its node, as the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Registered by the plugin; its job script has not attached yet.
    Registered,
    /// The dask process runs.
    Running,
    /// The worker died and is about to be started again.
    Restarting,
    /// Its processes are being stopped.
    Stopping,
    /// Its dask process ended normally or was stopped.
    Finished,
    /// Its dask process failed for good (crash loop, could not start).
    Failed,
    /// The site policy refused it before anything started.
    Refused,
    /// Slurm ended the job step.
    Ended,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Registered => "registered",
            JobState::Running => "running",
            JobState::Restarting => "restarting",
            JobState::Stopping => "stopping",
            JobState::Finished => "finished",
            JobState::Failed => "failed",
            JobState::Refused => "refused",
            JobState::Ended => "ended",
        }
    }

    /// Whether the job failed (for good) rather than ended.
    pub fn is_failure(self) -> bool {
        matches!(self, JobState::Failed | JobState::Refused)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the agent knows about one job, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(deny_unknown_fields))]
pub struct JobStatus {
    pub job_id: u32,
    pub label: String,
    pub user: String,
    pub role: Role,
    pub cluster: ClusterName,
    pub state: JobState,
    pub pid: Option<i32>,
    pub restarts: u32,
    pub memory_kills: u32,
    /// Why the job is finished, failed or refused (or the last crash).
    pub reason: Option<String>,
}

/// Sent by `dask-spank attach`, running as the user inside the job's batch
/// script. Its environment and cwd are those of the job script, so a script
/// that activated a conda env hands that env to the dask processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(deny_unknown_fields))]
pub struct Attach {
    pub job_id: u32,
    pub cwd: PathBuf,
    pub env: Vec<(String, String)>,
    /// The per-user cluster directory, created by the attaching process (root
    /// may not be able to write into a home on NFS). The agent passes it to
    /// dask on the command line and never opens anything in it.
    pub cluster_dir: PathBuf,
    /// Sent again after the connection to the agent was lost (the agent
    /// restarted): the job's processes run on, the new agent adopts them.
    #[serde(default)]
    pub reattach: bool,
    /// With `reattach`: the attaching process also passes the fork
    /// server's control socket it held for the agent (after the log).
    #[serde(default)]
    pub forkserver_fd: bool,
}

/// A process, named so that pid reuse cannot confuse it with another: its
/// pid and its start time (clock ticks after boot, `/proc/<pid>/stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(deny_unknown_fields))]
pub struct ProcIdent {
    pub pid: i32,
    pub start: u64,
}

/// A request answered with one response, after which the connection
/// closes (the control requests: the plugin's, the admin's, anybody's
/// ping and status).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(deny_unknown_fields))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Root only: a job step with `--dask-role` started on this node.
    Register(Box<JobSpec>),
    /// Root only: the job step ended; stop everything it owns.
    JobEnd { job_id: u32, reason: String },
    /// Anybody: liveness check.
    Ping,
    /// The jobs on this node: all of them for root, one's own otherwise.
    Status,
    /// Root only: Prometheus text metrics.
    Metrics,
    /// Root only: stop every job's dask processes now, failing the jobs
    /// with this reason (the admin's immediate stop).
    StopJobs { reason: String },
}

/// The first message of a connection after the handshake: a control
/// [`Request`], or the opening of an attach session, whose connection
/// stays open for the job's life (`Response::SendLogFd`, the log's
/// descriptor, `Response::Attached`, then [`SessionRequest`]s one way and
/// `Processes`/`HoldFd` the other, until `Response::Finished`). On the
/// wire both are one JSON object tagged by `type`; decoding takes the
/// `attach` tag to [`Attach`] and any other to [`Request`], so a bad
/// message is refused in the words of the type it claims to be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Opening {
    /// The job's own user, from inside the job: start the dask processes.
    /// After `Response::SendLogFd` the client passes the job's log file
    /// descriptor with SCM_RIGHTS.
    Attach(Attach),
    #[serde(untagged)]
    Request(Request),
}

impl<'de> Deserialize<'de> for Opening {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut v = serde_json::Value::deserialize(d)?;
        let attach = v.get("type").and_then(serde_json::Value::as_str) == Some("attach");
        if attach {
            if let Some(m) = v.as_object_mut() {
                m.remove("type");
            }
            Attach::deserialize(v)
                .map(Opening::Attach)
                .map_err(D::Error::custom)
        } else {
            Request::deserialize(v)
                .map(Opening::Request)
                .map_err(D::Error::custom)
        }
    }
}

impl From<Request> for Opening {
    fn from(r: Request) -> Opening {
        Opening::Request(r)
    }
}

/// What the attaching process sends on its attached connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(deny_unknown_fields))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SessionRequest {
    /// Whenever it finds a new address in the cluster's scheduler file: it
    /// reads the file as the user; root never does. The agent only
    /// connects to it to tell whether the scheduler is still there.
    SchedulerAddress { address: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(deny_unknown_fields))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// Handshake accepted.
    Welcome {
        version: u32,
    },
    Ok,
    Error {
        message: String,
    },
    /// Pass the log file descriptor now (one byte with SCM_RIGHTS).
    SendLogFd,
    /// The dask processes are starting; wait for `Finished`.
    Attached,
    /// On an attached connection: the job's process groups now (their
    /// leaders). If the agent goes away and does not come back, the
    /// attaching process stops them itself.
    Processes {
        groups: Vec<ProcIdent>,
    },
    /// On an attached connection: keep the descriptor that follows
    /// (SCM_RIGHTS), the agent's end of the fork server's control socket,
    /// and pass it back on `reattach`; the server keeps its workers while
    /// somebody holds it.
    HoldFd,
    /// The job's dask processes are over. `exit_code` becomes the exit code
    /// of `dask-spank attach`, hence of the batch script.
    Finished {
        exit_code: i32,
        reason: String,
    },
    Status {
        jobs: Vec<JobStatus>,
    },
    Metrics {
        text: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample_spec() -> JobSpec {
        JobSpec {
            job_id: 12,
            array_job_id: Some(10),
            array_task_id: Some(2),
            uid: 1000,
            gid: 1000,
            groups: vec![1000, 27],
            user: "alice".into(),
            role: Role::Worker,
            cluster: "ana".parse().unwrap(),
            pool: None,
            env_prefix: None,
            cpus: 1,
            mem_mb: 3072,
            time_limit_s: Some(7200),
            submit_dir: "/home/alice".into(),
            node: "n1".into(),
            stepd_pid: 4242,
            policy: Policy::default(),
        }
    }

    #[test]
    fn label_uses_array_ids_when_present() {
        let mut s = sample_spec();
        assert_eq!(s.label(), "10_2");
        s.array_job_id = None;
        s.array_task_id = None;
        assert_eq!(s.label(), "12");
    }

    #[test]
    fn requests_round_trip_as_tagged_json() {
        let r = Request::Register(Box::new(sample_spec()));
        let j = serde_json::to_string(&r).unwrap();
        assert!(j.starts_with("{\"type\":\"register\""), "{j}");
        assert_eq!(serde_json::from_str::<Request>(&j).unwrap(), r);
        let bad = r#"{"type":"register","job_id":1}"#;
        assert!(serde_json::from_str::<Request>(bad).is_err());
    }

    #[test]
    fn an_opening_is_an_attach_or_a_request_on_one_flat_wire() {
        let attach = Opening::Attach(Attach {
            job_id: 7,
            cwd: "/w".into(),
            env: vec![("A".into(), "1".into())],
            cluster_dir: "/c".into(),
            reattach: false,
            forkserver_fd: false,
        });
        let reg: Opening = Request::Register(Box::new(sample_spec())).into();
        for o in [attach, reg, Request::Ping.into()] {
            let j = serde_json::to_string(&o).unwrap();
            assert!(j.starts_with("{\"type\":"), "{j}");
            assert_eq!(serde_json::from_str::<Opening>(&j).unwrap(), o);
        }
        // A bad message is refused in the words of the type it claims.
        let e = serde_json::from_str::<Opening>(r#"{"type":"job_end","job_id":1}"#).unwrap_err();
        assert!(e.to_string().contains("missing field `reason`"), "{e}");
        let e = serde_json::from_str::<Opening>(r#"{"type":"attach","job_id":1}"#).unwrap_err();
        assert!(e.to_string().contains("missing field `cwd`"), "{e}");
        // A session message is not an opening.
        let e = serde_json::from_str::<Opening>(r#"{"type":"scheduler_address","address":"x"}"#)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("unknown variant `scheduler_address`"),
            "{e}"
        );
        let s: SessionRequest =
            serde_json::from_str(r#"{"type":"scheduler_address","address":"tls://h:1"}"#).unwrap();
        assert_eq!(
            s,
            SessionRequest::SchedulerAddress {
                address: "tls://h:1".into()
            }
        );
    }
}

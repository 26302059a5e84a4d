//! The agent's table of jobs on this node: registration by the plugin,
//! attach by the job's own process, live status, stop and end. Mirrored on
//! disk (`statefile`) so that a restarted agent can clean up after a crash.

use crate::statefile::{Record, StateDir};
use dask_spank_common::messages::JobStatus;
use dask_spank_common::JobSpec;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::watch;

struct Entry {
    record: Record,
    stop: watch::Sender<Option<String>>,
    attached: bool,
    status: JobStatus,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    #[error(
        "job {0} is not registered on this node (is --dask-role set, and did the job start here?)"
    )]
    Unknown(u32),
    #[error("job {job} belongs to uid {owner}; uid {peer} may not attach to it")]
    NotOwner { job: u32, owner: u32, peer: u32 },
    #[error("pid {pid} is not a process of job {job}")]
    NotInJob { job: u32, pid: i32 },
    #[error("job {0} is already attached")]
    AlreadyAttached(u32),
}

pub struct Jobs {
    proc_root: PathBuf,
    state: Option<StateDir>,
    table: Mutex<HashMap<u32, Entry>>,
    /// Status of ended jobs, kept a while so that `status` can still say
    /// why a job failed after Slurm forgot it.
    ended: Mutex<VecDeque<(Instant, u32, JobStatus)>>,
}

/// How long and how many ended jobs `status` remembers.
const ENDED_KEEP: Duration = Duration::from_secs(3600);
const ENDED_MAX: usize = 5000;

fn initial_status(spec: &JobSpec) -> JobStatus {
    JobStatus {
        job_id: spec.job_id,
        label: spec.label(),
        user: spec.user.clone(),
        role: spec.role,
        cluster: spec.cluster.clone(),
        state: "registered".into(),
        pid: None,
        restarts: 0,
        memory_kills: 0,
        reason: None,
    }
}

impl Jobs {
    pub fn new(proc_root: PathBuf, state: Option<StateDir>) -> Jobs {
        Jobs {
            proc_root,
            state,
            table: Mutex::new(HashMap::new()),
            ended: Mutex::new(VecDeque::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Entry>> {
        // A poisoned table is still consistent: every update is one insert,
        // remove or field assignment.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register (or re-register, e.g. after a requeue) a job.
    pub fn register(&self, spec: JobSpec) {
        self.insert(Record {
            spec,
            pgids: vec![],
        });
    }

    /// Restore a registration read back from disk after an agent restart.
    pub fn insert(&self, record: Record) {
        let (tx, _rx) = watch::channel(None);
        if let Some(s) = &self.state {
            s.save(&record);
        }
        let status = initial_status(&record.spec);
        let old = self.lock().insert(
            record.spec.job_id,
            Entry {
                record,
                stop: tx,
                attached: false,
                status,
            },
        );
        if let Some(old) = old {
            let _ = old.stop.send(Some("job registered again".into()));
        }
    }

    /// A process of the job asks to start its dask processes.
    pub fn attach(
        &self,
        job_id: u32,
        peer_uid: u32,
        peer_pid: i32,
    ) -> Result<(JobSpec, watch::Receiver<Option<String>>), AttachError> {
        let mut t = self.lock();
        let e = t.get_mut(&job_id).ok_or(AttachError::Unknown(job_id))?;
        let spec = &e.record.spec;
        if spec.uid != peer_uid {
            return Err(AttachError::NotOwner {
                job: job_id,
                owner: spec.uid,
                peer: peer_uid,
            });
        }
        if !crate::peer::is_descendant(&self.proc_root, peer_pid, spec.stepd_pid) {
            return Err(AttachError::NotInJob {
                job: job_id,
                pid: peer_pid,
            });
        }
        if e.attached {
            return Err(AttachError::AlreadyAttached(job_id));
        }
        e.attached = true;
        Ok((spec.clone(), e.stop.subscribe()))
    }

    /// Remember a process group started for the job (for crash recovery).
    pub fn add_pgid(&self, job_id: u32, pgid: i32) {
        let mut t = self.lock();
        if let Some(e) = t.get_mut(&job_id) {
            e.record.pgids.push(pgid);
            if let Some(s) = &self.state {
                s.save(&e.record);
            }
        }
    }

    /// Change the job's status.
    pub fn update(&self, job_id: u32, f: impl FnOnce(&mut JobStatus)) {
        if let Some(e) = self.lock().get_mut(&job_id) {
            f(&mut e.status);
        }
    }

    /// Status of the jobs of `uid` (all jobs for `None`).
    pub fn statuses(&self, uid: Option<u32>) -> Vec<JobStatus> {
        let mut v: Vec<JobStatus> = self
            .lock()
            .values()
            .filter(|e| uid.is_none_or(|u| e.record.spec.uid == u))
            .map(|e| e.status.clone())
            .collect();
        let ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        v.extend(
            ended
                .iter()
                .filter(|(_, owner, _)| uid.is_none_or(|u| *owner == u))
                .map(|(_, _, s)| s.clone()),
        );
        v.sort_by_key(|s| s.job_id);
        v
    }

    /// Ask the job's processes to stop, keeping the registration.
    pub fn stop(&self, job_id: u32, reason: &str) {
        if let Some(e) = self.lock().get(&job_id) {
            e.stop.send_if_modified(|cur| {
                if cur.is_none() {
                    *cur = Some(reason.to_string());
                    true
                } else {
                    false
                }
            });
        }
    }

    /// The job ended: stop its processes and forget it.
    pub fn end(&self, job_id: u32, reason: &str) -> bool {
        self.stop(job_id, reason);
        if let Some(s) = &self.state {
            s.remove(job_id);
        }
        let Some(e) = self.lock().remove(&job_id) else {
            return false;
        };
        let mut status = e.status;
        if !matches!(status.state.as_str(), "failed" | "refused") {
            status.state = "ended".into();
        }
        status.pid = None;
        status.reason.get_or_insert_with(|| reason.to_string());
        let mut ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        while ended.front().is_some_and(|(t, _, _)| {
            now.duration_since(*t) > ENDED_KEEP || ended.len() >= ENDED_MAX
        }) {
            ended.pop_front();
        }
        ended.push_back((now, e.record.spec.uid, status));
        true
    }

    pub fn stop_all(&self, reason: &str) {
        let ids: Vec<u32> = self.lock().keys().copied().collect();
        for id in ids {
            self.stop(id, reason);
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

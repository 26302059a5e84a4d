//! The agent's table of jobs on this node: registration by the plugin,
//! attach by the job's own process, stop and end.

use dask_spank_common::JobSpec;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use tokio::sync::watch;

struct Entry {
    spec: JobSpec,
    stop: watch::Sender<Option<String>>,
    attached: bool,
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
    table: Mutex<HashMap<u32, Entry>>,
}

impl Jobs {
    pub fn new(proc_root: PathBuf) -> Jobs {
        Jobs {
            proc_root,
            table: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Entry>> {
        // A poisoned table is still consistent: every update is one insert
        // or remove.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register (or re-register, e.g. after a requeue) a job.
    pub fn register(&self, spec: JobSpec) {
        let (tx, _rx) = watch::channel(None);
        let old = self.lock().insert(
            spec.job_id,
            Entry {
                spec,
                stop: tx,
                attached: false,
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
        if e.spec.uid != peer_uid {
            return Err(AttachError::NotOwner {
                job: job_id,
                owner: e.spec.uid,
                peer: peer_uid,
            });
        }
        if !crate::peer::is_descendant(&self.proc_root, peer_pid, e.spec.stepd_pid) {
            return Err(AttachError::NotInJob {
                job: job_id,
                pid: peer_pid,
            });
        }
        if e.attached {
            return Err(AttachError::AlreadyAttached(job_id));
        }
        e.attached = true;
        Ok((e.spec.clone(), e.stop.subscribe()))
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
        self.lock().remove(&job_id).is_some()
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

//! The agent's table of jobs on this node: registration by the plugin,
//! attach by the job's own process, live status, stop and end. Mirrored on
//! disk (`statefile`) so that a restarted agent can clean up after a crash.
//!
//! A supervisor never sees the table: it gets a [`JobHandle`] for its own
//! registration. Each registration has a generation; after a requeue (the
//! same job id registered again) the old supervisor's late updates carry
//! the old generation and are ignored.

use crate::system::procfs::{self, ProcId};
use crate::system::statefile::{Record, Running, StateDir};
use dask_spank_common::messages::JobStatus;
use dask_spank_common::{JobSpec, JobState};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Why a job's processes must stop, and whether that fails the job (the
/// agent stopping them for its own reasons) or is the job's own end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop {
    pub reason: String,
    pub failure: bool,
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// Tells a job's supervisor to stop.
pub type StopRx = watch::Receiver<Option<Stop>>;

struct Entry {
    record: Record,
    generation: u64,
    stop: watch::Sender<Option<Stop>>,
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

struct Shared {
    state: Option<StateDir>,
    table: Mutex<HashMap<u32, Entry>>,
    /// Status of ended jobs, kept a while so that `status` can still say
    /// why a job failed after Slurm forgot it.
    ended: Mutex<VecDeque<(Instant, u32, JobStatus)>>,
    next_generation: AtomicU64,
}

#[derive(Clone)]
pub struct Jobs {
    shared: Arc<Shared>,
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
        state: JobState::Registered,
        pid: None,
        restarts: 0,
        memory_kills: 0,
        reason: None,
    }
}

/// A supervisor's view of its own registration.
pub struct JobHandle {
    shared: Arc<Shared>,
    job_id: u32,
    generation: u64,
}

impl JobHandle {
    /// Apply `f` to this registration, unless it was replaced or ended.
    fn update(&self, f: impl FnOnce(&mut Entry)) {
        if let Some(e) = self.shared.lock().get_mut(&self.job_id) {
            if e.generation == self.generation {
                f(e);
            }
        }
    }

    pub fn set_state(&self, state: JobState) {
        self.update(|e| e.status.state = state);
    }

    /// The job's dask process runs as `dask` (with its fork server).
    pub fn running(&self, dask: ProcId, forkserver: Option<ProcId>) {
        let state = self.shared.state.as_ref();
        self.update(|e| {
            e.status.state = JobState::Running;
            e.status.pid = Some(dask.pid);
            for id in std::iter::once(dask).chain(forkserver) {
                if !e.record.leaders.contains(&id) {
                    e.record.add_leader(id);
                }
            }
            e.record.running = Some(Running { dask, forkserver });
            if let Some(s) = state {
                s.save(&e.record);
            }
        });
    }

    /// Nothing of the job runs any more.
    pub fn not_running(&self) {
        let state = self.shared.state.as_ref();
        self.update(|e| {
            if e.record.running.take().is_some() {
                if let Some(s) = state {
                    s.save(&e.record);
                }
            }
        });
    }

    pub fn restarting(&self, why: &str) {
        self.update(|e| {
            e.status.state = JobState::Restarting;
            e.status.pid = None;
            e.status.restarts += 1;
            e.status.reason = Some(why.to_string());
        });
    }

    pub fn memory_killed(&self) {
        self.update(|e| e.status.memory_kills += 1);
    }

    /// The job's dask processes are over, for good.
    pub fn finished(&self, state: JobState, reason: &str) {
        self.update(|e| {
            e.status.state = state;
            e.status.pid = None;
            e.status.reason = Some(reason.to_string());
        });
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Entry>> {
        // A poisoned table is still consistent: every update is one insert,
        // remove or field assignment.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Jobs {
    pub fn new(state: Option<StateDir>) -> Jobs {
        Jobs {
            shared: Arc::new(Shared {
                state,
                table: Mutex::new(HashMap::new()),
                ended: Mutex::new(VecDeque::new()),
                next_generation: AtomicU64::new(1),
            }),
        }
    }

    /// Register (or re-register, e.g. after a requeue) a job whose
    /// slurmstepd is `stepd`.
    pub fn register(&self, spec: JobSpec, stepd: ProcId) {
        self.insert(Record::new(spec, stepd));
    }

    /// Insert a registration (also one read back from disk after a restart).
    pub fn insert(&self, record: Record) {
        let (tx, _rx) = watch::channel(None);
        if let Some(s) = &self.shared.state {
            s.save(&record);
        }
        let status = initial_status(&record.spec);
        let entry = Entry {
            record,
            generation: self.shared.next_generation.fetch_add(1, Relaxed),
            stop: tx,
            attached: false,
            status,
        };
        let old = self.shared.lock().insert(entry.record.spec.job_id, entry);
        if let Some(old) = old {
            let _ = old.stop.send(Some(Stop {
                reason: "job registered again".into(),
                failure: false,
            }));
        }
    }

    /// A process of the job asks to start its dask processes (or, after
    /// an agent restart, to have the running ones adopted: `Running`).
    pub fn attach(
        &self,
        job_id: u32,
        peer_uid: u32,
        peer_pid: i32,
    ) -> Result<(JobSpec, JobHandle, StopRx, Option<Running>), AttachError> {
        let mut t = self.shared.lock();
        let e = t.get_mut(&job_id).ok_or(AttachError::Unknown(job_id))?;
        let spec = &e.record.spec;
        if spec.uid != peer_uid {
            return Err(AttachError::NotOwner {
                job: job_id,
                owner: spec.uid,
                peer: peer_uid,
            });
        }
        let stepd = e.record.stepd;
        let in_job = procfs::is_descendant(peer_pid, stepd.pid) && procfs::exists(stepd);
        if !in_job {
            return Err(AttachError::NotInJob {
                job: job_id,
                pid: peer_pid,
            });
        }
        if e.attached {
            return Err(AttachError::AlreadyAttached(job_id));
        }
        e.attached = true;
        let handle = JobHandle {
            shared: self.shared.clone(),
            job_id,
            generation: e.generation,
        };
        Ok((spec.clone(), handle, e.stop.subscribe(), e.record.running))
    }

    /// Whether `uid` has a job here that still waits for its attach (its
    /// attach request, with the job's environment, may be large).
    pub fn awaits_attach(&self, uid: u32) -> bool {
        self.shared
            .lock()
            .values()
            .any(|e| e.record.spec.uid == uid && !e.attached)
    }

    /// Status of the jobs of `uid` (all jobs for `None`).
    pub fn statuses(&self, uid: Option<u32>) -> Vec<JobStatus> {
        let mut v: Vec<JobStatus> = self
            .shared
            .lock()
            .values()
            .filter(|e| uid.is_none_or(|u| e.record.spec.uid == u))
            .map(|e| e.status.clone())
            .collect();
        let ended = self.shared.ended.lock().unwrap_or_else(|p| p.into_inner());
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
        self.send_stop(job_id, reason, false);
    }

    /// Stop the job's processes, failing it: the agent's own reason.
    pub fn fail(&self, job_id: u32, reason: &str) {
        self.send_stop(job_id, reason, true);
    }

    fn send_stop(&self, job_id: u32, reason: &str, failure: bool) {
        if let Some(e) = self.shared.lock().get(&job_id) {
            e.stop.send_if_modified(|cur| {
                if cur.is_none() {
                    *cur = Some(Stop {
                        reason: reason.to_string(),
                        failure,
                    });
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
        if let Some(s) = &self.shared.state {
            s.remove(job_id);
        }
        let Some(e) = self.shared.lock().remove(&job_id) else {
            return false;
        };
        let mut status = e.status;
        if !status.state.is_failure() {
            status.state = JobState::Ended;
        }
        status.pid = None;
        status.reason.get_or_insert_with(|| reason.to_string());
        let mut ended = self.shared.ended.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        while ended.front().is_some_and(|(t, _, _)| {
            now.duration_since(*t) > ENDED_KEEP || ended.len() >= ENDED_MAX
        }) {
            ended.pop_front();
        }
        ended.push_back((now, e.record.spec.uid, status));
        true
    }

    /// Stop every job's processes, failing the jobs.
    pub fn fail_all(&self, reason: &str) {
        let ids: Vec<u32> = self.shared.lock().keys().copied().collect();
        for id in ids {
            self.fail(id, reason);
        }
    }

    pub fn len(&self) -> usize {
        self.shared.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(job_id: u32, uid: u32) -> JobSpec {
        let mut s: JobSpec =
            serde_json::from_str(include_str!("../../testdata/spec.json")).expect("spec"); // ok: test
        s.job_id = job_id;
        s.uid = uid;
        s
    }

    fn me() -> ProcId {
        procfs::proc_id(std::process::id() as i32).expect("own identity") // ok: test
    }

    #[test]
    fn attach_rules() {
        let jobs = Jobs::new(None);
        let pid = std::process::id() as i32;
        jobs.register(spec(5, 1000), me());
        assert_eq!(
            jobs.attach(6, 1000, pid).err(),
            Some(AttachError::Unknown(6))
        );
        assert!(matches!(
            jobs.attach(5, 1001, pid),
            Err(AttachError::NotOwner { .. })
        ));
        assert!(matches!(
            jobs.attach(5, 1000, 1),
            Err(AttachError::NotInJob { .. })
        ));
        assert!(jobs.awaits_attach(1000));
        assert!(jobs.attach(5, 1000, pid).is_ok());
        assert!(!jobs.awaits_attach(1000));
        assert_eq!(
            jobs.attach(5, 1000, pid).err(),
            Some(AttachError::AlreadyAttached(5))
        );
        // A slurmstepd that is gone (its pid reused) makes no job.
        let stale = ProcId {
            pid,
            start: me().start + 1,
        };
        jobs.register(spec(7, 1000), stale);
        assert!(matches!(
            jobs.attach(7, 1000, pid),
            Err(AttachError::NotInJob { .. })
        ));
    }

    #[test]
    fn stale_handles_cannot_touch_a_new_registration() {
        let jobs = Jobs::new(None);
        let pid = std::process::id() as i32;
        jobs.register(spec(5, 1000), me());
        let (_, old, mut stop, _) = jobs.attach(5, 1000, pid).expect("attach"); // ok: test
        jobs.register(spec(5, 1000), me());
        assert_eq!(
            stop.borrow_and_update().as_ref().map(|s| s.reason.as_str()),
            Some("job registered again")
        );
        old.finished(JobState::Failed, "late update");
        assert_eq!(jobs.statuses(None)[0].state, JobState::Registered);
        let (_, new, _, _) = jobs.attach(5, 1000, pid).expect("attach"); // ok: test
        new.restarting("died");
        let s = &jobs.statuses(Some(1000))[0];
        assert_eq!((s.state, s.restarts), (JobState::Restarting, 1));
        assert!(jobs.statuses(Some(1001)).is_empty());
    }

    #[test]
    fn ended_jobs_keep_their_failure() {
        let jobs = Jobs::new(None);
        jobs.register(spec(5, 1000), me());
        let (_, h, _, _) = jobs
            .attach(5, 1000, std::process::id() as i32)
            .expect("attach"); // ok: test
        h.finished(JobState::Failed, "crash loop");
        assert!(jobs.end(5, "job step ended"));
        assert!(!jobs.end(5, "again"));
        let s = &jobs.statuses(None)[0];
        assert_eq!(
            (s.state, s.reason.as_deref()),
            (JobState::Failed, Some("crash loop"))
        );
        assert_eq!(jobs.len(), 0);
    }
}

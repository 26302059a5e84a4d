//! The agent's state on disk (under --agent-dir, a tmpfs /run on real
//! sites): one file per registered job with the identities of its
//! slurmstepd and of the process-group leaders started for it. After a
//! crash, the restarted agent reads it to kill whatever the old agent's
//! processes left behind and to keep the registrations of live jobs
//! (`recovery`).
//!
//! The format is versioned: a file of a newer format than this agent
//! knows is left alone with a warning, never misread.

use crate::system::procfs::ProcId;
use crate::system::rootdir;
use dask_spank_common::files::write_json_atomic;
use dask_spank_common::JobSpec;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The state format this agent writes and reads (2: leaders; 3: the
/// processes running now, for the next agent to adopt). Older formats
/// load with what they have.
pub const FORMAT: u32 = 3;
/// Leaders remembered per job (the current ones; older ones are gone).
const MAX_LEADERS: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub format: u32,
    pub spec: JobSpec,
    /// The job's slurmstepd.
    pub stepd: ProcId,
    /// Process-group leaders started for the job, newest last.
    pub leaders: Vec<ProcId>,
    /// What runs now, for a restarted agent to adopt.
    #[serde(default)]
    pub running: Option<Running>,
}

/// The processes of a job that run now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    /// The dask scheduler or worker.
    pub dask: ProcId,
    /// The job's fork server (`worker_start=forkserver`).
    pub forkserver: Option<ProcId>,
}

impl Record {
    pub fn new(spec: JobSpec, stepd: ProcId) -> Record {
        Record {
            format: FORMAT,
            spec,
            stepd,
            leaders: vec![],
            running: None,
        }
    }

    pub fn add_leader(&mut self, id: ProcId) {
        if self.leaders.len() >= MAX_LEADERS {
            self.leaders.remove(0);
        }
        self.leaders.push(id);
    }
}

pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// The state directory `dir`, made if missing; refused (one line)
    /// unless it is root's own, 0700 (`rootdir`).
    pub fn open(dir: &Path) -> Result<StateDir, String> {
        rootdir::ensure(dir, 0o700)?;
        Ok(StateDir {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, job_id: u32) -> PathBuf {
        self.dir.join(format!("job-{job_id}.json"))
    }

    pub fn save(&self, r: &Record) {
        if let Err(e) = write_json_atomic(&self.path(r.spec.job_id), r, 0o600) {
            tracing::warn!("cannot save state of job {}: {e}", r.spec.job_id);
        }
    }

    pub fn remove(&self, job_id: u32) {
        let _ = std::fs::remove_file(self.path(job_id));
    }

    pub fn load_all(&self) -> Vec<Record> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return vec![];
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let Ok(bytes) = std::fs::read(&p) else {
                continue;
            };
            let format = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("format")?.as_u64());
            match format {
                Some(f) if f > FORMAT as u64 => {
                    tracing::warn!(
                        "state file {} has format {f}, newer than this agent's {FORMAT}: left alone (downgrade the agent only with no jobs running)",
                        p.display()
                    );
                    continue;
                }
                _ => {}
            }
            match serde_json::from_slice(&bytes) {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::warn!("ignoring unreadable state file {}: {e}", p.display());
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_remove_and_newer_formats_left_alone() {
        let dir = std::env::temp_dir().join(format!("dsp-state-{}", std::process::id()));
        let sd = StateDir::open(&dir).unwrap();
        let spec: JobSpec = serde_json::from_str(include_str!("../../testdata/spec.json")).unwrap();
        let mut r = Record::new(spec, ProcId { pid: 10, start: 5 });
        for i in 0..20 {
            r.add_leader(ProcId { pid: i, start: 1 });
        }
        assert_eq!(r.leaders.len(), MAX_LEADERS);
        sd.save(&r);
        std::fs::write(dir.join("job-9.json"), b"garbage").unwrap();
        std::fs::write(dir.join("job-8.json"), br#"{"format": 99, "whatever": 1}"#).unwrap();
        assert_eq!(sd.load_all(), vec![r.clone()]);
        assert!(
            !dir.join("job-9.json").exists(),
            "unreadable files are dropped"
        );
        assert!(dir.join("job-8.json").exists(), "newer formats are kept");
        sd.remove(r.spec.job_id);
        assert!(sd.load_all().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_state_dir_that_is_a_symlink_or_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let top = std::env::temp_dir().join(format!("dsp-state-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&top);
        let target = top.join("elsewhere");
        std::fs::create_dir_all(&target).unwrap();
        std::os::unix::fs::symlink(&target, top.join("state-n1")).unwrap();
        let e = StateDir::open(&top.join("state-n1")).err().unwrap();
        assert!(e.contains("state-n1 is a symbolic link"), "{e}");
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = StateDir::open(&target).err().unwrap();
        assert!(e.contains("elsewhere has mode 0777"), "{e}");
        std::fs::remove_dir_all(&top).unwrap();
    }
}

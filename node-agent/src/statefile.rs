//! The agent's state on disk (under --agent-dir, a tmpfs /run on real
//! sites): one file per registered job with its process groups. After a
//! crash, the restarted agent reads it to kill whatever the old agent's
//! processes left behind and to keep the registrations of live jobs.

use dask_spank_common::JobSpec;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub spec: JobSpec,
    /// Process groups started for the job (all of them, past and present).
    pub pgids: Vec<i32>,
}

pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn open(dir: &Path) -> std::io::Result<StateDir> {
        std::fs::create_dir_all(dir)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(StateDir {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, job_id: u32) -> PathBuf {
        self.dir.join(format!("job-{job_id}.json"))
    }

    /// Write atomically (temporary file, then rename).
    pub fn save(&self, r: &Record) {
        let p = self.path(r.spec.job_id);
        let tmp = p.with_extension("tmp");
        let res = serde_json::to_vec(r)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|_| std::fs::rename(&tmp, &p));
        if let Err(e) = res {
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
            match std::fs::read(&p)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                Some(r) => out.push(r),
                None => {
                    tracing::warn!("ignoring unreadable state file {}", p.display());
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
        out
    }
}

/// Processes (pid, pgid, uid) from /proc.
pub fn processes() -> Vec<(i32, i32, u32)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let pgid = crate::procfs::parse_stat(&stat).map(|s| s.pgrp);
        let uid = std::fs::read_to_string(e.path().join("status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|u| u.parse().ok()))
            });
        if let (Some(pgid), Some(uid)) = (pgid, uid) {
            out.push((pid, pgid, uid));
        }
    }
    out
}

/// Whether `pid` is a live slurmstepd.
pub fn is_slurmstepd(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| c.trim() == "slurmstepd")
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_remove() {
        let dir = std::env::temp_dir().join(format!("dsp-state-{}", std::process::id()));
        let sd = StateDir::open(&dir).unwrap();
        let spec: JobSpec = serde_json::from_str(include_str!("../testdata/spec.json")).unwrap();
        let r = Record {
            spec,
            pgids: vec![10, 11],
        };
        sd.save(&r);
        std::fs::write(dir.join("job-9.json"), b"garbage").unwrap();
        assert_eq!(sd.load_all(), vec![r.clone()]);
        assert!(
            !dir.join("job-9.json").exists(),
            "unreadable files are dropped"
        );
        sd.remove(r.spec.job_id);
        assert!(sd.load_all().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn process_table_has_this_process() {
        let me = std::process::id() as i32;
        let uid = nix::unistd::getuid().as_raw();
        assert!(processes().iter().any(|(p, _, u)| *p == me && *u == uid));
    }
}

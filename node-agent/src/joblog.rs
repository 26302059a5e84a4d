//! The agent's lifecycle lines in a job's log file ("started", "restarted
//! (why)", "stopped (why)"), interleaved with the dask output.
//!
//! The file descriptor comes from `dask-spank attach`, i.e. it was opened by
//! Slurm as the user: the agent never opens files in users' directories.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::time::SystemTime;

pub struct JobLog {
    file: File,
    label: String,
}

impl JobLog {
    pub fn new(fd: OwnedFd, label: String) -> JobLog {
        JobLog {
            file: File::from(fd),
            label,
        }
    }

    pub fn fd(&self) -> std::io::Result<OwnedFd> {
        Ok(OwnedFd::from(self.file.try_clone()?))
    }

    pub fn line(&self, msg: &str) {
        let ts = humantime::format_rfc3339_seconds(SystemTime::now());
        let text = format!("{ts} dask-spank[{}]: {msg}\n", self.label);
        // One write call per line keeps lines whole next to dask's output.
        let _ = (&self.file).write_all(text.as_bytes());
        tracing::info!(job = %self.label, "{msg}");
    }
}

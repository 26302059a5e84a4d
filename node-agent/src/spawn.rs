//! Starting a process as the job's user, with no privileges.
//!
//! This is the one place where the agent crosses from root to a user, so
//! every step is explicit. In the child, between fork and exec:
//!   1. `setsid`: own session and process group, so the whole group can be
//!      signalled and checked for leftovers.
//!   2. Join the job's cgroup (every hierarchy where the job has one). A
//!      failure fails the start: no user code runs outside the job's limits.
//!   3. Take the job's resource limits (those of the job's own attaching
//!      process, never more; see `rlimits`).
//!   4. Drop every capability from the bounding set while still root.
//!   5. `setgroups`, `setresgid`, `setresuid`: the job's identity. Leaving
//!      uid 0 clears the permitted, effective and ambient capability sets.
//!   6. `PR_SET_NO_NEW_PRIVS`: no setuid binary or file capability can give
//!      anything back.
//!   7. `chdir` to the job's directory, as the user (root may not be allowed
//!      into a home on NFS with root_squash).
//!
//! No parent-death signal: the processes outlive a restart of the agent,
//! whose successor adopts them (see `recovery`). They live in the job's
//! cgroups, so Slurm's cleanup at job end still catches every one, and the
//! job's own attach process stops them if no agent comes back.

use crate::child::Child;
use crate::rlimits::Rlimit;
use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

pub struct SpawnRequest<'a> {
    pub program: &'a str,
    pub args: &'a [String],
    pub env: &'a crate::jobenv::JobEnv,
    pub cwd: &'a Path,
    pub identity: &'a Identity,
    /// stdout and stderr of the child (the job's log file).
    pub output: &'a OwnedFd,
    /// The job's resource limits.
    pub rlimits: &'a [Rlimit],
    /// `cgroup.procs` of each of the job's cgroups, joined before dropping root.
    pub cgroup_procs: &'a [PathBuf],
    /// stdin of the child (default: /dev/null).
    pub stdin: Option<OwnedFd>,
    /// Variables set on top of `env`.
    pub extra_env: &'a [(&'a str, &'a str)],
    /// The file mode creation mask, if not the agent's (022).
    pub umask: Option<u32>,
}

/// Refuse to run anything as root: the agent only ever starts user code.
fn check_identity(id: &Identity) -> io::Result<()> {
    if id.uid == 0 || id.gid == 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "refusing to start dask processes as root (uid or gid 0)",
        ));
    }
    Ok(())
}

fn errno_check(ret: libc::c_int) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn c_path(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Everything the child needs between fork and exec, prepared before the
/// fork: the closure may not allocate.
struct ChildSetup {
    cgroups: Vec<CString>,
    rlimits: Vec<(i32, libc::rlimit)>,
    groups: Vec<libc::gid_t>,
    uid: u32,
    gid: u32,
    cwd: CString,
    umask: Option<u32>,
}

impl ChildSetup {
    /// Runs in the forked child. Only async-signal-safe system calls.
    fn apply(&self) -> io::Result<()> {
        // SAFETY (whole function): plain system calls through libc on
        // values prepared before the fork; nothing is allocated.
        unsafe {
            errno_check(libc::setsid())?;
            for path in &self.cgroups {
                // Writing "0" moves the writing process (v1 and v2 alike).
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if n != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            for (res, lim) in &self.rlimits {
                if libc::setrlimit(*res as _, lim) == 0 {
                    continue;
                }
                // Without CAP_SYS_RESOURCE (a container) a limit above the
                // agent's own cannot be set: take the agent's, which is lower.
                let mut cur = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                errno_check(libc::getrlimit(*res as _, &mut cur))?;
                let lower = libc::rlimit {
                    rlim_cur: lim.rlim_cur.min(cur.rlim_max),
                    rlim_max: lim.rlim_max.min(cur.rlim_max),
                };
                errno_check(libc::setrlimit(*res as _, &lower))?;
            }
            for cap in 0..64 {
                // EINVAL past the last capability the kernel knows.
                libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
            }
            errno_check(libc::setgroups(self.groups.len(), self.groups.as_ptr()))?;
            errno_check(libc::setresgid(self.gid, self.gid, self.gid))?;
            errno_check(libc::setresuid(self.uid, self.uid, self.uid))?;
            if libc::geteuid() != self.uid || libc::getegid() != self.gid {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            errno_check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            errno_check(libc::chdir(self.cwd.as_ptr()))?;
            if let Some(mask) = self.umask {
                libc::umask(mask as libc::mode_t);
            }
        }
        Ok(())
    }
}

pub fn spawn(req: &SpawnRequest<'_>) -> io::Result<Child> {
    check_identity(req.identity)?;
    let mut cmd = std::process::Command::new(req.program);
    cmd.args(req.args)
        .env_clear()
        .envs(req.env.vars())
        .envs(req.extra_env.iter().copied())
        .stdin(match &req.stdin {
            Some(fd) => Stdio::from(fd.try_clone()?),
            None => Stdio::null(),
        })
        .stdout(Stdio::from(req.output.try_clone()?))
        .stderr(Stdio::from(req.output.try_clone()?));
    let setup = ChildSetup {
        cgroups: req
            .cgroup_procs
            .iter()
            .map(|p| c_path(p))
            .collect::<io::Result<_>>()?,
        rlimits: req.rlimits.iter().map(Rlimit::to_libc).collect(),
        groups: req.identity.groups.clone(),
        uid: req.identity.uid,
        gid: req.identity.gid,
        cwd: c_path(req.cwd)?,
        umask: req.umask,
    };
    // SAFETY: `apply` runs in the forked child before exec and only makes
    // async-signal-safe system calls on values prepared before the fork.
    unsafe {
        cmd.pre_exec(move || setup.apply());
    }
    Child::new(cmd.spawn()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_identity_is_refused() {
        let e = check_identity(&Identity {
            uid: 0,
            gid: 100,
            groups: vec![],
        })
        .unwrap_err();
        assert!(e.to_string().contains("refusing"));
        assert!(check_identity(&Identity {
            uid: 1000,
            gid: 1000,
            groups: vec![]
        })
        .is_ok());
    }
}

//! Starting a process as the job's user, with no privileges.
//!
//! This is the one place where the agent crosses from root to a user, so
//! every step is explicit. In the child, between fork and exec:
//!   1. `setsid`: own session and process group, so the whole group can be
//!      signalled and checked for leftovers.
//!   2. Join the job's cgroup and take the job's resource limits (as root).
//!   3. Drop every capability from the bounding set while still root.
//!   4. `setgroups`, `setresgid`, `setresuid`: the job's identity. Leaving
//!      uid 0 clears the permitted, effective and ambient capability sets.
//!   5. `PR_SET_PDEATHSIG(SIGKILL)`: if the agent dies, its children die.
//!      Set after the credential change, which would clear it. (The agent
//!      runs a single-threaded runtime, so the "parent thread" this signal
//!      is tied to is the agent's main thread.)
//!   6. `PR_SET_NO_NEW_PRIVS`: no setuid binary or file capability can give
//!      anything back.
//!   7. `chdir` to the job's directory, as the user (root may not be allowed
//!      into a home on NFS with root_squash).

use dask_spank_common::messages::Rlimit;
use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
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
    /// `cgroup.procs` of the job's cgroup, to join before dropping root.
    pub cgroup_procs: Option<&'a Path>,
    /// stdin of the child (default: /dev/null).
    pub stdin: Option<OwnedFd>,
    /// Variables set on top of `env`.
    pub extra_env: &'a [(&'a str, &'a str)],
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

pub fn spawn(req: &SpawnRequest<'_>) -> io::Result<tokio::process::Child> {
    check_identity(req.identity)?;
    let mut cmd = tokio::process::Command::new(req.program);
    cmd.args(req.args)
        .env_clear()
        .envs(req.env.vars())
        .envs(req.extra_env.iter().copied())
        .stdin(match &req.stdin {
            Some(fd) => Stdio::from(fd.try_clone()?),
            None => Stdio::null(),
        })
        .stdout(Stdio::from(req.output.try_clone()?))
        .stderr(Stdio::from(req.output.try_clone()?))
        .kill_on_drop(false);
    let uid = req.identity.uid;
    let gid = req.identity.gid;
    let groups: Vec<libc::gid_t> = req.identity.groups.clone();
    let cwd = CString::new(req.cwd.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let rlimits: Vec<(i32, libc::rlimit)> = req
        .rlimits
        .iter()
        .map(|r| {
            (
                r.resource,
                libc::rlimit {
                    rlim_cur: r.soft,
                    rlim_max: r.hard,
                },
            )
        })
        .collect();
    let cgroup = match req.cgroup_procs {
        Some(p) => Some(
            CString::new(p.as_os_str().as_bytes())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
        ),
        None => None,
    };
    // SAFETY: getpid has no preconditions.
    let agent_pid = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the forked child before exec. It only
    // makes async-signal-safe system calls through libc on values prepared
    // before the fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            errno_check(libc::setsid())?;
            if let Some(path) = &cgroup {
                // Writing "0" moves the writing process. Best effort: a job
                // without a writable cgroup still runs.
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd >= 0 {
                    libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                }
            }
            for (res, lim) in &rlimits {
                // Unknown resources (EINVAL) are skipped.
                libc::setrlimit(*res as _, lim);
            }
            for cap in 0..64 {
                // EINVAL past the last capability the kernel knows.
                libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
            }
            errno_check(libc::setgroups(groups.len(), groups.as_ptr()))?;
            errno_check(libc::setresgid(gid, gid, gid))?;
            errno_check(libc::setresuid(uid, uid, uid))?;
            if libc::geteuid() != uid || libc::getegid() != gid {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            // After the credential change, which clears the parent-death
            // signal (prctl(2)).
            errno_check(libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ))?;
            if libc::getppid() != agent_pid {
                // The agent died between fork and prctl.
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            errno_check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            errno_check(libc::chdir(cwd.as_ptr()))?;
            Ok(())
        });
    }
    cmd.spawn()
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

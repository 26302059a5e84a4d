//! Starting a process as the job's user, with no privileges, without the
//! agent ever waiting on the user's file systems.
//!
//! This is the one place where the agent crosses from root to a user. The
//! `spawner` makes a blank process (a child of the agent); the agent sends
//! it its orders and the job's descriptors; the process does the steps of
//! `launch` (own session, the job's cgroups and limits, no capabilities,
//! the job's identity, no_new_privs, then the working directory and the
//! program, as the user) and execs. The agent only reads the process's
//! stage bytes, with a deadline ([`StartLimits::deadline`]): a working
//! directory or a program on a file system that does not answer costs the
//! job its start, with a reason naming the path, and costs the agent and
//! every other job nothing. A process that missed its deadline is killed
//! and reaped whenever it can be (a thread blocked on some file systems
//! ignores even SIGKILL until they answer); while it lingers it counts
//! against its user, who may have at most [`MAX_STUCK_PER_USER`] of them.
//!
//! No parent-death signal: the processes outlive a restart of the agent,
//! whose successor adopts them (see `recovery`). They live in the job's
//! cgroups, so Slurm's cleanup at job end still catches every one, and the
//! job's own attach process stops them if no agent comes back.

use crate::spawning::child::Child;
use crate::spawning::launch::{self, Blank, Orders};
use crate::spawning::spawner::Spawner;
use crate::system::rlimits::Rlimit;
use crate::system::wire;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

/// Starts stuck on a file system one user may have at a time; more fail at
/// once (a user cannot pile up blocked processes in the agent's name).
pub const MAX_STUCK_PER_USER: usize = 64;
/// Longest failure reason read from a process.
const MAX_REASON: u64 = 4096;

pub use launch::User as Identity;

pub struct SpawnRequest<'a> {
    pub program: &'a str,
    pub args: &'a [String],
    pub env: &'a crate::spawning::jobenv::JobEnv,
    pub cwd: &'a Path,
    pub identity: &'a Identity,
    /// stdout and stderr of the child (the job's log file).
    pub output: BorrowedFd<'a>,
    /// The job's resource limits.
    pub rlimits: &'a [Rlimit],
    /// `cgroup.procs` of each of the job's cgroups, joined before dropping root.
    pub cgroup_procs: &'a [PathBuf],
    /// stdin of the child (default: /dev/null).
    pub stdin: Option<BorrowedFd<'a>>,
    /// Variables set on top of `env`.
    pub extra_env: &'a [(&'a str, &'a str)],
    /// The file mode creation mask, if not the agent's (022).
    pub umask: Option<u32>,
    /// The spawner, and how long a start may take.
    pub via: &'a Starter,
}

/// What every start goes through: the spawner and the deadline.
pub struct Starter {
    pub spawner: Spawner,
    /// How long a process may take from its blank to its exec.
    pub deadline: Duration,
}

/// Why a start failed.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The process said why (a missing program, a refused directory).
    #[error("{0}")]
    Failed(String),
    /// It did not get as far as its exec in time.
    #[error("{0}")]
    Late(String),
    #[error("{0}")]
    Io(#[from] io::Error),
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

/// Start a process as the job's user.
pub async fn spawn(req: &SpawnRequest<'_>) -> Result<Child, SpawnError> {
    check_identity(req.identity)?;
    let uid = req.identity.uid;
    let stuck = stuck_of(uid);
    if stuck >= MAX_STUCK_PER_USER {
        return Err(SpawnError::Failed(format!(
            "{stuck} earlier starts of user {uid}'s processes on this node are stuck on file systems that do not answer; not starting more"
        )));
    }
    let env = req
        .env
        .vars()
        .filter(|(k, _)| !req.extra_env.iter().any(|(x, _)| x == k))
        .chain(req.extra_env.iter().copied())
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let orders = Orders {
        program: req.program.to_string(),
        args: req.args.to_vec(),
        env,
        cwd: req.cwd.to_path_buf(),
        user: Some(req.identity.clone()),
        cgroups: req.cgroup_procs.to_vec(),
        rlimits: req
            .rlimits
            .iter()
            .map(|r| (r.resource, r.soft, r.hard))
            .collect(),
        umask: req.umask,
    };
    let null = std::fs::File::open("/dev/null")?;
    let stdin = req.stdin.unwrap_or(null.as_fd());
    let fds = [stdin, req.output, req.output];
    start(req.via, orders, fds, Some(uid)).await
}

/// Run one of the agent's own commands (as root, in `/`, no user steps)
/// with its output on `out` and `err`.
pub async fn spawn_own(
    via: &Starter,
    program: &str,
    args: &[String],
    out: BorrowedFd<'_>,
    err: BorrowedFd<'_>,
) -> Result<Child, SpawnError> {
    let orders = Orders {
        program: program.to_string(),
        args: args.to_vec(),
        env: std::env::vars_os()
            .filter_map(|(k, v)| Some(format!("{}={}", k.to_str()?, v.to_str()?)))
            .collect(),
        cwd: PathBuf::from("/"),
        user: None,
        cgroups: vec![],
        rlimits: vec![],
        umask: None,
    };
    let null = std::fs::File::open("/dev/null")?;
    start(via, orders, [null.as_fd(), out, err], None).await
}

/// What one of the agent's own commands printed, and how it ended.
pub struct Output {
    pub status: std::process::ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Run one of the agent's own commands to its end, at most `timeout`
/// (then it is killed), and collect its output (up to 1 MiB each).
pub async fn output(
    via: &Starter,
    program: &str,
    args: &[String],
    timeout: Duration,
) -> Result<Output, SpawnError> {
    use tokio::net::unix::pipe;
    let (out_r, out_w) = nix::unistd::pipe().map_err(io::Error::from)?;
    let (err_r, err_w) = nix::unistd::pipe().map_err(io::Error::from)?;
    let mut child = spawn_own(via, program, args, out_w.as_fd(), err_w.as_fd()).await?;
    drop((out_w, err_w));
    let read = |fd| async move {
        let mut buf = Vec::new();
        let rx = pipe::Receiver::from_owned_fd(fd)?;
        rx.take(1 << 20).read_to_end(&mut buf).await?;
        Ok::<_, io::Error>(buf)
    };
    let all = async {
        let (o, e) = tokio::join!(read(out_r), read(err_r));
        let status = child.exited().await?;
        Ok::<_, io::Error>((status, o?, e?))
    };
    match tokio::time::timeout(timeout, all).await {
        Ok(Ok((status, stdout, stderr))) => {
            child.reap();
            Ok(Output {
                status,
                stdout,
                stderr,
            })
        }
        Ok(Err(e)) => {
            abandon(child, None);
            Err(e.into())
        }
        Err(_) => {
            abandon(child, None);
            Err(SpawnError::Late(format!(
                "{program} did not finish within {}s",
                timeout.as_secs()
            )))
        }
    }
}

/// Give a blank process its orders and descriptors; watch it until its
/// exec, its failure or the deadline.
async fn start(
    via: &Starter,
    orders: Orders,
    fds: [BorrowedFd<'_>; 3],
    uid: Option<u32>,
) -> Result<Child, SpawnError> {
    let Blank { pid, ctl } = via.spawner.blank().await?;
    let child = match Child::own(pid) {
        Ok(c) => c,
        Err(e) => {
            // Our child all the same: kill it and reap it off the loop.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            tokio::task::spawn_blocking(move || {
                nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None)
            });
            return Err(e.into());
        }
    };
    let std_ctl = std::os::unix::net::UnixStream::from(ctl);
    std_ctl.set_nonblocking(true)?;
    let mut ctl = UnixStream::from_std(std_ctl)?;
    // The last stage said, kept outside the watch for the deadline's reason.
    let mut stage = 0u8;
    let said = tokio::time::timeout(via.deadline, async {
        wire::send_fds(&ctl, &fds).await?;
        wire::write(&mut ctl, &orders)
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        read_stages(&mut ctl, &mut stage).await
    })
    .await;
    match said {
        Ok(Ok(Stages::Exec)) => Ok(child),
        Ok(Ok(Stages::Failed(why))) => {
            abandon(child, None);
            Err(SpawnError::Failed(why))
        }
        Ok(Ok(Stages::Ended(stage))) => {
            abandon(child, None);
            Err(SpawnError::Failed(format!(
                "the new process ended before its exec ({})",
                stage_name(stage)
            )))
        }
        Ok(Err(e)) => {
            abandon(child, None);
            Err(SpawnError::Io(e))
        }
        Err(_) => {
            if let Some(u) = uid {
                add_stuck(u, 1);
            }
            abandon(child, uid);
            Err(SpawnError::Late(late_reason(&orders, stage, via.deadline)))
        }
    }
}

enum Stages {
    /// EOF after EXECUTING: the exec happened.
    Exec,
    Failed(String),
    /// EOF earlier, after this stage (0: none).
    Ended(u8),
}

/// Read the process's stage bytes until its exec (EOF) or its failure;
/// `last` is the last stage it said.
async fn read_stages(ctl: &mut UnixStream, last: &mut u8) -> io::Result<Stages> {
    loop {
        let mut b = [0u8; 1];
        if ctl.read(&mut b).await? == 0 {
            return Ok(if *last == launch::EXECUTING {
                Stages::Exec
            } else {
                Stages::Ended(*last)
            });
        }
        if b[0] == launch::FAILED {
            let mut why = Vec::new();
            let mut r = (&mut *ctl).take(MAX_REASON);
            // Up to the end of the line: the process may still be closing
            // the job's descriptors (on a hung file system) after it.
            loop {
                let mut c = [0u8; 1];
                if r.read(&mut c).await? == 0 || c[0] == b'\n' {
                    break;
                }
                why.push(c[0]);
            }
            return Ok(Stages::Failed(String::from_utf8_lossy(&why).into_owned()));
        }
        *last = b[0];
    }
}

fn stage_name(stage: u8) -> &'static str {
    match stage {
        launch::SET_UP | launch::ENTERING_CWD => "entering its working directory",
        launch::EXECUTING => "loading the program",
        _ => "setting up",
    }
}

/// The reason of a start that missed its deadline, naming what it waited on.
fn late_reason(o: &Orders, stage: u8, deadline: Duration) -> String {
    let s = deadline.as_secs();
    match stage {
        launch::SET_UP | launch::ENTERING_CWD => format!(
            "the job's working directory {} did not answer within {s}s (a file system that does not answer?); start abandoned",
            o.cwd.display()
        ),
        launch::EXECUTING if o.program.contains('/') => format!(
            "the program {} could not be loaded within {s}s: its file system (or the job's log's) does not answer; start abandoned",
            o.program
        ),
        launch::EXECUTING => format!(
            "{} could not be found on the job's PATH and loaded within {s}s: a directory of the PATH (or the job's log) is on a file system that does not answer; start abandoned",
            o.program
        ),
        _ => format!(
            "the new process did not get into the job's cgroups and identity within {s}s; start abandoned"
        ),
    }
}

/// Kill a process that will not exec, and reap it whenever it ends; a
/// stuck one (`stuck_uid`: counted by the caller) is uncounted then.
fn abandon(mut child: Child, stuck_uid: Option<u32>) {
    child.kill();
    tokio::spawn(async move {
        let _ = child.exited().await;
        child.reap();
        if let Some(u) = stuck_uid {
            add_stuck(u, -1);
        }
    });
}

static STUCK: Mutex<Option<HashMap<u32, usize>>> = Mutex::new(None);

/// Starts abandoned and not reaped yet, of every user (metrics).
pub fn stuck_total() -> usize {
    let s = STUCK.lock().unwrap_or_else(|p| p.into_inner());
    s.as_ref().map_or(0, |m| m.values().sum())
}

fn stuck_of(uid: u32) -> usize {
    let s = STUCK.lock().unwrap_or_else(|p| p.into_inner());
    s.as_ref().and_then(|m| m.get(&uid)).copied().unwrap_or(0)
}

fn add_stuck(uid: u32, by: isize) {
    let mut s = STUCK.lock().unwrap_or_else(|p| p.into_inner());
    let m = s.get_or_insert_with(HashMap::new);
    let n = m.entry(uid).or_default();
    *n = n.saturating_add_signed(by);
    if *n == 0 {
        m.remove(&uid);
    }
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

    #[test]
    fn a_late_start_names_what_it_waited_on() {
        let o = Orders {
            program: "/mnt/fuse/env/bin/python".into(),
            args: vec![],
            env: vec![],
            cwd: "/mnt/fuse/dir".into(),
            user: None,
            cgroups: vec![],
            rlimits: vec![],
            umask: None,
        };
        let d = Duration::from_secs(10);
        let cwd = late_reason(&o, launch::ENTERING_CWD, d);
        assert!(
            cwd.contains("working directory /mnt/fuse/dir did not answer within 10s"),
            "{cwd}"
        );
        let prog = late_reason(&o, launch::EXECUTING, d);
        assert!(
            prog.contains("/mnt/fuse/env/bin/python could not be loaded within 10s"),
            "{prog}"
        );
        let bare = Orders {
            program: "python3".into(),
            ..o
        };
        assert!(late_reason(&bare, launch::EXECUTING, d).contains("job's PATH"));
    }
}

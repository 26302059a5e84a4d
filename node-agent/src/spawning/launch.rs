//! The new process's side of a start: a blank process, made by the
//! `spawner` and a child of the agent, receives its orders and the job's
//! descriptors from the agent, becomes the job's user and execs the dask
//! command. Everything that touches a path the user chose happens here, in
//! that process, never in the agent: entering the job's working directory,
//! looking the program up on the job's PATH (or in `--dask-env`), loading
//! it. If one of them hangs on a file system that does not answer, only
//! this process waits; the agent gave it a deadline and moves on.
//!
//! In order, the process:
//!   1. receives the job's stdin, stdout and stderr (SCM_RIGHTS) and its
//!      orders (one frame) on its control socket, and puts them on 0, 1, 2;
//!   2. `setsid`: its own session and process group;
//!   3. joins the job's cgroups (every hierarchy where the job has one); a
//!      failure fails the start: no user code runs outside the job's limits;
//!   4. takes the job's resource limits (those of its attaching process);
//!   5. drops every capability from the bounding set while still root;
//!   6. `setgroups`, `setresgid`, `setresuid`: the job's identity; leaving
//!      uid 0 clears the permitted, effective and ambient sets;
//!   7. `PR_SET_NO_NEW_PRIVS`: no setuid binary or file capability gives
//!      anything back;
//!   8. says [`SET_UP`], then [`ENTERING_CWD`] and `chdir`s as the user
//!      (root may not be let into a home on NFS with root_squash), then
//!      [`EXECUTING`] and execs, searching the job's PATH itself.
//!
//! The control socket is close-on-exec: the agent reads the stage bytes,
//! and EOF after [`EXECUTING`] means the exec happened. A failure is
//! [`FAILED`] followed by a one-line reason, then the process exits 127.
//! The agent's own commands (squeue) come this way too, without the user
//! steps (`user: None`): the agent itself never forks, because a fork
//! copies its descriptor table, which holds users' descriptors, and the
//! child's exec would close (flush) every one of them.

use dask_spank_common::frame;
use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// In the job's cgroups, with its limits and identity.
pub const SET_UP: u8 = b'u';
/// About to enter the working directory.
pub const ENTERING_CWD: u8 = b'd';
/// About to look the program up and exec it.
pub const EXECUTING: u8 = b'x';
/// A reason follows, then the process exits.
pub const FAILED: u8 = b'!';
/// Largest orders frame (the job's environment is most of it).
pub const MAX_ORDERS: usize = 8 << 20;
/// How long a blank process waits for its orders before it gives up: a
/// safety net for an agent alive but hung, no more (an agent that ends
/// closes the socket, and the agent kills a blank it abandons at its start
/// deadline). So it outlasts any stall of the agent's loop between the
/// blank and its orders: with 128 workers starting per core, the agent's
/// loop stalled for 13 s, blanks gave up at the former 10 s while the
/// start's 30 s deadline still ran, and each such start failed its job
/// with EPIPE ("cannot start python3: Broken pipe").
const ORDERS_TIMEOUT: Duration = Duration::from_secs(600);
/// PATH when the job has none (as execvp's default, plus /usr/local/bin).
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The identity a process takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// What a blank process is to become.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Orders {
    pub program: String,
    pub args: Vec<String>,
    /// `KEY=VALUE` entries: the whole environment.
    pub env: Vec<String>,
    pub cwd: PathBuf,
    /// The job's user; `None`: one of the agent's own commands, as root.
    pub user: Option<User>,
    /// `cgroup.procs` files to join.
    pub cgroups: Vec<PathBuf>,
    /// (resource, soft, hard).
    pub rlimits: Vec<(i32, u64, u64)>,
    pub umask: Option<u32>,
}

/// A process the spawner made, a child of the agent, waiting for its
/// orders on `ctl`.
pub struct Blank {
    pub pid: i32,
    pub ctl: OwnedFd,
}

/// Become what the orders on `ctl` say, or exit 127 with the reason on
/// `ctl`. Runs in the blank process (a copy of the single-threaded
/// spawner), never returns.
pub fn obey(ctl: OwnedFd) -> ! {
    // Its name in `ps -o comm` until the exec (its arguments stay the
    // spawner's): a start stuck on a file system shows as one.
    let _ = nix::sys::prctl::set_name(c"dask-start");
    let mut ctl = UnixStream::from(keep_only(ctl));
    let why = match become_ordered(&mut ctl) {
        Ok(never) => match never {},
        Err(why) => why,
    };
    // One line: the agent stops reading at its end (the exit may then still
    // wait on the job's file system, closing the job's descriptors).
    let mut msg = vec![FAILED];
    msg.extend_from_slice(why.replace('\n', " ").as_bytes());
    msg.push(b'\n');
    let _ = ctl.write_all(&msg);
    // SAFETY: _exit ends this process at once; nothing of the spawner's
    // copied state (buffers, handlers) must run in it.
    unsafe { libc::_exit(127) }
}

/// Close every descriptor but stdio and `ctl`, which becomes 3.
fn keep_only(ctl: OwnedFd) -> OwnedFd {
    let raw = ctl.as_raw_fd();
    std::mem::forget(ctl);
    // SAFETY: plain system calls on descriptor numbers; `raw` is ours (the
    // OwnedFd was forgotten above), and after dup2 it lives on as 3,
    // which nothing else owns in this fresh copy of the spawner.
    unsafe {
        if raw != 3 {
            libc::dup2(raw, 3);
            libc::close(raw);
        }
        libc::fcntl(3, libc::F_SETFD, libc::FD_CLOEXEC);
        libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
        OwnedFd::from_raw_fd(3)
    }
}

fn become_ordered(ctl: &mut UnixStream) -> Result<std::convert::Infallible, String> {
    default_signals();
    ctl.set_read_timeout(Some(ORDERS_TIMEOUT))
        .map_err(|e| format!("control socket: {e}"))?;
    let fds = recv_fds(ctl).map_err(|e| format!("no descriptors from the agent: {e}"))?;
    let orders: Orders = read_orders(ctl).map_err(|e| format!("no orders from the agent: {e}"))?;
    for (target, fd) in fds.iter().enumerate() {
        nix::unistd::dup2(fd.as_raw_fd(), target as RawFd)
            .map_err(|e| format!("cannot set up descriptor {target}: {e}"))?;
    }
    // Not closed here: a close can wait on the job's file system (FUSE's
    // FLUSH). They are close-on-exec; the exec or the exit closes them.
    std::mem::forget(fds);
    set_up(&orders)?;
    say(ctl, SET_UP)?;
    say(ctl, ENTERING_CWD)?;
    std::env::set_current_dir(&orders.cwd).map_err(|e| {
        format!(
            "cannot enter the working directory {}: {e}",
            orders.cwd.display()
        )
    })?;
    say(ctl, EXECUTING)?;
    Err(exec(&orders))
}

/// What a new program should start with, as `std::process::Command`
/// gives it: SIGPIPE back to its default (the spawner, a Rust program,
/// ignores it, and an exec keeps ignored signals) and no signal blocked.
fn default_signals() {
    use nix::sys::signal::{signal, sigprocmask, SigHandler, SigSet, SigmaskHow, Signal};
    // SAFETY: setting a default disposition installs no handler.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

fn say(ctl: &mut UnixStream, stage: u8) -> Result<(), String> {
    ctl.write_all(&[stage])
        .map_err(|e| format!("the agent is gone: {e}"))
}

/// The three descriptors (stdin, stdout, stderr) sent with one byte.
fn recv_fds(ctl: &UnixStream) -> io::Result<Vec<OwnedFd>> {
    use nix::sys::socket::MsgFlags;
    let mut byte = [0u8; 1];
    let (_, fds) = dask_spank_common::fdpass::recv_with_fds::<3>(
        ctl.as_raw_fd(),
        &mut byte,
        MsgFlags::empty(),
    )?;
    if fds.len() != 3 {
        return Err(io::Error::other(format!(
            "{} descriptors, not 3",
            fds.len()
        )));
    }
    Ok(fds)
}

fn read_orders(ctl: &mut UnixStream) -> Result<Orders, String> {
    let mut header = [0u8; 4];
    ctl.read_exact(&mut header).map_err(|e| e.to_string())?;
    let len = frame::body_len(header, MAX_ORDERS).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; len];
    ctl.read_exact(&mut body).map_err(|e| e.to_string())?;
    frame::decode(&body).map_err(|e| e.to_string())
}

fn check(ret: libc::c_int, what: &str) -> Result<(), String> {
    if ret == -1 {
        Err(format!("{what}: {}", io::Error::last_os_error()))
    } else {
        Ok(())
    }
}

/// Steps 2 to 7 (see the module doc).
fn set_up(o: &Orders) -> Result<(), String> {
    // SAFETY (whole block): plain system calls through libc on values
    // owned by this function; this process has one thread.
    unsafe {
        check(libc::setsid(), "setsid")?;
        for path in &o.cgroups {
            // Writing "0" moves the writing process (v1 and v2 alike).
            std::fs::write(path, b"0")
                .map_err(|e| format!("cannot join the job's cgroup {}: {e}", path.display()))?;
        }
        for &(res, soft, hard) in &o.rlimits {
            set_rlimit(res, soft, hard)?;
        }
        if let Some(u) = &o.user {
            for cap in 0..64 {
                // EINVAL past the last capability the kernel knows.
                libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
            }
            check(
                libc::setgroups(u.groups.len(), u.groups.as_ptr()),
                "setgroups",
            )?;
            check(libc::setresgid(u.gid, u.gid, u.gid), "setresgid")?;
            check(libc::setresuid(u.uid, u.uid, u.uid), "setresuid")?;
            if libc::geteuid() != u.uid || libc::getegid() != u.gid {
                return Err("the job's identity did not take".into());
            }
            check(
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
                "no_new_privs",
            )?;
        }
        if let Some(mask) = o.umask {
            libc::umask(mask as libc::mode_t);
        }
    }
    Ok(())
}

/// Set one limit; without CAP_SYS_RESOURCE (a container) a limit above
/// this process's own cannot be set: take its own, which is lower.
fn set_rlimit(res: i32, soft: u64, hard: u64) -> Result<(), String> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit/getrlimit with pointers to locals.
    unsafe {
        if libc::setrlimit(res as _, &lim) == 0 {
            return Ok(());
        }
        let mut cur = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        check(libc::getrlimit(res as _, &mut cur), "getrlimit")?;
        let lower = libc::rlimit {
            rlim_cur: soft.min(cur.rlim_max),
            rlim_max: hard.min(cur.rlim_max),
        };
        check(libc::setrlimit(res as _, &lower), "setrlimit")
    }
}

fn cstring(s: impl AsRef<[u8]>) -> Result<CString, String> {
    CString::new(s.as_ref()).map_err(|_| "an argument or variable contains a NUL byte".into())
}

/// Exec the program, searching the job's PATH when its name has no `/`,
/// as execvp does. Returns only on failure, with the reason (the caller
/// names the program).
fn exec(o: &Orders) -> String {
    let prepared = (|| -> Result<(Vec<CString>, Vec<CString>), String> {
        let argv = std::iter::once(&o.program)
            .chain(&o.args)
            .map(cstring)
            .collect::<Result<_, _>>()?;
        let envp = o.env.iter().map(cstring).collect::<Result<_, _>>()?;
        Ok((argv, envp))
    })();
    let (argv, envp) = match prepared {
        Ok(x) => x,
        Err(e) => return e,
    };
    let candidates: Vec<PathBuf> = if o.program.contains('/') {
        vec![PathBuf::from(&o.program)]
    } else {
        let path = o
            .env
            .iter()
            .find_map(|e| e.strip_prefix("PATH="))
            .unwrap_or(DEFAULT_PATH);
        path.split(':')
            .map(|d| Path::new(if d.is_empty() { "." } else { d }).join(&o.program))
            .collect()
    };
    let mut denied = None;
    for c in &candidates {
        let err = execve(c, &argv, &envp);
        match err.raw_os_error() {
            // Not here: try the next directory, as execvp does.
            Some(libc::ENOENT | libc::ENOTDIR | libc::ESTALE) if candidates.len() > 1 => {}
            Some(libc::EACCES) if candidates.len() > 1 => denied = Some(err),
            _ => return err.to_string(),
        }
    }
    let err = denied.unwrap_or_else(|| io::Error::from_raw_os_error(libc::ENOENT));
    err.to_string()
}

fn execve(path: &Path, argv: &[CString], envp: &[CString]) -> io::Error {
    let Ok(p) = cstring(path.as_os_str().as_bytes()) else {
        return io::Error::from_raw_os_error(libc::EINVAL);
    };
    let mut a: Vec<*const libc::c_char> = argv.iter().map(|s| s.as_ptr()).collect();
    a.push(std::ptr::null());
    let mut e: Vec<*const libc::c_char> = envp.iter().map(|s| s.as_ptr()).collect();
    e.push(std::ptr::null());
    // SAFETY: execve with NUL-terminated strings and null-terminated
    // arrays that outlive the call; it returns only on failure.
    unsafe { libc::execve(p.as_ptr(), a.as_ptr(), e.as_ptr()) };
    io::Error::last_os_error()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_travel_as_one_frame() {
        let o = Orders {
            program: "python3".into(),
            args: vec!["-c".into(), "pass".into()],
            env: vec!["PATH=/usr/bin".into(), "X=a=b".into()],
            cwd: "/home/u".into(),
            user: Some(User {
                uid: 1000,
                gid: 1000,
                groups: vec![1000, 27],
            }),
            cgroups: vec![],
            rlimits: vec![(7, 1024, 4096)],
            umask: Some(0o077),
        };
        let f = frame::encode(&o).unwrap();
        let back: Orders = frame::decode(&f[4..]).unwrap();
        assert_eq!(back, o);
    }
}

//! The spawner: a small process the agent starts before it holds any
//! user's descriptor, which makes every process the agent runs (dask,
//! fork servers, squeue).
//!
//! Why not fork in the agent: a fork copies the agent's descriptor table,
//! which holds every job's log file; the child's exec then closes its
//! copies, and closing a file on FUSE waits for the file system's daemon
//! (FLUSH), closing one on NFS writes back its dirty pages. One user's
//! stopped FUSE daemon or one hung NFS server would freeze every start on
//! the node, and the agent with it (`fork`+`exec` blocks the parent until
//! the exec). The spawner's table holds nothing of any user: it only makes
//! blank processes, with `clone(CLONE_PARENT)` so that they are the
//! agent's own children (the agent waits for and signals them as before),
//! and hands the agent a control socket to each. The agent then sends the
//! blank process its orders and the job's descriptors itself (`launch`).
//!
//! The spawner is the agent binary run again (`dask-node-agent spawner`),
//! so it is a fresh, single-threaded image: a copy of it may run ordinary
//! code before its exec. It dies with the agent (parent-death signal), and
//! the agent treats its loss as its own crash (see `daemon`).

use crate::spawning::child::Child;
use crate::spawning::launch::{self, Blank};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixStream;

/// The descriptor number of the spawner's socket in the spawner.
const SOCKET_FD: RawFd = 3;
/// Bound on one blank process (a clone: milliseconds).
const BLANK_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent's handle on its spawner.
pub struct Spawner {
    conn: tokio::sync::Mutex<UnixStream>,
    pid: i32,
    process: tokio::sync::Mutex<Option<Child>>,
}

impl Spawner {
    /// Start the spawner from the agent's binary `exe` (the running one:
    /// `/proc/self/exe`). Call it before any user's descriptor exists.
    pub fn start(exe: &Path) -> io::Result<Spawner> {
        let (ours, theirs) = StdStream::pair()?;
        let theirs_fd = theirs.as_raw_fd();
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("spawner")
            .arg0("dask-node-agent-spawner")
            .env_clear()
            .stdin(std::process::Stdio::null());
        // SAFETY: dup2 in the forked child before exec, on a descriptor that
        // is open in it; async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if theirs_fd == SOCKET_FD {
                    // dup2 onto itself keeps close-on-exec: clear it.
                    if libc::fcntl(SOCKET_FD, libc::F_SETFD, 0) == -1 {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(theirs_fd, SOCKET_FD) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop(theirs);
        ours.set_nonblocking(true)?;
        let pid = child.id() as i32;
        Ok(Spawner {
            conn: tokio::sync::Mutex::new(UnixStream::from_std(ours)?),
            pid,
            process: tokio::sync::Mutex::new(Some(Child::new(child)?)),
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Resolves when the spawner process has ended (it must not).
    pub async fn ended(&self) {
        let mut p = self.process.lock().await;
        if let Some(c) = p.as_mut() {
            let _ = c.exited().await;
            c.reap();
        }
    }

    /// A new blank process, a child of the agent, waiting for its orders.
    pub async fn blank(&self) -> io::Result<Blank> {
        let mut conn = self.conn.lock().await;
        let ask = async {
            conn.write_all(b"b").await?;
            recv_blank(&conn).await
        };
        match tokio::time::timeout(BLANK_TIMEOUT, ask).await {
            Ok(r) => r,
            Err(_) => {
                // Its answer may still come, and would be taken for the
                // next request's: a spawner out of step is lost. Killing it
                // (our unreaped child: the pid is its) ends the agent as a
                // crash would (`daemon`), for a new one to take over.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(self.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                Err(io::Error::other("the agent's spawner did not answer"))
            }
        }
    }
}

/// The spawner's answer: a pid (negative: an errno) and, for a pid, the
/// control socket of the new process.
async fn recv_blank(s: &UnixStream) -> io::Result<Blank> {
    use dask_spank_common::fdpass::recv_with_fds;
    use nix::sys::socket::MsgFlags;
    loop {
        s.readable().await?;
        let got = s.try_io(Interest::READABLE, || {
            let mut pid = [0u8; 4];
            let (bytes, fds) = recv_with_fds::<1>(s.as_raw_fd(), &mut pid, MsgFlags::MSG_WAITALL)?;
            // The first is the control socket; any other closes here.
            let fd = fds.into_iter().next();
            if bytes != 4 {
                return Err(io::Error::other("the agent's spawner is gone"));
            }
            Ok((i32::from_be_bytes(pid), fd))
        });
        match got {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
            Ok((pid, Some(ctl))) if pid > 0 => return Ok(Blank { pid, ctl }),
            Ok((errno, _)) => {
                return Err(io::Error::other(format!(
                    "the agent's spawner cannot make a process: {}",
                    io::Error::from_raw_os_error(-errno)
                )))
            }
        }
    }
}

/// The spawner process: one blank process per byte read, until the agent
/// closes the socket. Never returns.
pub fn serve() -> ! {
    // SAFETY: prctl and getppid take no pointers. Dying with the agent:
    // a spawner must never outlive it and serve another.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        if libc::getppid() == 1 {
            libc::_exit(0);
        }
    }
    // SAFETY: the agent put our end of the socket on SOCKET_FD (see
    // `Spawner::start`); nothing else in this process owns it.
    let sock = StdStream::from(unsafe { OwnedFd::from_raw_fd(SOCKET_FD) });
    let mut byte = [0u8; 1];
    while let Ok(1) = (&sock).read(&mut byte) {
        let (pid, ctl) = match make_blank() {
            Ok((pid, ctl)) => (pid, Some(ctl)),
            Err(e) => (-e.raw_os_error().unwrap_or(libc::EIO), None),
        };
        if send_blank(&sock, pid, ctl.as_ref()).is_err() {
            break;
        }
    }
    // SAFETY: ending the process; nothing needs to run first.
    unsafe { libc::_exit(0) }
}

/// Clone a blank process (a child of our parent, the agent) that obeys
/// the orders it gets on its end of a new socket pair; our end.
fn make_blank() -> io::Result<(i32, OwnedFd)> {
    let (ours, theirs) = StdStream::pair()?;
    // SAFETY: a raw clone like fork (no new stack: the child runs on a
    // copy of ours), with CLONE_PARENT. This process has one thread, so the
    // copy may run ordinary code: no lock can be held by another thread.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            drop(ours);
            launch::obey(OwnedFd::from(theirs))
        }
        pid => Ok((pid as i32, OwnedFd::from(ours))),
    }
}

fn send_blank(sock: &StdStream, pid: i32, ctl: Option<&OwnedFd>) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let fds: Vec<RawFd> = ctl.iter().map(|f| f.as_raw_fd()).collect();
    let bytes = pid.to_be_bytes();
    let iov = [io::IoSlice::new(&bytes)];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::empty(), None)?;
    Ok(())
}

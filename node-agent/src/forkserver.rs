//! The agent's side of a worker job's fork server (`worker_start=forkserver`,
//! see `forkserver.py`): started once per job as the job's user, like any
//! dask process (`spawn`), it imports distributed once and forks a worker on
//! each request, so that a restart skips the cold start of Python.
//!
//! The server talks over its stdin, a Unix socket pair with the agent: one
//! JSON object per line. Every worker it forks has its own process group;
//! the server's own group holds only the server.
//!
//! The server runs the user's code (their Python, their site packages), so
//! nothing it says is trusted: lines are bounded, and a pid it reports is
//! signalled only while it is a process of the server's session, leading
//! its own group, owned by the job's user (`owns`). Otherwise a user could
//! make the agent, which holds CAP_KILL, signal anybody's processes.

use crate::spawn::{spawn, SpawnRequest};
use serde::Deserialize;
use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// The server's program, handed over in the environment (and removed from
/// it at once) so that `ps` shows a short command line.
const PROGRAM: &str = include_str!("forkserver.py");
const PROGRAM_VAR: &str = "DASK_SPANK_FORKSERVER";
const BOOT: &str = "import os; exec(os.environ.pop('DASK_SPANK_FORKSERVER'))";
/// Longest line accepted from the server (its messages are tiny).
const MAX_LINE: usize = 4096;
/// Longest wait for the server to import distributed and fork (a cold
/// import from a slow shared file system included).
const FORK_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Event {
    Ready,
    Forked { pid: i32 },
    Exited { pid: i32, status: i32 },
}

pub struct ForkServer {
    child: tokio::process::Child,
    pub pid: i32,
    /// The job's user: the only owner a worker may have.
    uid: u32,
    rx: BufReader<OwnedReadHalf>,
    /// A line read in part by a `wait` that was cancelled (in a select).
    partial: Vec<u8>,
    tx: OwnedWriteHalf,
    /// Workers that exited before anybody waited for them: raw wait status.
    exited: HashMap<i32, i32>,
    /// The server closed its end (it died).
    gone: bool,
}

fn died() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "the fork server died (see its traceback above in this log)",
    )
}

/// Arguments of the server's Python (`-c BOOT`) and the extra environment.
pub fn boot_args() -> Vec<String> {
    vec!["-c".into(), BOOT.into(), "dask-spank-forkserver".into()]
}

impl ForkServer {
    /// Start the server as `req` says (program: the job's Python; args and
    /// stdin are set here).
    pub fn spawn(req: &SpawnRequest<'_>) -> io::Result<ForkServer> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        ours.set_nonblocking(true)?;
        let args = boot_args();
        let child = spawn(&SpawnRequest {
            args: &args,
            stdin: Some(OwnedFd::from(theirs)),
            extra_env: &[(PROGRAM_VAR, PROGRAM)],
            ..*req
        })?;
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        let (rx, tx) = UnixStream::from_std(ours)?.into_split();
        Ok(ForkServer {
            child,
            pid,
            uid: req.identity.uid,
            rx: BufReader::new(rx),
            partial: Vec::new(),
            tx,
            exited: HashMap::new(),
            gone: false,
        })
    }

    /// Close the socket (the server then kills its workers and exits);
    /// the server's process and pid, to reap it.
    pub fn close(self) -> (tokio::process::Child, i32) {
        (self.child, self.pid)
    }

    pub fn alive(&self) -> bool {
        !self.gone
    }

    async fn next_event(&mut self) -> io::Result<Event> {
        if self.gone {
            return Err(died());
        }
        // Cancel safe: what a cancelled call read stays in `partial`.
        let room = (MAX_LINE + 1).saturating_sub(self.partial.len()) as u64;
        let read = (&mut self.rx)
            .take(room)
            .read_until(b'\n', &mut self.partial)
            .await;
        if !matches!(self.partial.last(), Some(b'\n')) {
            // EOF, a reset when it died with our request unread, or a line
            // longer than any message.
            self.gone = true;
            return Err(match read {
                Ok(_) if self.partial.len() > MAX_LINE => io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the fork server sent a line over {MAX_LINE} bytes"),
                ),
                _ => died(),
            });
        }
        let line = std::mem::take(&mut self.partial);
        serde_json::from_slice(&line).map_err(|e| {
            self.gone = true;
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "bad message from the fork server: {e}: {}",
                    String::from_utf8_lossy(&line).trim_end()
                ),
            )
        })
    }

    /// Whether `pid` may be signalled as one of this server's workers: a
    /// live process of the server's session that leads its own process
    /// group and belongs to the job's user, or no process at all (a pid is
    /// not reused while its process group has members, so its group, if
    /// any, is still the worker's).
    pub fn owns(&self, pid: i32) -> bool {
        owned(proc_stat(pid), pid, self.pid, self.uid)
    }

    /// Fork a worker with these dask-worker arguments; its pid.
    pub async fn fork(&mut self, args: &[String]) -> io::Result<i32> {
        let mut line = serde_json::to_vec(&serde_json::json!({ "args": args }))?;
        line.push(b'\n');
        self.tx.write_all(&line).await.map_err(|_| died())?;
        let wait = async {
            loop {
                match self.next_event().await? {
                    Event::Forked { pid } => {
                        // Its parent made it a group leader before saying so.
                        if !self.owns(pid) || proc_stat(pid).is_err() {
                            self.gone = true;
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("the fork server reported pid {pid}, which is not a worker it forked"),
                            ));
                        }
                        return Ok(pid);
                    }
                    Event::Exited { pid, status } => {
                        self.exited.insert(pid, status);
                    }
                    Event::Ready => {}
                }
            }
        };
        tokio::time::timeout(FORK_TIMEOUT, wait)
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the fork server did not fork a worker within {}s",
                        FORK_TIMEOUT.as_secs()
                    ),
                )
            })?
    }

    /// Wait until worker `pid` exits.
    pub async fn wait(&mut self, pid: i32) -> io::Result<ExitStatus> {
        loop {
            if let Some(st) = self.exited.remove(&pid) {
                return Ok(ExitStatus::from_raw(st));
            }
            match self.next_event().await? {
                Event::Exited { pid: p, status } => {
                    self.exited.insert(p, status);
                }
                Event::Forked { .. } | Event::Ready => {}
            }
        }
    }
}

fn owned(st: io::Result<Stat>, pid: i32, server: i32, uid: u32) -> bool {
    pid > 1
        && match st {
            Ok(st) => st.session == server && st.pgrp == pid && st.uid == uid,
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        }
}

/// Resolves once `pid` is gone (or a zombie), plus `grace`.
pub async fn gone_for(pid: i32, grace: Duration) {
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if matches!(proc_stat(pid), Err(e) if e.kind() == io::ErrorKind::NotFound) {
            tokio::time::sleep(grace).await;
            return;
        }
    }
}

/// What `owns` needs from `/proc/<pid>/stat` and the owner of `/proc/<pid>`.
struct Stat {
    pgrp: i32,
    session: i32,
    uid: u32,
}

fn proc_stat(pid: i32) -> io::Result<Stat> {
    use std::os::unix::fs::MetadataExt;
    let dir = format!("/proc/{pid}");
    let uid = std::fs::metadata(&dir)?.uid();
    let text = std::fs::read_to_string(format!("{dir}/stat"))?;
    match crate::procfs::parse_stat(&text) {
        // A zombie is gone for our purposes: only its group may remain.
        Some(st) if st.state == 'Z' => Err(io::Error::from(io::ErrorKind::NotFound)),
        Some(st) => Ok(Stat {
            pgrp: st.pgrp,
            session: st.session,
            uid,
        }),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{dir}/stat: unexpected format"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse() {
        let e: Event =
            serde_json::from_str(r#"{"event":"exited","pid":7,"status":9}"#).expect("event"); // ok: test
        assert_eq!(e, Event::Exited { pid: 7, status: 9 });
        assert!(serde_json::from_str::<Event>(r#"{"event":"exploded"}"#).is_err());
        // A worker killed by SIGKILL: raw status 9.
        assert_eq!(ExitStatus::from_raw(9).signal(), Some(9));
    }

    #[test]
    fn only_group_leaders_of_the_servers_session_and_user_are_owned() {
        let st = |pgrp, session, uid| Ok(Stat { pgrp, session, uid });
        assert!(owned(st(50, 10, 1000), 50, 10, 1000));
        // Another session (any process of the node), not a group leader,
        // another user, pid 1: never.
        assert!(!owned(st(50, 11, 1000), 50, 10, 1000));
        assert!(!owned(st(49, 10, 1000), 50, 10, 1000));
        assert!(!owned(st(50, 10, 0), 50, 10, 1000));
        assert!(!owned(st(1, 10, 1000), 1, 10, 1000));
        // Gone: only its group can remain, which cannot have been reused.
        assert!(owned(Err(io::ErrorKind::NotFound.into()), 50, 10, 1000));
        assert!(!owned(
            Err(io::ErrorKind::PermissionDenied.into()),
            50,
            10,
            1000
        ));
    }

    #[test]
    fn proc_stat_reads_this_process() {
        let me = proc_stat(std::process::id() as i32).expect("own stat"); // ok: test
        assert_eq!(me.uid, nix::unistd::getuid().as_raw());
        assert!(proc_stat(-5).is_err());
    }

    #[test]
    fn the_program_is_python_that_compiles() {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import sys; compile(sys.stdin.read(), 'forkserver.py', 'exec')",
            ])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().map(|mut i| i.write_all(PROGRAM.as_bytes()));
                c.wait()
            });
        assert!(out.map(|s| s.success()).unwrap_or(false));
    }
}

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
//! nothing it says is trusted: lines are bounded; a pid it reports as forked
//! is accepted only if it is a live process of the server's session, leading
//! its own group, owned by the job's user; exit reports are kept only for
//! workers the agent asked for, at most a few; and its workers' groups are
//! signalled member by member after the same checks (`process::Proc`).
//! Otherwise a user could make the agent, which holds CAP_KILL, signal
//! anybody's processes, or fill its memory.

use crate::spawning::child::Child;
use crate::spawning::python_boot::FORKSERVER;
use crate::spawning::spawn::{spawn, SpawnError, SpawnRequest};
use crate::system::procfs::{self, ProcId};
use crate::system::userio::UserFd;
use crate::system::wire::Guarded;
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

/// Longest line accepted from the server (its messages are tiny).
const MAX_LINE: usize = 4096;
/// Longest wait for the server to import distributed and fork (a cold
/// import from a slow shared file system included).
const FORK_TIMEOUT: Duration = Duration::from_secs(300);
/// Workers of one server whose end is remembered before anybody waits for
/// it (one runs at a time; a few allow for races).
const MAX_EXITED: usize = 8;

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Event {
    Ready,
    Forked { pid: i32 },
    Exited { pid: i32, status: i32 },
}

/// The exit reports a server may make: only of workers it forked for us,
/// each once, a few at a time.
#[derive(Debug, Default)]
struct Exits {
    /// Forked and not reported yet.
    running: Vec<i32>,
    /// Reported and not waited for yet: raw wait status.
    ended: HashMap<i32, i32>,
}

impl Exits {
    fn forked(&mut self, pid: i32) {
        if self.running.len() >= MAX_EXITED {
            self.running.remove(0);
        }
        self.running.push(pid);
    }

    fn record(&mut self, pid: i32, status: i32) {
        if let Some(i) = self.running.iter().position(|&p| p == pid) {
            self.running.swap_remove(i);
            if self.ended.len() < MAX_EXITED {
                self.ended.insert(pid, status);
            }
        }
    }

    fn take(&mut self, pid: i32) -> Option<i32> {
        self.ended.remove(&pid)
    }
}

pub struct ForkServer {
    child: Child,
    /// The job's user: the only owner a worker may have.
    uid: u32,
    /// Exit reports of the workers it forked for us.
    exits: Exits,
    conn: ServerConn,
    /// A line read in part by a `wait` that was cancelled (in a select).
    partial: Vec<u8>,
    /// The server closed its end (it died).
    gone: bool,
}

/// The control socket: read with `wire::Guarded` (the server, user code,
/// may attach descriptors to its lines) and closed off the event loop
/// (its queue may hold such descriptors): see `wire`.
struct ServerConn {
    rx: Option<BufReader<Guarded<OwnedReadHalf>>>,
    tx: Option<OwnedWriteHalf>,
    uid: u32,
}

impl ServerConn {
    fn new(sock: UnixStream, uid: u32) -> ServerConn {
        let (rx, tx) = sock.into_split();
        ServerConn {
            rx: Some(BufReader::new(Guarded::new(rx, uid))),
            tx: Some(tx),
            uid,
        }
    }

    fn rx(&mut self) -> io::Result<&mut BufReader<Guarded<OwnedReadHalf>>> {
        self.rx.as_mut().ok_or_else(died)
    }

    fn tx(&mut self) -> io::Result<&mut OwnedWriteHalf> {
        self.tx.as_mut().ok_or_else(died)
    }
}

impl Drop for ServerConn {
    fn drop(&mut self) {
        if let (Some(rx), Some(tx)) = (self.rx.take(), self.tx.take()) {
            if let Ok(s) = rx.into_inner().into_inner().reunite(tx) {
                if let Ok(std) = s.into_std() {
                    drop(UserFd::new(OwnedFd::from(std), self.uid));
                }
            }
        }
    }
}

fn died() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "the fork server died (see its traceback above in this log)",
    )
}

/// Arguments of the server's Python: the boot, then its name for `ps`.
pub fn boot_args() -> Vec<String> {
    let [c, boot] = FORKSERVER.args();
    vec![c, boot, "dask-spank-forkserver".into()]
}

impl ForkServer {
    /// Start the server as `req` says (program: the job's Python; args and
    /// stdin are set here).
    pub async fn spawn(req: &SpawnRequest<'_>) -> Result<ForkServer, SpawnError> {
        use std::os::fd::AsFd;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        ours.set_nonblocking(true)?;
        let args = boot_args();
        let mut env = req.extra_env.to_vec();
        env.push(FORKSERVER.env());
        let child = spawn(&SpawnRequest {
            args: &args,
            stdin: Some(theirs.as_fd()),
            extra_env: &env,
            ..*req
        })
        .await?;
        drop(theirs);
        let uid = req.identity.uid;
        Ok(ForkServer {
            child,
            uid,
            exits: Exits::default(),
            conn: ServerConn::new(UnixStream::from_std(ours)?, uid),
            partial: Vec::new(),
            gone: false,
        })
    }

    /// Adopt the server `server` of a previous agent, through its control
    /// socket (which the job's attach process held meanwhile), with its
    /// worker `worker` running.
    pub fn adopt(
        control: OwnedFd,
        server: ProcId,
        uid: u32,
        worker: i32,
    ) -> io::Result<ForkServer> {
        let child = Child::adopt(server, uid)?;
        let sock = std::os::unix::net::UnixStream::from(control);
        sock.set_nonblocking(true)?;
        let mut exits = Exits::default();
        exits.forked(worker);
        Ok(ForkServer {
            child,
            uid,
            exits,
            conn: ServerConn::new(UnixStream::from_std(sock)?, uid),
            partial: Vec::new(),
            gone: false,
        })
    }

    /// A copy of the agent's end of the control socket, for the job's
    /// attach process to hold: while it does, an agent that goes away does
    /// not close the socket, and the server keeps its workers.
    pub fn control_fd(&self) -> io::Result<OwnedFd> {
        use std::os::fd::AsFd;
        let tx = self.conn.tx.as_ref().ok_or_else(died)?;
        tx.as_ref().as_fd().try_clone_to_owned()
    }

    /// The server's pid (its process group and session id too).
    pub fn pid(&self) -> i32 {
        self.child.pid()
    }

    /// Close the socket (the server then kills its workers and exits);
    /// the server's process, to stop and reap it.
    pub fn close(self) -> Child {
        self.child
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
        let read = match self.conn.rx() {
            Ok(rx) => rx.take(room).read_until(b'\n', &mut self.partial).await,
            Err(e) => Err(e),
        };
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

    /// Fork a worker with these dask-worker arguments; its identity.
    pub async fn fork(&mut self, args: &[String]) -> io::Result<ProcId> {
        let mut line = serde_json::to_vec(&serde_json::json!({ "args": args }))?;
        line.push(b'\n');
        self.conn.tx()?.write_all(&line).await.map_err(|_| died())?;
        let wait = async {
            loop {
                match self.next_event().await? {
                    Event::Forked { pid } => {
                        // Its parent made it a group leader before saying so.
                        let Some(id) = self.worker_id(pid) else {
                            self.gone = true;
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("the fork server reported pid {pid}, which is not a worker it forked"),
                            ));
                        };
                        self.exits.forked(pid);
                        return Ok(id);
                    }
                    Event::Exited { pid, status } => self.exits.record(pid, status),
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

    /// The identity of a reported worker, if it really is one: a live
    /// process of the server's session that leads its own group and belongs
    /// to the job's user.
    fn worker_id(&self, pid: i32) -> Option<ProcId> {
        let st = procfs::stat(pid).ok()?;
        let ok = pid > 1
            && st.state != 'Z'
            && st.session == self.pid()
            && st.pgrp == pid
            && procfs::owner(pid).ok()? == self.uid;
        ok.then_some(ProcId {
            pid,
            start: st.start,
        })
    }

    /// Wait until worker `pid` exits.
    pub async fn wait(&mut self, pid: i32) -> io::Result<ExitStatus> {
        loop {
            if let Some(st) = self.exits.take(pid) {
                return Ok(ExitStatus::from_raw(st));
            }
            match self.next_event().await? {
                Event::Exited { pid: p, status } => self.exits.record(p, status),
                Event::Forked { .. } | Event::Ready => {}
            }
        }
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
    fn exit_reports_are_kept_only_for_workers_we_asked_for() {
        let mut e = Exits::default();
        e.record(1, 9);
        assert_eq!(e.take(1), None, "never forked");
        e.forked(50);
        e.record(50, 9);
        e.record(50, 0);
        assert_eq!(e.take(50), Some(9));
        assert_eq!(e.take(50), None);
        for pid in 0..1000 {
            e.forked(pid);
            e.record(pid + 1, 0);
        }
        assert!(e.running.len() <= MAX_EXITED && e.ended.len() <= MAX_EXITED);
    }
}

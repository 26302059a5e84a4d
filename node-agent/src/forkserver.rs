//! The agent's side of a worker job's fork server (`worker_start=forkserver`,
//! see `forkserver.py`): started once per job as the job's user, like any
//! dask process (`spawn`), it imports distributed once and forks a worker on
//! each request, so that a restart skips the cold start of Python.
//!
//! The server talks over its stdin, a Unix socket pair with the agent: one
//! JSON object per line. Every worker it forks has its own process group;
//! the server's own group holds only the server.

use crate::spawn::{spawn, SpawnRequest};
use serde::Deserialize;
use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// The server's program, handed over in the environment (and removed from
/// it at once) so that `ps` shows a short command line.
const PROGRAM: &str = include_str!("forkserver.py");
const PROGRAM_VAR: &str = "DASK_SPANK_FORKSERVER";
const BOOT: &str = "import os; exec(os.environ.pop('DASK_SPANK_FORKSERVER'))";
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
    lines: Lines<BufReader<OwnedReadHalf>>,
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
            lines: BufReader::new(rx).lines(),
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
        // `next_line` is cancel safe: `wait` may be dropped in a select.
        // EOF, or a reset when it died with our request unread.
        let line = self.lines.next_line().await.unwrap_or(None);
        match line {
            Some(line) => serde_json::from_str(&line).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad message from the fork server: {e}: {line}"),
                )
            }),
            None => {
                self.gone = true;
                Err(died())
            }
        }
    }

    /// Fork a worker with these dask-worker arguments; its pid.
    pub async fn fork(&mut self, args: &[String]) -> io::Result<i32> {
        let mut line = serde_json::to_vec(&serde_json::json!({ "args": args }))?;
        line.push(b'\n');
        self.tx.write_all(&line).await.map_err(|_| died())?;
        let wait = async {
            loop {
                match self.next_event().await? {
                    Event::Forked { pid } => return Ok(pid),
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

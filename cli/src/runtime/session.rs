//! The job's side of its connection with the node agent, for the life of
//! the job, on the runtime's event loop: the hand-over (attach), then the
//! agent's notices until the dask processes are over.
//!
//! The agent may go away (a restart, an upgrade, a crash). The dask
//! processes run on; the session tries to reach a new agent for
//! `agent_restart_grace` and hands the job over again (`reattach`), passing
//! back the fork server's socket it held meanwhile. If no agent comes, it
//! stops the job's dask processes itself (they are the user's own, as this
//! process is) and the job fails with that reason.

use dask_spank_common::awire;
use dask_spank_common::frame::MAX_REPLY;
use dask_spank_common::messages::{Attach, Hello, ProcIdent};
use dask_spank_common::{Opening, Response, SessionRequest, PROTOCOL_VERSION};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Bound on connecting and on each step of the hand-over.
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a hand-over failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandOverError {
    /// The agent answered and refused the job: a new agent would too.
    #[error("node agent refused: {0}")]
    Refused(String),
    /// No agent, or it broke off.
    #[error("{0}")]
    Unreachable(String),
}

/// How the session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub exit_code: i32,
    pub reason: String,
    /// The agent was lost for good (the job's processes were stopped here).
    pub agent_lost: bool,
}

pub struct Session {
    socket: PathBuf,
    attach: Attach,
    notices: Notices,
    /// Our side of the connection, for the scheduler's address.
    writer: OwnedWriteHalf,
}

/// The agent's side of the connection: its notices.
pub struct Notices {
    reader: OwnedReadHalf,
    /// The job's process groups, as the agent last told.
    groups: Vec<ProcIdent>,
    /// The agent's end of the fork server's socket, held for it.
    held: Option<OwnedFd>,
}

fn lost(e: impl std::fmt::Display) -> HandOverError {
    HandOverError::Unreachable(e.to_string())
}

/// Attach (or reattach) once: the request, the log (our stdout), the held
/// fork server socket.
async fn hand_over(
    socket: &Path,
    attach: &Attach,
    held: Option<BorrowedFd<'_>>,
) -> Result<UnixStream, HandOverError> {
    let steps = async {
        let mut c = UnixStream::connect(socket)
            .await
            .map_err(|e| lost(format!("node agent socket {}: {e}", socket.display())))?;
        let hello = Hello {
            version: PROTOCOL_VERSION,
            client: "attach".into(),
        };
        awire::write(&mut c, &hello).await.map_err(lost)?;
        match awire::read(&mut c, MAX_REPLY).await.map_err(lost)? {
            Response::Welcome { .. } => {}
            Response::Error { message } => return Err(HandOverError::Refused(message)),
            other => return Err(lost(format!("unexpected reply {other:?}"))),
        }
        let req = Attach {
            forkserver_fd: held.is_some(),
            ..attach.clone()
        };
        awire::write(&mut c, &Opening::Attach(req))
            .await
            .map_err(lost)?;
        match awire::read(&mut c, MAX_REPLY).await.map_err(lost)? {
            Response::SendLogFd => {}
            Response::Error { message } => return Err(HandOverError::Refused(message)),
            other => return Err(lost(format!("unexpected reply {other:?}"))),
        }
        let stdout = std::io::stdout();
        let mut fds = vec![stdout.as_fd()];
        awire::send_fds(&c, &fds).await.map_err(lost)?;
        if let Some(fd) = held {
            fds = vec![fd];
            awire::send_fds(&c, &fds).await.map_err(lost)?;
        }
        match awire::read(&mut c, MAX_REPLY).await.map_err(lost)? {
            Response::Attached => Ok(c),
            Response::Error { message } => Err(HandOverError::Refused(message)),
            other => Err(lost(format!("unexpected reply {other:?}"))),
        }
    };
    tokio::time::timeout(HAND_OVER_TIMEOUT, steps)
        .await
        .map_err(|_| lost("the node agent did not answer in time"))?
}

/// Tell the agent where the job's scheduler is (a worker job).
pub async fn report_scheduler(writer: &mut OwnedWriteHalf, address: &str) -> Result<(), String> {
    let req = SessionRequest::SchedulerAddress {
        address: address.to_string(),
    };
    let send = awire::write(writer, &req);
    match tokio::time::timeout(HAND_OVER_TIMEOUT, send).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("the node agent did not take the scheduler's address in time".into()),
    }
}

impl Session {
    pub async fn open(socket: PathBuf, attach: Attach) -> Result<Session, HandOverError> {
        let conn = hand_over(&socket, &attach, None).await?;
        let (reader, writer) = conn.into_split();
        Ok(Session {
            socket,
            attach,
            notices: Notices {
                reader,
                groups: vec![],
                held: None,
            },
            writer,
        })
    }

    /// The two sides, to wait for notices while writing.
    pub fn parts(&mut self) -> (&mut Notices, &mut OwnedWriteHalf) {
        (&mut self.notices, &mut self.writer)
    }
}

impl Notices {
    /// The next notice of the agent that matters: the end of the job's
    /// dask processes, or the agent's loss (`Err`, with the reason). Keep
    /// the future across a select's turns (it is not cancel safe
    /// mid-frame).
    pub async fn finished(&mut self) -> Result<Finished, String> {
        loop {
            let r: Response = awire::read(&mut self.reader, MAX_REPLY)
                .await
                .map_err(|e| e.to_string())?;
            match r {
                Response::Finished { exit_code, reason } => {
                    return Ok(Finished {
                        exit_code,
                        reason,
                        agent_lost: false,
                    })
                }
                Response::Processes { groups } => self.groups = groups,
                Response::HoldFd => {
                    let mut fds = awire::recv_fds(self.reader.as_ref())
                        .await
                        .map_err(|e| e.to_string())?;
                    if !fds.is_empty() {
                        self.held = Some(fds.swap_remove(0));
                    }
                }
                other => return Err(format!("unexpected message {other:?}")),
            }
        }
    }
}

impl Session {
    /// The agent is gone: hand the job over to a new one within `grace`,
    /// trying every half second; the reason if none takes it.
    pub async fn reattach(&mut self, grace: Duration) -> Result<(), String> {
        let again = Attach {
            reattach: true,
            ..self.attach.clone()
        };
        let mut last = String::new();
        let tries = async {
            loop {
                let held = self.notices.held.as_ref().map(|f| f.as_fd());
                match hand_over(&self.socket, &again, held).await {
                    Ok(c) => return Ok(c),
                    // A new agent that refuses the job will not change its mind.
                    Err(e @ HandOverError::Refused(_)) => return Err(e.to_string()),
                    Err(e) => last = e.to_string(),
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        };
        match tokio::time::timeout(grace, tries).await {
            Ok(Ok(c)) => {
                let (reader, writer) = c.into_split();
                self.notices.reader = reader;
                self.writer = writer;
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!(
                "it did not come back within {}s ({last})",
                grace.as_secs()
            )),
        }
    }

    /// No agent will come back: stop the job's process groups ourselves.
    pub async fn stop_groups(&mut self) {
        self.notices.held = None;
        stop_groups(&self.notices.groups).await;
    }
}

/// Whether `id` still names the process it named (pid and start time).
fn alive(id: &ProcIdent) -> bool {
    dask_spank_common::procstat::start_time(id.pid) == Some(id.start)
}

/// Stop the job's process groups, as their user: SIGTERM, then SIGKILL
/// after 5 s. A group is signalled only while its leader is the very
/// process the agent named (so its id cannot have been reused).
async fn stop_groups(groups: &[ProcIdent]) {
    use nix::sys::signal::{killpg, Signal};
    use nix::unistd::Pid;
    for g in groups.iter().filter(|g| alive(g)) {
        let _ = killpg(Pid::from_raw(g.pid), Signal::SIGTERM);
    }
    let end = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < end && groups.iter().any(alive) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for g in groups.iter().filter(|g| alive(g)) {
        let _ = killpg(Pid::from_raw(g.pid), Signal::SIGKILL);
    }
}

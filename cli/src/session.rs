//! The job's side of its connection with the node agent, for the life of
//! the job: the hand-over (attach), then following the agent's notices
//! until the dask processes are over.
//!
//! The agent may go away (a restart, an upgrade, a crash). The dask
//! processes run on; this process tries to reach a new agent for
//! `agent_restart_grace` and hands the job over again (`reattach`), passing
//! back the fork server's socket it held meanwhile. If no agent comes, it
//! stops the job's dask processes itself (they are the user's own, as this
//! process is) and the job fails with that reason.

use dask_spank_common::client::{Client, ClientError};
use dask_spank_common::messages::{Attach, ProcIdent};
use dask_spank_common::{Request, Response};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub struct Session {
    socket: PathBuf,
    attach: Attach,
    client: Client,
    /// The job's process groups, as the agent last told.
    groups: Vec<ProcIdent>,
    /// The agent's end of the fork server's socket, held for it.
    held: Option<OwnedFd>,
}

/// Attach (or reattach) once: the request, the log (our stdout), the held
/// fork server socket.
fn hand_over(socket: &Path, attach: &Attach, held: Option<&OwnedFd>) -> Result<Client, String> {
    let mut c =
        Client::connect(socket, "attach", Duration::from_secs(10)).map_err(|e| e.to_string())?;
    let req = Attach {
        forkserver_fd: held.is_some(),
        ..attach.clone()
    };
    match c.call(&Request::Attach(req)).map_err(|e| e.to_string())? {
        Response::SendLogFd => {}
        other => return Err(ClientError::unexpected(other).to_string()),
    }
    c.send_fd(1).map_err(|e| e.to_string())?;
    if let Some(fd) = held {
        c.send_fd(fd.as_raw_fd()).map_err(|e| e.to_string())?;
    }
    match c.recv().map_err(|e| e.to_string())? {
        Response::Attached => Ok(c),
        Response::Error { message } => Err(format!("node agent refused: {message}")),
        other => Err(ClientError::unexpected(other).to_string()),
    }
}

impl Session {
    pub fn open(socket: PathBuf, attach: Attach) -> Result<Session, String> {
        let client = hand_over(&socket, &attach, None)?;
        Ok(Session {
            socket,
            attach,
            client,
            groups: vec![],
            held: None,
        })
    }

    /// A second handle on the connection, to send the agent messages from
    /// another thread (a new one after each reattach).
    pub fn sender(&self) -> Option<Client> {
        self.client.try_clone().ok()
    }

    /// Follow the agent until the dask processes are over: their exit code
    /// and the reason. `on_reattach` gets a sender for each new connection.
    pub fn follow(&mut self, grace: Duration, on_reattach: impl Fn(Client)) -> (i32, String) {
        loop {
            let lost = match self.next() {
                Ok(Some(done)) => return done,
                Ok(None) => continue,
                Err(e) => e,
            };
            eprintln!(
                "dask-spank: lost the node agent ({lost}); the dask processes run on: waiting up to {}s for the agent to come back",
                grace.as_secs()
            );
            match self.reattach(grace) {
                Ok(()) => {
                    eprintln!("dask-spank: handed the job over to the node agent again");
                    if let Some(s) = self.sender() {
                        on_reattach(s);
                    }
                }
                Err(why) => {
                    stop_groups(&self.groups);
                    self.held = None;
                    return (
                        1,
                        format!(
                            "lost the node agent: {why}; the job's dask processes were stopped"
                        ),
                    );
                }
            }
        }
    }

    /// One message of the agent: the end, or a notice taken in.
    fn next(&mut self) -> Result<Option<(i32, String)>, String> {
        self.client.wait_forever().map_err(|e| e.to_string())?;
        match self.client.recv().map_err(|e| e.to_string())? {
            Response::Finished { exit_code, reason } => Ok(Some((exit_code, reason))),
            Response::Processes { groups } => {
                self.groups = groups;
                Ok(None)
            }
            Response::HoldFd => {
                self.held = Some(self.client.recv_fd().map_err(|e| e.to_string())?);
                Ok(None)
            }
            other => Ok(Some((1, ClientError::unexpected(other).to_string()))),
        }
    }

    fn reattach(&mut self, grace: Duration) -> Result<(), String> {
        let deadline = Instant::now() + grace;
        let again = Attach {
            reattach: true,
            ..self.attach.clone()
        };
        let mut last = String::new();
        while Instant::now() < deadline {
            match hand_over(&self.socket, &again, self.held.as_ref()) {
                Ok(c) => {
                    self.client = c;
                    return Ok(());
                }
                // A new agent that refuses the job will not change its mind.
                Err(e) if e.starts_with("node agent refused") => return Err(e),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        Err(format!(
            "it did not come back within {}s ({last})",
            grace.as_secs()
        ))
    }
}

/// Whether `id` still names the process it named (pid and start time).
fn alive(id: &ProcIdent) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", id.pid)) else {
        return false;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return false;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.first() != Some(&"Z") && f.get(19).and_then(|s| s.parse().ok()) == Some(id.start)
}

/// Stop the job's process groups, as their user: SIGTERM, then SIGKILL
/// after 5 s. A group is signalled only while its leader is the very
/// process the agent named (so its id cannot have been reused).
fn stop_groups(groups: &[ProcIdent]) {
    use nix::sys::signal::{killpg, Signal};
    use nix::unistd::Pid;
    for g in groups.iter().filter(|g| alive(g)) {
        let _ = killpg(Pid::from_raw(g.pid), Signal::SIGTERM);
    }
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end && groups.iter().any(alive) {
        std::thread::sleep(Duration::from_millis(100));
    }
    for g in groups.iter().filter(|g| alive(g)) {
        let _ = killpg(Pid::from_raw(g.pid), Signal::SIGKILL);
    }
}

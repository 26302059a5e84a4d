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

#[cfg(test)]
pub(super) mod tests {
    //! The client's side of the attach conversation against a fake agent
    //! that speaks the real framing (`awire`) on a socket in a temp dir.
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::CommandExt;
    use tokio::net::UnixListener;

    /// Largest frame the fake agent takes.
    const MAX: usize = 1 << 20;

    /// A fresh directory with the path of an agent socket in it.
    pub(crate) fn socket_path(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dsp-sess-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("agent.sock")
    }

    pub(crate) fn attach_req() -> Attach {
        Attach {
            job_id: 7,
            cwd: "/work".into(),
            env: vec![("A".into(), "1".into())],
            cluster_dir: "/home/u/.dask-spank/ana".into(),
            reattach: false,
            forkserver_fd: false,
        }
    }

    /// The agent's side up to the opening: the client's hello (welcomed)
    /// and its attach request.
    pub(crate) async fn greet(l: &UnixListener) -> (UnixStream, Hello, Attach) {
        let (mut s, _) = l.accept().await.unwrap();
        let hello: Hello = awire::read(&mut s, MAX).await.unwrap();
        let welcome = Response::Welcome {
            version: PROTOCOL_VERSION,
        };
        awire::write(&mut s, &welcome).await.unwrap();
        let Opening::Attach(a) = awire::read(&mut s, MAX).await.unwrap() else {
            panic!("the client's opening is not an attach");
        };
        (s, hello, a)
    }

    /// The rest of a hand-over the agent takes: the log descriptor (and
    /// the held one, with `held`), then `Attached`. The descriptors got.
    pub(crate) async fn take_over(s: &mut UnixStream, held: bool) -> Vec<OwnedFd> {
        awire::write(s, &Response::SendLogFd).await.unwrap();
        let mut fds = awire::recv_fds(s).await.unwrap();
        if held {
            fds.extend(awire::recv_fds(s).await.unwrap());
        }
        awire::write(s, &Response::Attached).await.unwrap();
        fds
    }

    /// (device, inode) of an open file: which file a descriptor is.
    fn file_id(fd: BorrowedFd<'_>) -> (u64, u64) {
        let f = std::fs::File::from(fd.try_clone_to_owned().unwrap());
        let m = f.metadata().unwrap();
        (m.dev(), m.ino())
    }

    #[tokio::test]
    async fn a_hand_over_says_hello_passes_the_log_and_follows_the_notices() {
        let path = socket_path("ok");
        let l = UnixListener::bind(&path).unwrap();
        let held_file = std::fs::File::open("/dev/null").unwrap();
        let held_id = file_id(held_file.as_fd());
        let agent = async {
            let (mut s, hello, a) = greet(&l).await;
            assert_eq!(
                (hello.client.as_str(), hello.version),
                ("attach", PROTOCOL_VERSION)
            );
            // A first attach: no fork server's socket to pass back.
            assert_eq!(a, attach_req());
            let fds = take_over(&mut s, false).await;
            assert_eq!(fds.len(), 1);
            assert_eq!(file_id(fds[0].as_fd()), file_id(std::io::stdout().as_fd()));
            let groups = vec![ProcIdent { pid: 41, start: 99 }];
            awire::write(&mut s, &Response::Processes { groups })
                .await
                .unwrap();
            awire::write(&mut s, &Response::HoldFd).await.unwrap();
            awire::send_fds(&s, &[held_file.as_fd()]).await.unwrap();
            let end = Response::Finished {
                exit_code: 3,
                reason: "worker died".into(),
            };
            awire::write(&mut s, &end).await.unwrap();
            s
        };
        let client = async {
            let mut session = Session::open(path.clone(), attach_req()).await.unwrap();
            let end = session.notices.finished().await;
            (session, end)
        };
        let (_s, (session, end)) = tokio::join!(agent, client);
        let want = Finished {
            exit_code: 3,
            reason: "worker died".into(),
            agent_lost: false,
        };
        assert_eq!(end, Ok(want));
        assert_eq!(session.notices.groups, [ProcIdent { pid: 41, start: 99 }]);
        let held = session.notices.held.as_ref().expect("the held descriptor");
        assert_eq!(file_id(held.as_fd()), held_id);
    }

    /// A hand-over whose agent answers `Error` at step `at` (0: the
    /// hello, 1: the attach request, 2: the log).
    async fn refused_at(at: u8) -> Result<Session, HandOverError> {
        let path = socket_path(&format!("refused{at}"));
        let l = UnixListener::bind(&path).unwrap();
        let no = Response::Error {
            message: format!("no at {at}"),
        };
        let agent = async {
            let (mut s, _) = l.accept().await.unwrap();
            let _: Hello = awire::read(&mut s, MAX).await.unwrap();
            if at > 0 {
                let welcome = Response::Welcome { version: 1 };
                awire::write(&mut s, &welcome).await.unwrap();
                let _: Opening = awire::read(&mut s, MAX).await.unwrap();
            }
            if at > 1 {
                awire::write(&mut s, &Response::SendLogFd).await.unwrap();
                awire::recv_fds(&s).await.unwrap();
            }
            awire::write(&mut s, &no).await.unwrap();
            s
        };
        tokio::join!(agent, Session::open(path.clone(), attach_req())).1
    }

    #[tokio::test]
    async fn a_refusal_at_any_step_is_a_refusal_with_the_agents_word() {
        for at in 0..3 {
            let e = refused_at(at).await.err().expect("refused");
            assert_eq!(e, HandOverError::Refused(format!("no at {at}")));
            assert_eq!(e.to_string(), format!("node agent refused: no at {at}"));
        }
    }

    #[tokio::test]
    async fn an_unexpected_reply_or_a_hang_up_is_unreachable_not_a_refusal() {
        let path = socket_path("odd");
        let l = UnixListener::bind(&path).unwrap();
        let agent = async {
            // First: `Ok` where the welcome belongs.
            let (mut s, _) = l.accept().await.unwrap();
            let _: Hello = awire::read(&mut s, MAX).await.unwrap();
            awire::write(&mut s, &Response::Ok).await.unwrap();
            // Then: a hang-up after the attach request.
            let (s2, _, _) = greet(&l).await;
            drop(s2);
            s
        };
        let client = async {
            let odd = Session::open(path.clone(), attach_req()).await.err();
            let gone = Session::open(path.clone(), attach_req()).await.err();
            (odd, gone)
        };
        let (_s, (odd, gone)) = tokio::join!(agent, client);
        assert_eq!(
            odd,
            Some(HandOverError::Unreachable("unexpected reply Ok".into()))
        );
        assert!(
            matches!(gone, Some(HandOverError::Unreachable(_))),
            "{gone:?}"
        );
    }

    #[tokio::test]
    async fn no_agent_is_unreachable_and_names_the_socket() {
        let path = socket_path("none");
        let e = Session::open(path.clone(), attach_req()).await.err();
        let Some(HandOverError::Unreachable(why)) = e else {
            panic!("{e:?}");
        };
        assert!(
            why.starts_with(&format!("node agent socket {}: ", path.display())),
            "{why}"
        );
    }

    /// A session on a connection whose agent side is returned.
    async fn attached(tag: &str) -> (Session, UnixStream, UnixListener) {
        let path = socket_path(tag);
        let l = UnixListener::bind(&path).unwrap();
        let agent = async {
            let (mut s, _, _) = greet(&l).await;
            take_over(&mut s, false).await;
            s
        };
        let (s, session) = tokio::join!(agent, Session::open(path.clone(), attach_req()));
        (session.unwrap(), s, l)
    }

    #[tokio::test]
    async fn a_notice_out_of_place_or_a_lost_agent_ends_the_notices() {
        let (mut session, mut s, _l) = attached("notices").await;
        let odd = Response::Welcome { version: 1 };
        awire::write(&mut s, &odd).await.unwrap();
        let e = session.notices.finished().await.unwrap_err();
        assert!(e.starts_with("unexpected message Welcome"), "{e}");
        let (mut session, s, _l) = attached("lost").await;
        drop(s);
        assert!(session.notices.finished().await.is_err());
    }

    #[tokio::test]
    async fn the_scheduler_address_goes_to_the_agent_as_a_session_request() {
        let (mut session, mut s, _l) = attached("address").await;
        let (_, writer) = session.parts();
        report_scheduler(writer, "tls://n1:8786").await.unwrap();
        let got: SessionRequest = awire::read(&mut s, MAX).await.unwrap();
        assert_eq!(
            got,
            SessionRequest::SchedulerAddress {
                address: "tls://n1:8786".into()
            }
        );
    }

    #[tokio::test]
    async fn a_reattach_passes_back_the_held_socket_and_follows_the_new_agent() {
        let (mut session, mut s, l) = attached("reattach").await;
        let held_file = std::fs::File::open("/dev/null").unwrap();
        awire::write(&mut s, &Response::HoldFd).await.unwrap();
        awire::send_fds(&s, &[held_file.as_fd()]).await.unwrap();
        drop(s);
        assert!(session.notices.finished().await.is_err(), "the agent left");
        let agent = async {
            let (mut s, _, a) = greet(&l).await;
            let fds = take_over(&mut s, true).await;
            let end = Response::Finished {
                exit_code: 0,
                reason: "done".into(),
            };
            awire::write(&mut s, &end).await.unwrap();
            (s, a, fds)
        };
        let client = async {
            session.reattach(Duration::from_secs(5)).await.unwrap();
            session.notices.finished().await
        };
        let ((_s, a, fds), end) = tokio::join!(agent, client);
        let want = Attach {
            reattach: true,
            forkserver_fd: true,
            ..attach_req()
        };
        assert_eq!(a, want);
        assert_eq!(fds.len(), 2, "the log, then the held socket");
        assert_eq!(file_id(fds[1].as_fd()), file_id(held_file.as_fd()));
        assert_eq!(end.map(|f| (f.exit_code, f.reason)), Ok((0, "done".into())));
    }

    #[tokio::test]
    async fn a_new_agent_that_refuses_ends_the_reattach_at_once() {
        let (mut session, s, l) = attached("rerefused").await;
        drop(s);
        let agent = async {
            let (mut s, _) = l.accept().await.unwrap();
            let _: Hello = awire::read(&mut s, MAX).await.unwrap();
            let no = Response::Error {
                message: "unknown job 7".into(),
            };
            awire::write(&mut s, &no).await.unwrap();
            s
        };
        let start = std::time::Instant::now();
        let (_s, r) = tokio::join!(agent, session.reattach(Duration::from_secs(5)));
        assert_eq!(r, Err("node agent refused: unknown job 7".into()));
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn no_new_agent_within_the_grace_says_why_it_last_failed() {
        let (mut session, s, l) = attached("nonew").await;
        drop((s, l));
        let _ = std::fs::remove_file(&session.socket);
        let e = session
            .reattach(Duration::from_millis(300))
            .await
            .unwrap_err();
        let want = format!(
            "it did not come back within 0s (node agent socket {}: ",
            session.socket.display()
        );
        assert!(e.starts_with(&want), "{e}");
    }

    #[tokio::test]
    async fn only_the_very_process_named_is_stopped() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let start = dask_spank_common::procstat::start_time(pid).unwrap();
        let stale = ProcIdent {
            pid,
            start: start + 1,
        };
        assert!(!alive(&stale));
        stop_groups(&[stale]).await;
        assert!(
            child.try_wait().unwrap().is_none(),
            "a reused pid is left alone"
        );
        // Reaped as it dies: a zombie would still look alive.
        let reaper = std::thread::spawn(move || child.wait());
        stop_groups(&[ProcIdent { pid, start }]).await;
        let status = reaper.join().unwrap().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(nix::libc::SIGTERM));
    }
}

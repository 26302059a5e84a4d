//! The agent's core in-process: every request kind and every refusal,
//! through the real server code on a socket pair, with the peer's
//! credentials chosen by the test (the accept loop takes them from the
//! kernel). No Slurm: jobs are registered as the plugin would, and the
//! full attach runs the benchmark mode's stub (`/bin/sleep`) instead of
//! dask, as the job's user (this needs root, as the agent does).

use dask_node_agent::socket::access::Peer;
use dask_node_agent::socket::connlimit::ConnLimits;
use dask_node_agent::spawning::dask_cmd::DaskSettings;
use dask_node_agent::supervision::agent::Agent;
use dask_node_agent::supervision::jobs::Jobs;
use dask_node_agent::{socket::server, system::wire};
use dask_spank_common::frame::FrameError;
use dask_spank_common::messages::{Attach, Hello, JobStatus};
use dask_spank_common::{
    JobSpec, JobState, Opening, Request, Response, SessionRequest, OLDEST_PEER_VERSION,
    PROTOCOL_VERSION,
};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

const USER: u32 = 65534;

fn agent(stub: bool) -> Arc<Agent> {
    let settings = DaskSettings {
        host: None,
        stub: stub.then(|| vec!["/bin/sleep".into(), "1000".into()]),
    };
    let starter = dask_node_agent::spawning::spawn::Starter {
        spawner: dask_node_agent::spawning::spawner::Spawner::start(std::path::Path::new(env!(
            "CARGO_BIN_EXE_dask-node-agent"
        )))
        .expect("spawner"),
        deadline: Duration::from_secs(10),
    };
    Agent::new(Jobs::new(None), settings, starter)
}

fn me() -> i32 {
    std::process::id() as i32
}

fn spec(job_id: u32, uid: u32) -> JobSpec {
    let mut s: JobSpec = serde_json::from_str(include_str!("../testdata/spec.json")).expect("spec");
    s.job_id = job_id;
    s.uid = uid;
    s.gid = uid;
    s.groups = vec![uid];
    s.stepd_pid = me();
    s.array_job_id = None;
    s.array_task_id = None;
    s
}

/// A connection to the agent as `peer`, its handshake done.
async fn connect(agent: &Arc<Agent>, peer: Peer) -> UnixStream {
    let (mut ours, theirs) = UnixStream::pair().expect("socketpair");
    let permit = Arc::new(ConnLimits::default())
        .try_acquire(peer.uid)
        .expect("permit");
    let a = agent.clone();
    tokio::spawn(async move { server::handle(theirs, peer, permit, a).await });
    let hello = Hello {
        version: PROTOCOL_VERSION,
        client: "test".into(),
    };
    wire::write(&mut ours, &hello).await.expect("hello");
    let welcome: Response = wire::read::<Response>(&ours, 0, 1 << 20)
        .await
        .expect("welcome");
    assert_eq!(
        welcome,
        Response::Welcome {
            version: PROTOCOL_VERSION
        }
    );
    ours
}

async fn call(agent: &Arc<Agent>, peer: Peer, req: &impl serde::Serialize) -> Response {
    let mut s = connect(agent, peer).await;
    wire::write(&mut s, req).await.expect("request");
    wire::read::<Response>(&s, 0, 32 << 20)
        .await
        .expect("reply")
}

fn root() -> Peer {
    Peer { uid: 0, pid: 1 }
}

fn user(uid: u32) -> Peer {
    Peer { uid, pid: me() }
}

fn refused(r: Response, what: &str) {
    match r {
        Response::Error { message } => assert!(message.contains(what), "{message}"),
        other => panic!("expected a refusal with {what:?}, got {other:?}"),
    }
}

async fn register(agent: &Arc<Agent>, s: JobSpec) {
    let r = call(agent, root(), &Request::Register(Box::new(s))).await;
    assert_eq!(r, Response::Ok);
}

fn statuses(r: Response) -> Vec<JobStatus> {
    match r {
        Response::Status { jobs } => jobs,
        other => panic!("expected a status, got {other:?}"),
    }
}

#[tokio::test]
async fn ping_status_and_metrics_follow_their_access_rules() {
    let a = agent(false);
    assert_eq!(call(&a, user(1000), &Request::Ping).await, Response::Ok);
    register(&a, spec(1, 1000)).await;
    register(&a, spec(2, 1001)).await;
    let mine = statuses(call(&a, user(1000), &Request::Status).await);
    assert_eq!(mine.iter().map(|j| j.job_id).collect::<Vec<_>>(), vec![1]);
    assert_eq!(mine[0].state, JobState::Registered);
    // The name comes from the uid, not from the registration ("alice").
    assert_eq!(mine[0].user, dask_spank_common::sys::user_name(1000));
    assert_eq!(statuses(call(&a, root(), &Request::Status).await).len(), 2);
    match call(&a, root(), &Request::Metrics).await {
        Response::Metrics { text } => assert!(text.contains("dask_spank_jobs 2\n"), "{text}"),
        other => panic!("{other:?}"),
    }
    refused(call(&a, user(1000), &Request::Metrics).await, "only root");
}

#[tokio::test]
async fn only_root_registers_and_ends_jobs_of_live_slurmstepds() {
    let a = agent(false);
    refused(
        call(&a, user(1000), &Request::Register(Box::new(spec(1, 1000)))).await,
        "may not register jobs",
    );
    let mut gone = spec(1, 1000);
    gone.stepd_pid = 0x3fff_fff0;
    refused(
        call(&a, root(), &Request::Register(Box::new(gone))).await,
        "is not running",
    );
    let end = Request::JobEnd {
        job_id: 1,
        reason: "x".into(),
    };
    refused(call(&a, user(1000), &end).await, "may not end jobs");
    register(&a, spec(1, 1000)).await;
    assert_eq!(call(&a, root(), &end).await, Response::Ok);
    let ended = statuses(call(&a, root(), &Request::Status).await);
    assert_eq!(ended[0].state, JobState::Ended);
    assert!(a.jobs.is_empty());
}

fn attach_req(job_id: u32) -> Opening {
    Opening::Attach(Attach {
        job_id,
        cwd: "/".into(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cluster_dir: "/nonexistent".into(),
        reattach: false,
        forkserver_fd: false,
    })
}

#[tokio::test]
async fn attach_refusals() {
    let a = agent(true);
    refused(
        call(&a, user(1000), &attach_req(9)).await,
        "is not registered",
    );
    register(&a, spec(1, 1000)).await;
    refused(
        call(&a, user(1001), &attach_req(1)).await,
        "belongs to uid 1000",
    );
    refused(
        call(&a, Peer { uid: 1000, pid: 1 }, &attach_req(1)).await,
        "is not a process of job 1",
    );
    // A session's message is no opening: refused before any attach.
    let addr = SessionRequest::SchedulerAddress {
        address: "tcp://127.0.0.1:1".into(),
    };
    refused(
        call(&a, user(1000), &addr).await,
        "unknown variant `scheduler_address`",
    );
    // The log must be a file: a pipe is refused.
    let mut s = connect(&a, user(1000)).await;
    wire::write(&mut s, &attach_req(1)).await.expect("attach");
    let r: Response = wire::read::<Response>(&s, 0, 1 << 20).await.expect("reply");
    assert_eq!(r, Response::SendLogFd);
    let (_r, w) = nix::unistd::pipe().expect("pipe");
    send_fd(&s, &w);
    refused(
        wire::read::<Response>(&s, 0, 1 << 20).await.expect("reply"),
        "is a pipe",
    );
    // Attached once: never again.
    refused(
        call(&a, user(1000), &attach_req(1)).await,
        "already attached",
    );
}

fn send_fd(s: &UnixStream, fd: &OwnedFd) {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let fds = [fd.as_raw_fd()];
    let iov = [std::io::IoSlice::new(b"F")];
    sendmsg::<()>(
        s.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .expect("sendmsg");
}

#[tokio::test]
async fn handshakes_and_requests_are_bounded() {
    let a = agent(false);
    // Versions outside what this agent serves: refused, naming them; the
    // oldest it serves (a job started before an upgrade): welcomed in its
    // own version.
    let limits = Arc::new(ConnLimits::default());
    for version in [99, OLDEST_PEER_VERSION - 1, OLDEST_PEER_VERSION] {
        let (mut ours, theirs) = UnixStream::pair().expect("socketpair");
        let permit = limits.try_acquire(1000).expect("permit");
        tokio::spawn(server::handle(theirs, user(1000), permit, a.clone()));
        let hello = Hello {
            version,
            client: "old".into(),
        };
        wire::write(&mut ours, &hello).await.expect("hello");
        let r = wire::read::<Response>(&ours, 0, 1 << 20)
            .await
            .expect("reply");
        if version == OLDEST_PEER_VERSION {
            assert!(
                matches!(r, Response::Welcome { version: v } if v == OLDEST_PEER_VERSION),
                "{r:?}"
            );
        } else {
            refused(r, &format!("version {version} is not supported"));
        }
    }
    // A user without a job waiting for its attach may not send a big frame.
    let mut s = connect(&a, user(1000)).await;
    s.write_all(&(64u32 * 1024).to_be_bytes())
        .await
        .expect("header");
    refused(
        wire::read::<Response>(&s, 0, 1 << 20).await.expect("reply"),
        "exceeds the limit of 16384 bytes",
    );
    // A connection that never speaks is closed by the agent.
    tokio::time::pause();
    let (silent, theirs) = UnixStream::pair().expect("socketpair");
    let permit = Arc::new(ConnLimits::default())
        .try_acquire(1000)
        .expect("permit");
    let handler = tokio::spawn(server::handle(theirs, user(1000), permit, a.clone()));
    tokio::time::advance(dask_node_agent::socket::conn::OPEN_TIMEOUT + Duration::from_secs(1))
        .await;
    let res = handler.await.expect("handler");
    assert!(res.unwrap_err().contains("no request"));
    assert!(matches!(
        wire::read::<Response>(&silent, 0, 100).await,
        Err(FrameError::Closed)
    ));
}

/// The replies up to `Finished`: the notices (process groups) seen, and
/// the end.
async fn until_finished(s: &mut UnixStream) -> (Vec<Vec<i32>>, i32, String) {
    let mut notices = vec![];
    loop {
        match wire::read::<Response>(s, 0, 1 << 20).await.expect("reply") {
            Response::Processes { groups } => notices.push(groups.iter().map(|g| g.pid).collect()),
            Response::Finished { exit_code, reason } => return (notices, exit_code, reason),
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[tokio::test]
async fn a_full_attach_runs_the_job_as_its_user_and_the_end_stops_it() {
    if !is_root() {
        eprintln!("skipped: starting a process as another user needs root");
        return;
    }
    let a = agent(true);
    register(&a, spec(1, USER)).await;
    let mut s = connect(&a, user(USER)).await;
    wire::write(&mut s, &attach_req(1)).await.expect("attach");
    assert_eq!(
        wire::read::<Response>(&s, 0, 1 << 20).await.expect("reply"),
        Response::SendLogFd
    );
    let log = std::env::temp_dir().join(format!("dsp-agent-test-{}", me()));
    let f = std::fs::File::create(&log).expect("log");
    send_fd(&s, &OwnedFd::from(f));
    assert_eq!(
        wire::read::<Response>(&s, 0, 1 << 20).await.expect("reply"),
        Response::Attached
    );
    let pid = wait_running(&a, 1).await;
    let st = dask_node_agent::system::procfs::stat(pid).expect("stub");
    assert_eq!(st.pgrp, pid, "its own process group");
    assert_eq!(
        dask_node_agent::system::procfs::owner(pid).expect("owner"),
        USER
    );
    // The scheduler address the job reports is taken; then the job ends.
    let addr = SessionRequest::SchedulerAddress {
        address: "tcp://127.0.0.1:9".into(),
    };
    wire::write(&mut s, &addr).await.expect("address");
    assert_eq!(
        call(
            &a,
            root(),
            &Request::JobEnd {
                job_id: 1,
                reason: "job step ended".into()
            }
        )
        .await,
        Response::Ok
    );
    let (notices, exit_code, reason) = until_finished(&mut s).await;
    assert_eq!((exit_code, reason.as_str()), (0, "job step ended"));
    // The job's process group was told (then perhaps that none is left).
    assert_eq!(notices.first(), Some(&vec![pid]));

    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the stub is gone"
    );
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains("worker started, pid"), "{text}");
    let _ = std::fs::remove_file(&log);
}

async fn wait_running(a: &Arc<Agent>, job: u32) -> i32 {
    for _ in 0..100 {
        let jobs = statuses(call(a, root(), &Request::Status).await);
        if let Some(pid) = jobs
            .iter()
            .find(|j| j.job_id == job && j.state == JobState::Running)
            .and_then(|j| j.pid)
        {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {job} never ran");
}

#[tokio::test]
async fn shutdown_waits_for_the_supervisors_and_stops_every_process() {
    if !is_root() {
        eprintln!("skipped: starting a process as another user needs root");
        return;
    }
    let a = agent(true);
    register(&a, spec(1, USER)).await;
    let mut s = connect(&a, user(USER)).await;
    wire::write(&mut s, &attach_req(1)).await.expect("attach");
    let _: Response = wire::read::<Response>(&s, 0, 1 << 20).await.expect("reply");
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .expect("null");
    send_fd(&s, &OwnedFd::from(null));
    let _: Response = wire::read::<Response>(&s, 0, 1 << 20).await.expect("reply");
    let pid = wait_running(&a, 1).await;
    assert!(
        a.shut_down("the node agent is shutting down", Duration::from_secs(15))
            .await
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the stub is gone"
    );
    // The agent's own stop fails the job: it must not look COMPLETED.
    let (_, exit_code, reason) = until_finished(&mut s).await;
    assert_eq!(
        (exit_code, reason.as_str()),
        (1, "the node agent is shutting down")
    );
}

//! Starting processes through the spawner, in-process with the real
//! spawner binary: a start as a user, the failures a process reports, and
//! a start that hangs before its exec (here on a FIFO standing in for a
//! file system that does not answer), which must cost its caller only its
//! deadline and leave the event loop free. Needs root (as the agent).

use dask_node_agent::spawning::jobenv::JobEnv;
use dask_node_agent::spawning::spawn::{spawn, Identity, SpawnError, SpawnRequest, Starter};
use dask_node_agent::spawning::spawner::Spawner;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const USER: u32 = 65534;

fn starter(deadline: Duration) -> Starter {
    Starter {
        spawner: Spawner::start(Path::new(env!("CARGO_BIN_EXE_dask-node-agent"))).expect("spawner"),
        deadline,
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn identity() -> Identity {
    Identity {
        uid: USER,
        gid: USER,
        groups: vec![USER],
    }
}

/// Start `program args` as USER in `cwd`, joining `cgroups`.
async fn start(
    via: &Starter,
    program: &str,
    args: &[&str],
    cwd: &Path,
    cgroups: &[PathBuf],
) -> Result<dask_node_agent::spawning::child::Child, SpawnError> {
    let out = std::fs::File::options()
        .write(true)
        .open("/dev/null")
        .expect("null");
    let env = JobEnv::new(vec![("PATH".into(), "/usr/bin:/bin".into())], None);
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let id = identity();
    spawn(&SpawnRequest {
        program,
        args: &args,
        env: &env,
        cwd,
        identity: &id,
        output: out.as_fd(),
        rlimits: &[],
        cgroup_procs: cgroups,
        stdin: None,
        extra_env: &[],
        umask: None,
        via,
    })
    .await
}

#[tokio::test]
async fn a_start_runs_as_the_user_in_its_own_session() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let via = starter(Duration::from_secs(10));
    let mut c = start(&via, "sleep", &["30"], Path::new("/tmp"), &[])
        .await
        .expect("start");
    let pid = c.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    assert!(
        status.contains(&format!("Uid:\t{USER}\t{USER}\t{USER}\t{USER}")),
        "{status}"
    );
    assert!(status.contains("CapBnd:\t0000000000000000"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    // Signals as `std::process::Command` gives them: SIGPIPE not ignored
    // (the spawner, a Rust program, ignores it), none blocked.
    let ignored = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:\t"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .expect("SigIgn");
    assert_eq!(ignored & (1 << (libc::SIGPIPE - 1)), 0, "{status}");
    assert!(status.contains("SigBlk:\t0000000000000000"), "{status}");
    let st = dask_node_agent::system::procfs::stat(pid).expect("stat");
    assert_eq!((st.session, st.pgrp), (pid, pid));
    assert_eq!(st.ppid, std::process::id() as i32, "the agent's own child");
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/cwd")).expect("cwd"),
        Path::new("/tmp")
    );
    c.kill();
    c.exited().await.expect("exit");
    c.reap();
}

#[tokio::test]
async fn failures_before_the_exec_say_what_failed() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let via = starter(Duration::from_secs(10));
    let e = start(&via, "sleep", &["1"], Path::new("/nonexistent-dir"), &[])
        .await
        .err()
        .expect("no such directory");
    assert!(
        e.to_string()
            .contains("cannot enter the working directory /nonexistent-dir"),
        "{e}"
    );
    let e = start(&via, "no-such-program-x", &[], Path::new("/tmp"), &[])
        .await
        .err()
        .expect("no such program");
    assert!(e.to_string().contains("No such file or directory"), "{e}");
    let root = Identity {
        uid: 0,
        gid: 0,
        groups: vec![],
    };
    let out = std::fs::File::open("/dev/null").expect("null");
    let env = JobEnv::new(vec![], None);
    let refused = spawn(&SpawnRequest {
        program: "true",
        args: &[],
        env: &env,
        cwd: Path::new("/"),
        identity: &root,
        output: out.as_fd(),
        rlimits: &[],
        cgroup_procs: &[],
        stdin: None,
        extra_env: &[],
        umask: None,
        via: &via,
    })
    .await;
    assert!(refused.is_err(), "never as root");
}

#[tokio::test]
async fn a_start_that_hangs_costs_its_deadline_and_nothing_else() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    // A FIFO as a "cgroup.procs" file: opening it for writing waits for a
    // reader that never comes, as a lookup on a dead file system would.
    let dir = std::env::temp_dir().join(format!("dsp-spawn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let fifo = dir.join("cgroup.procs");
    let _ = std::fs::remove_file(&fifo);
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("fifo");
    let via = starter(Duration::from_secs(2));
    let t0 = Instant::now();
    let cgroups = [fifo.clone()];
    let hung = start(&via, "sleep", &["30"], Path::new("/tmp"), &cgroups);
    // Meanwhile, on the same event loop, another start goes through.
    let other = async {
        let mut c = start(&via, "sleep", &["30"], Path::new("/tmp"), &[])
            .await
            .expect("another start");
        let took = t0.elapsed();
        c.kill();
        let _ = c.exited().await;
        c.reap();
        took
    };
    let (hung, other_took) = tokio::join!(hung, other);
    assert!(other_took < Duration::from_secs(1), "{other_took:?}");
    let e = hung.err().expect("the hung start fails");
    assert!(matches!(e, SpawnError::Late(_)), "{e}");
    assert!(
        e.to_string()
            .contains("did not get into the job's cgroups and identity within 2s"),
        "{e}"
    );
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(4),
        "{took:?}"
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

/// A blank process outwaits any stall of the agent's loop between the
/// blank and its orders: with 128 workers starting per core, the agent's
/// loop stalled for 13 s, blanks that gave up after 10 s said so and
/// exited, and each such start failed its job ("cannot start python3:
/// Broken pipe"). Here the agent is 15 s late: the blank still waits,
/// alive and silent.
#[tokio::test]
async fn a_blank_process_outwaits_a_stalled_agent() {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    use nix::unistd::Pid;
    use std::io::Read;
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let via = starter(Duration::from_secs(10));
    let blank = via.spawner.blank().await.expect("a blank process");
    tokio::time::sleep(Duration::from_secs(15)).await;
    let pid = Pid::from_raw(blank.pid);
    let waiting = waitpid(pid, Some(WaitPidFlag::WNOHANG));
    let ctl = std::os::unix::net::UnixStream::from(blank.ctl);
    ctl.set_nonblocking(true).expect("nonblocking");
    let mut said = [0u8; 256];
    let read = (&ctl).read(&mut said);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    let _ = waitpid(pid, None);
    assert!(
        matches!(waiting, Ok(WaitStatus::StillAlive)),
        "the blank ended: {waiting:?}"
    );
    match read {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!(
            "the blank said something: {other:?} {}",
            String::from_utf8_lossy(&said)
        ),
    }
}

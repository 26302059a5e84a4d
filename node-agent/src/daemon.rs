//! Running the agent: privileges, the socket, recovery after a crash, the
//! optional metrics listener, systemd notification, and an orderly
//! shutdown that waits for every supervisor.

use crate::spawning::dask_cmd::DaskSettings;
use crate::spawning::spawn::Starter;
use crate::spawning::spawner::Spawner;
use crate::supervision::agent::Agent;
use crate::supervision::jobs::Jobs;
use crate::{
    socket::server, supervision::metrics, supervision::recovery, system::privileges,
    system::rootdir, system::statefile,
};
use dask_spank_common::client::Client;
use dask_spank_common::paths::agent_socket;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub struct Options {
    /// Directory of the socket and the state (`--agent-dir`).
    pub agent_dir: PathBuf,
    /// The Slurm node name this agent serves.
    pub node: String,
    pub settings: DaskSettings,
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// How long a new process may take to get to its exec (`spawn`).
    pub start_timeout: Duration,
}

/// Every supervised job holds a few descriptors (its attach connection, its
/// log, its child): a thousand jobs need more than the usual soft limit of
/// 1024. Raise the soft limit to the hard one. Children get the job's own
/// limits (`spawn`), not this one.
fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!("cannot raise the open files limit from {soft} to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot read the open files limit: {e}"),
    }
}

/// Tell systemd (Type=notify) that the agent serves, and keep its watchdog
/// fed from the event loop, so a wedged agent gets restarted. Outside
/// systemd (no NOTIFY_SOCKET) this does nothing.
fn systemd_ready() {
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!("sd_notify READY failed: {e}");
    }
    let mut usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        let every = Duration::from_micros(usec / 2);
        tokio::spawn(async move {
            let mut t = tokio::time::interval(every);
            loop {
                t.tick().await;
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            }
        });
        tracing::info!("systemd watchdog fed every {every:?}");
    }
}

/// The socket, world-writable: what each peer may do is decided per
/// request from its kernel-provided credentials.
fn listen(o: &Options) -> Result<tokio::net::UnixListener, String> {
    // Users reach the socket through it; only root may write it.
    rootdir::ensure(&o.agent_dir, 0o755)?;
    let sock = agent_socket(&o.agent_dir, &o.node);
    if Client::connect(&sock, "probe", Duration::from_millis(500)).is_ok() {
        return Err(format!(
            "another agent already answers on {}",
            sock.display()
        ));
    }
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock)
        .map_err(|e| format!("cannot listen on {}: {e}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| format!("{}: {e}", sock.display()))?;
    Ok(listener)
}

async fn serve_metrics(addr: std::net::SocketAddr, agent: &Agent) -> Result<(), String> {
    if !addr.ip().is_loopback() {
        return Err(format!(
            "--metrics-addr {addr}: only loopback addresses are allowed"
        ));
    }
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    tokio::spawn(metrics::serve(l, agent.metrics.clone(), agent.jobs.clone()));
    tracing::info!(%addr, "metrics served over HTTP to every local user (--metrics-addr)");
    Ok(())
}

pub async fn run(o: Options) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("must run as root (it starts processes as the jobs' users)".into());
    }
    privileges::drop_unneeded()?;
    raise_nofile();
    // First, while the agent holds no user's descriptor (see `spawner`).
    let spawner = Spawner::start(std::path::Path::new("/proc/self/exe"))
        .map_err(|e| format!("cannot start the spawner process: {e}"))?;
    let starter = Starter {
        spawner,
        deadline: o.start_timeout,
    };
    if let Some(stub) = &o.settings.stub {
        tracing::warn!(
            "BENCHMARK MODE: running `{}` instead of dask and trusting registrations without slurmctld; never use --stub-command on a production node",
            stub.join(" ")
        );
    }
    let listener = listen(&o)?;
    let state_dir = o.agent_dir.join(format!("state-{}", o.node));
    let state = statefile::StateDir::open(&state_dir)?;
    let jobs = Jobs::new(Some(state));
    if let Ok(st) = statefile::StateDir::open(&state_dir) {
        let kept = recovery::recover(&st, &jobs);
        if kept > 0 {
            tracing::info!("{kept} jobs of the previous agent kept; their processes are adopted as their jobs reattach");
        }
    }
    let agent = Agent::new(jobs, o.settings, starter);
    tokio::spawn(agent.memwatch.clone().run());
    if let Some(addr) = o.metrics_addr {
        serve_metrics(addr, &agent).await?;
    }
    let sock = agent_socket(&o.agent_dir, &o.node);
    tracing::info!(node = %o.node, socket = %sock.display(), "dask-node-agent ready");
    systemd_ready();
    let lost = wait_for_signal(listener, agent.clone()).await?;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    // A handover, not a stop: the jobs' processes run on, and the next
    // agent adopts them as their jobs reattach. If none comes, each job's
    // attach process stops its own after agent_restart_grace.
    // (`dask-node-agent stop-jobs` stops them at once.)
    tracing::info!(
        "exiting: the dask processes of {} jobs run on for the next agent to adopt",
        agent.jobs.len()
    );
    let _ = std::fs::remove_file(&sock);
    // Without running destructors: they would stop what runs.
    std::process::exit(if lost { 1 } else { 0 })
}

/// Serve until SIGTERM or SIGINT, or until the spawner is lost: then no
/// process can be started any more, and the agent leaves as if it had
/// crashed (exit 1; systemd's Restart= brings a new one, which adopts the
/// jobs). A new spawner cannot be made here: the agent now holds users'
/// descriptors, which a fork would copy. Whether the spawner was lost.
async fn wait_for_signal(
    listener: tokio::net::UnixListener,
    agent: Arc<Agent>,
) -> Result<bool, String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let lost = tokio::select! {
        _ = server::serve(listener, agent.clone()) => false,
        _ = term.recv() => false,
        _ = int.recv() => false,
        _ = agent.starter.spawner.ended() => true,
    };
    if lost {
        tracing::error!("the spawner process is gone: leaving, for a new agent to take over");
    }
    Ok(lost)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(agent_dir: PathBuf) -> Options {
        Options {
            agent_dir,
            node: "n1".into(),
            settings: DaskSettings::default(),
            metrics_addr: None,
            start_timeout: Duration::from_secs(10),
        }
    }

    /// A scratch directory with a directory `user` and a symlink `agent`
    /// to it.
    fn scratch(name: &str) -> PathBuf {
        let top = std::env::temp_dir().join(format!("dsp-daemon-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&top);
        std::fs::create_dir_all(top.join("user")).unwrap();
        std::os::unix::fs::symlink(top.join("user"), top.join("agent")).unwrap();
        top
    }

    #[tokio::test]
    async fn the_socket_is_never_made_through_a_symlinked_agent_dir() {
        let top = scratch("link");
        let e = listen(&options(top.join("agent"))).unwrap_err();
        assert!(e.contains("agent is a symbolic link"), "{e}");
        assert!(!top.join("user/agent-n1.sock").exists());
        std::fs::remove_dir_all(&top).unwrap();
    }

    #[tokio::test]
    async fn the_socket_is_never_made_in_a_users_agent_dir() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to give a directory to another uid");
            return;
        }
        let top = scratch("owner");
        let dir = top.join("user");
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        let e = listen(&options(dir.clone())).unwrap_err();
        assert!(e.contains("user is owned by uid 65534"), "{e}");
        assert!(!dir.join("agent-n1.sock").exists());
        // A directory of its own is taken, at 0755.
        let mine = top.join("mine/agent");
        drop(listen(&options(mine.clone())).unwrap());
        let m = std::fs::metadata(&mine).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o755);
        assert!(mine.join("agent-n1.sock").exists());
        std::fs::remove_dir_all(&top).unwrap();
    }
}

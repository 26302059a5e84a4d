//! dask-node-agent: the per-node root daemon of dask-spank.

mod admission;
mod cgroup;
mod dask_cmd;
mod forkserver;
mod jobenv;
mod joblog;
mod jobs;
mod memwatch;
mod metrics;
mod peer;
mod privileges;
mod procfs;
mod restart;
mod server;
mod slurm;
mod spawn;
mod statefile;
mod supervisor;
mod wire;

use clap::{Parser, Subcommand};
use dask_spank_common::client::Client;
use dask_spank_common::paths::{agent_socket, DEFAULT_AGENT_DIR};
use dask_spank_common::{Request, Response};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    version = dask_spank_common::build_info::VERSION,
    about = "dask-spank node agent: runs dask schedulers and workers for Slurm jobs as their users"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct Where {
    /// Directory of the agent's socket (must match the plugin's agent_dir).
    #[arg(long, default_value = DEFAULT_AGENT_DIR)]
    agent_dir: PathBuf,
    /// Slurm node name this agent serves (default: the short hostname).
    #[arg(long)]
    node: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent in the foreground.
    Run {
        #[command(flatten)]
        at: Where,
        /// Address dask schedulers and workers bind to (default: dask's choice).
        #[arg(long)]
        dask_host: Option<String>,
        /// Serve Prometheus metrics over HTTP on this address (e.g. 127.0.0.1:9817).
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Benchmarks of the control plane only, never on a production
        /// node: run this command (split on spaces) instead of dask, and
        /// trust registrations without asking slurmctld.
        #[arg(long, hide = true, value_name = "COMMAND")]
        stub_command: Option<String>,
    },
    /// Show the jobs this agent runs (all for root, your own otherwise).
    Status {
        #[command(flatten)]
        at: Where,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the agent's metrics in Prometheus text format (root).
    Metrics {
        #[command(flatten)]
        at: Where,
    },
    /// Check that the agent answers on its socket (exit 0 if it does).
    Check {
        #[command(flatten)]
        at: Where,
    },
}

fn node_name(n: Option<String>) -> String {
    n.unwrap_or_else(|| {
        nix::unistd::gethostname()
            .map(|h| {
                h.to_string_lossy()
                    .split('.')
                    .next()
                    .unwrap_or("localhost")
                    .to_string()
            })
            .unwrap_or_else(|_| "localhost".into())
    })
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DASK_AGENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.cmd {
        Cmd::Check { at } => {
            let sock = agent_socket(&at.agent_dir, &node_name(at.node));
            match Client::connect(&sock, "check", Duration::from_secs(5))
                .and_then(|mut c| c.call(&Request::Ping))
            {
                Ok(Response::Ok) => {
                    println!("dask-node-agent answers on {}", sock.display());
                    std::process::ExitCode::SUCCESS
                }
                Ok(other) => {
                    eprintln!("dask-node-agent: unexpected reply {other:?}");
                    std::process::ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("dask-node-agent: {e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
        Cmd::Status { at, json } => match call(&at, Request::Status) {
            Ok(Response::Status { jobs }) if json => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&jobs).unwrap_or_default()
                );
                std::process::ExitCode::SUCCESS
            }
            Ok(Response::Status { jobs }) => {
                println!(
                    "{:<10} {:<12} {:<10} {:<9} {:<16} {:<10} {:>7} {:>8} {:>8}  REASON",
                    "JOBID",
                    "LABEL",
                    "USER",
                    "ROLE",
                    "CLUSTER",
                    "STATE",
                    "PID",
                    "RESTARTS",
                    "MEMKILLS"
                );
                for j in jobs {
                    println!(
                        "{:<10} {:<12} {:<10} {:<9} {:<16} {:<10} {:>7} {:>8} {:>8}  {}",
                        j.job_id,
                        j.label,
                        j.user,
                        j.role,
                        j.cluster,
                        j.state,
                        j.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                        j.restarts,
                        j.memory_kills,
                        j.reason.unwrap_or_default()
                    );
                }
                std::process::ExitCode::SUCCESS
            }
            other => fail(other),
        },
        Cmd::Metrics { at } => match call(&at, Request::Metrics) {
            Ok(Response::Metrics { text }) => {
                print!("{text}");
                std::process::ExitCode::SUCCESS
            }
            other => fail(other),
        },
        Cmd::Run {
            at,
            dask_host,
            metrics_addr,
            stub_command,
        } => {
            // One thread: PR_SET_PDEATHSIG is tied to the thread that forked,
            // so children must be forked by a thread that lives as long as
            // the agent.
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("dask-node-agent: cannot start the runtime: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            };
            let stub =
                stub_command.map(|c| c.split_whitespace().map(String::from).collect::<Vec<_>>());
            if stub.as_ref().is_some_and(|s| s.is_empty()) {
                eprintln!("dask-node-agent: --stub-command: empty command");
                return std::process::ExitCode::FAILURE;
            }
            let settings = dask_cmd::DaskSettings {
                host: dask_host,
                stub,
            };
            match rt.block_on(run(at, settings, metrics_addr)) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("dask-node-agent: {e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}

fn call(at: &Where, req: Request) -> Result<Response, String> {
    let sock = agent_socket(&at.agent_dir, &node_name(at.node.clone()));
    Client::connect(&sock, "cli", Duration::from_secs(10))
        .and_then(|mut c| c.call(&req))
        .map_err(|e| e.to_string())
}

fn fail(r: Result<Response, String>) -> std::process::ExitCode {
    match r {
        Ok(other) => eprintln!("dask-node-agent: unexpected reply {other:?}"),
        Err(e) => eprintln!("dask-node-agent: {e}"),
    }
    std::process::ExitCode::FAILURE
}

/// After a crash of the previous agent: kill what its jobs left behind
/// (PR_SET_PDEATHSIG reaches only direct children) and keep the
/// registrations of jobs whose slurmstepd still runs.
fn reconcile(state: &statefile::StateDir, jobs: &jobs::Jobs) {
    let records = state.load_all();
    if records.is_empty() {
        return;
    }
    let procs = statefile::processes();
    for r in records {
        let id = r.spec.job_id;
        let mut killed = 0;
        for (pid, pgid, uid) in &procs {
            if r.pgids.contains(pgid) && *uid == r.spec.uid && *uid != 0 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                killed += 1;
            }
        }
        if killed > 0 {
            tracing::warn!(
                job = id,
                "killed {killed} processes left by the previous agent"
            );
        }
        if statefile::is_slurmstepd(r.spec.stepd_pid) {
            tracing::info!(job = id, "job still running: registration kept (its dask processes, if any, were lost with the previous agent)");
            jobs.insert(statefile::Record {
                spec: r.spec,
                pgids: vec![],
            });
        } else {
            state.remove(id);
        }
    }
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

async fn run(
    at: Where,
    settings: dask_cmd::DaskSettings,
    metrics_addr: Option<std::net::SocketAddr>,
) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("must run as root (it starts processes as the jobs' users)".into());
    }
    privileges::drop_unneeded()?;
    raise_nofile();
    if let Some(stub) = &settings.stub {
        tracing::warn!(
            "BENCHMARK MODE: running `{}` instead of dask and trusting registrations without slurmctld; never use --stub-command on a production node",
            stub.join(" ")
        );
    }
    let node = node_name(at.node);
    std::fs::create_dir_all(&at.agent_dir)
        .map_err(|e| format!("cannot create {}: {e}", at.agent_dir.display()))?;
    std::fs::set_permissions(&at.agent_dir, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", at.agent_dir.display()))?;
    let sock = agent_socket(&at.agent_dir, &node);
    if Client::connect(&sock, "probe", Duration::from_millis(500)).is_ok() {
        return Err(format!(
            "another agent already answers on {}",
            sock.display()
        ));
    }
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock)
        .map_err(|e| format!("cannot listen on {}: {e}", sock.display()))?;
    // Anybody may connect; what each peer may do is decided per request
    // from its kernel-provided credentials.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666))
        .map_err(|e| format!("{}: {e}", sock.display()))?;
    let state =
        statefile::StateDir::open(&at.agent_dir.join(format!("state-{node}"))).map_err(|e| {
            format!(
                "cannot create the state directory under {}: {e}",
                at.agent_dir.display()
            )
        })?;
    let jobs = jobs::Jobs::new(PathBuf::from("/proc"), Some(state));
    if let Ok(st) = statefile::StateDir::open(&at.agent_dir.join(format!("state-{node}"))) {
        reconcile(&st, &jobs);
    }
    let agent = Arc::new(server::Agent {
        jobs,
        settings,
        metrics: metrics::Metrics::default(),
        memwatch: Arc::default(),
    });
    tokio::spawn(agent.memwatch.clone().run());
    if let Some(addr) = metrics_addr {
        if !addr.ip().is_loopback() {
            return Err(format!(
                "--metrics-addr {addr}: only loopback addresses are allowed"
            ));
        }
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        tokio::spawn(metrics::serve(l, agent.clone()));
        tracing::info!(%addr, "metrics served");
    }
    tracing::info!(node = %node, socket = %sock.display(), "dask-node-agent ready");
    systemd_ready();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| e.to_string())?;
    tokio::select! {
        _ = server::serve(listener, agent.clone()) => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    tracing::info!(
        "shutting down: stopping the dask processes of {} jobs",
        agent.jobs.len()
    );
    agent.jobs.stop_all("the node agent is shutting down");
    // Give supervisors time to stop their process groups (SIGTERM, grace, SIGKILL).
    tokio::time::sleep(supervisor::STOP_GRACE + Duration::from_secs(1)).await;
    let _ = std::fs::remove_file(&sock);
    Ok(())
}

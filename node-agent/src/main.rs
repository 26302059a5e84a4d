//! dask-node-agent: the per-node root daemon of dask-spank.

mod admission;
mod dask_cmd;
mod joblog;
mod jobs;
mod peer;
mod restart;
mod server;
mod slurm;
mod spawn;
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
    version,
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
        /// Seconds a worker waits for an unreachable scheduler before leaving.
        #[arg(long, default_value_t = 60)]
        death_timeout: u64,
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
        Cmd::Run {
            at,
            dask_host,
            death_timeout,
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
            let settings = dask_cmd::DaskSettings {
                host: dask_host,
                death_timeout_s: death_timeout,
            };
            match rt.block_on(run(at, settings)) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("dask-node-agent: {e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(at: Where, settings: dask_cmd::DaskSettings) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("must run as root (it starts processes as the jobs' users)".into());
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
    let agent = Arc::new(server::Agent {
        jobs: jobs::Jobs::new(PathBuf::from("/proc")),
        settings,
        policy: restart::RestartPolicy::default(),
    });
    tracing::info!(node = %node, socket = %sock.display(), "dask-node-agent ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| e.to_string())?;
    tokio::select! {
        _ = server::serve(listener, agent.clone()) => {}
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
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

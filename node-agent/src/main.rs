//! dask-node-agent: the command line of the per-node root daemon (see the
//! library for the daemon itself).

use clap::{Parser, Subcommand};
use dask_node_agent::{daemon, siteops, spawning::dask_cmd, spawning::spawner};
use dask_spank_common::client::{Client, ClientError};
use dask_spank_common::messages::JobStatus;
use dask_spank_common::paths::{agent_socket, DEFAULT_AGENT_DIR};
use dask_spank_common::{Request, Response};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
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

/// `--node`, else SLURMD_NODENAME (set for slurmd's programs), else the
/// short hostname.
fn node_name(given: Option<String>) -> String {
    given.unwrap_or_else(dask_spank_common::sys::slurm_node_name)
}

impl Where {
    /// --node, else SLURMD_NODENAME (set for slurmd's programs), else the
    /// short hostname.
    fn node(&self) -> String {
        node_name(self.node.clone())
    }

    fn call(&self, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
        let sock = agent_socket(&self.agent_dir, &self.node());
        Client::connect(&sock, "cli", timeout).and_then(|mut c| c.call(req))
    }
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
        /// Serve Prometheus metrics over HTTP on this loopback address (e.g.
        /// 127.0.0.1:9817). Every local user can read them there.
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Benchmarks of the control plane only, never on a production
        /// node: run this command (split on spaces) instead of dask, and
        /// trust registrations without asking slurmctld.
        #[arg(long, hide = true, value_name = "COMMAND")]
        stub_command: Option<String>,
        /// How long a new dask process may take to get to its exec: entering
        /// the job's working directory, finding and loading its program. A
        /// start that takes longer (a file system that does not answer)
        /// fails the job with a reason naming the path.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        start_timeout: Duration,
    },
    /// The agent's spawner process (started by the agent itself).
    #[command(hide = true)]
    Spawner,
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
    /// Stop every job's dask processes now, failing the jobs with a reason
    /// (the agent itself runs on). Stopping the agent (SIGTERM) leaves them
    /// running for the next agent to adopt.
    StopJobs {
        #[command(flatten)]
        at: Where,
        /// Why, for the jobs' logs.
        #[arg(
            long,
            default_value = "stopped by the site administrator (dask-node-agent stop-jobs)"
        )]
        reason: String,
    },
    /// Slurm's HealthCheckProgram: drain this node while its agent does not
    /// answer (reason "dask-spank: ..."), resume it when it answers again.
    Health {
        #[command(flatten)]
        at: Where,
    },
    /// What the plugstack.conf line resolves to, every key, and whether it
    /// fits this node: the agent answers on the line's agent_dir, the
    /// partitions and licences exist in Slurm. Exit 1 on any problem.
    CheckConfig {
        /// The agent's --agent-dir, when it is not the line's agent_dir
        /// (a mismatch is an error: the plugin would not find the agent).
        #[arg(long)]
        agent_dir: Option<PathBuf>,
        /// Slurm node name of the agent (default: the short hostname).
        #[arg(long)]
        node: Option<String>,
        /// A login node: no agent there to ask (sbatch only reads the line).
        #[arg(long)]
        login_node: bool,
        /// plugstack.conf to read (default: slurm.conf's PlugStackConfig).
        #[arg(long)]
        plugstack: Option<PathBuf>,
    },
    /// Print the protocol of the agent's socket as JSON Schema (generated
    /// from the agent's own types; docs/agent-protocol.schema.json).
    Schema,
}

/// slurm.conf's PlugStackConfig, else plugstack.conf beside slurm.conf.
fn default_plugstack() -> PathBuf {
    let conf = PathBuf::from(
        std::env::var("SLURM_CONF").unwrap_or_else(|_| "/etc/slurm/slurm.conf".into()),
    );
    let text = std::fs::read_to_string(&conf).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split('#').next()?.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("PlugStackConfig"))
        .map(|(_, v)| PathBuf::from(v.trim()))
        .unwrap_or_else(|| conf.with_file_name("plugstack.conf"))
}

fn print_status(jobs: &[JobStatus], json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(jobs).unwrap_or_default());
        return;
    }
    println!(
        "{:<10} {:<12} {:<10} {:<9} {:<16} {:<10} {:>7} {:>8} {:>8}  REASON",
        "JOBID", "LABEL", "USER", "ROLE", "CLUSTER", "STATE", "PID", "RESTARTS", "MEMKILLS"
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
            j.reason.as_deref().unwrap_or_default()
        );
    }
}

/// One request from the command line; the reply printed by `show`.
fn client(
    at: &Where,
    req: Request,
    show: impl FnOnce(Response) -> Result<(), Response>,
) -> ExitCode {
    let res = at
        .call(&req, Duration::from_secs(10))
        .and_then(|r| show(r).map_err(ClientError::unexpected));
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dask-node-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(
    at: Where,
    dask_host: Option<String>,
    metrics_addr: Option<std::net::SocketAddr>,
    stub: Option<String>,
    start_timeout: Duration,
) -> ExitCode {
    // One thread runs the event loop: every blocking step is off it (log
    // writers, scontrol/squeue children), and one thread keeps the agent
    // small next to thousands of jobs.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dask-node-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stub = stub.map(|c| c.split_whitespace().map(String::from).collect::<Vec<_>>());
    if stub.as_ref().is_some_and(|s| s.is_empty()) {
        eprintln!("dask-node-agent: --stub-command: empty command");
        return ExitCode::FAILURE;
    }
    let opts = daemon::Options {
        node: at.node(),
        agent_dir: at.agent_dir,
        settings: dask_cmd::DaskSettings {
            host: dask_host,
            stub,
        },
        metrics_addr,
        start_timeout,
    };
    match rt.block_on(daemon::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dask-node-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Spawner = cli.cmd {
        // Before anything else: the spawner stays one thread, no logger.
        spawner::serve();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DASK_AGENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    match cli.cmd {
        Cmd::Check { at } => {
            let sock = agent_socket(&at.agent_dir, &at.node());
            client(&at, Request::Ping, |r| match r {
                Response::Ok => {
                    println!("dask-node-agent answers on {}", sock.display());
                    Ok(())
                }
                other => Err(other),
            })
        }
        Cmd::Status { at, json } => client(&at, Request::Status, |r| match r {
            Response::Status { jobs } => {
                print_status(&jobs, json);
                Ok(())
            }
            other => Err(other),
        }),
        Cmd::Metrics { at } => client(&at, Request::Metrics, |r| match r {
            Response::Metrics { text } => {
                print!("{text}");
                Ok(())
            }
            other => Err(other),
        }),
        Cmd::Run {
            at,
            dask_host,
            metrics_addr,
            stub_command,
            start_timeout,
        } => run(at, dask_host, metrics_addr, stub_command, start_timeout),
        Cmd::Spawner => spawner::serve(),
        Cmd::StopJobs { at, reason } => client(&at, Request::StopJobs { reason }, |r| match r {
            Response::Ok => {
                println!("every job's dask processes are being stopped");
                Ok(())
            }
            other => Err(other),
        }),
        Cmd::Health { at } => health(&at),
        Cmd::CheckConfig {
            agent_dir,
            node,
            login_node,
            plugstack,
        } => check_config(agent_dir, node, login_node, plugstack),
        Cmd::Schema => {
            println!("{}", schema_text());
            ExitCode::SUCCESS
        }
    }
}

/// What `schema` prints (and the checked-in copy holds).
fn schema_text() -> String {
    let schema = dask_spank_common::schema::protocol_schema();
    serde_json::to_string_pretty(&schema).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// `health`: the node health check's verdict as an exit status.
fn health(at: &Where) -> ExitCode {
    match siteops::health(&agent_socket(&at.agent_dir, &at.node()), &at.node()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dask-node-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `check-config`: every finding printed, the verdict as an exit status.
fn check_config(
    agent_dir: Option<PathBuf>,
    node: Option<String>,
    login_node: bool,
    plugstack: Option<PathBuf>,
) -> ExitCode {
    let conf = plugstack.unwrap_or_else(default_plugstack);
    let agent = (!login_node).then(|| siteops::AgentAt {
        node: node_name(node),
        agent_dir,
    });
    if siteops::check_config(&conf, agent.as_ref()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    /// The checked-in schema is the one the types make: the Python side is
    /// validated against that file (tests/test_protocol.py).
    #[test]
    fn the_checked_in_protocol_schema_is_current() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/agent-protocol.schema.json"
        );
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == format!("{}\n", super::schema_text()),
            "{path} is not what the protocol's types make: \
             cargo run -q -p dask-node-agent -- schema > docs/agent-protocol.schema.json"
        );
    }
}

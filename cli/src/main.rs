//! dask-spank: the user command.

mod attach;
mod commands;
mod record;
mod slurm;
mod view;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    version = dask_spank_common::build_info::VERSION,
    about = "Dask clusters as Slurm jobs",
    long_about = "Dask clusters as Slurm jobs. A cluster is one scheduler job and worker jobs, submitted\nwith plain sbatch; this command wraps sbatch, squeue and scancel, so each step can also be\ndone by hand.",
    after_help = "Examples:\n  dask-spank up ana --workers 100 --worker-mem 3G --wait 80\n  dask-spank status ana\n  dask-spank scale ana 200\n  dask-spank down ana\n\nBy hand:\n  sbatch --dask-role=scheduler --dask-cluster=ana\n  sbatch --dask-role=worker --dask-cluster=ana --array=1-100\n  dask-spank wait ana --percent 80\n\nIn your own job script, end with:\n  #SBATCH --dask-role=worker\n  source activate myenv\n  exec dask-spank attach"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a cluster: one scheduler job and N worker jobs.
    #[command(
        after_help = "Example:\n  dask-spank up ana --workers 100 --worker-mem 3G --wait 80"
    )]
    Up {
        /// Cluster name (letters, digits, '-', '_', '.').
        name: String,
        /// Number of worker jobs (an sbatch array).
        #[arg(long, default_value_t = 1)]
        workers: u32,
        /// Memory of each worker job (--mem), e.g. 3G.
        #[arg(long)]
        worker_mem: Option<String>,
        /// Cpus of each worker job (--cpus-per-task) = dask threads.
        #[arg(long)]
        worker_cpus: Option<u32>,
        /// Time limit of worker jobs (--time), e.g. 2:00:00.
        #[arg(long)]
        worker_time: Option<String>,
        /// Memory of the scheduler job.
        #[arg(long)]
        scheduler_mem: Option<String>,
        /// venv or conda prefix whose python has distributed (--dask-env).
        #[arg(long)]
        env: Option<String>,
        /// Wait until this percentage of worker jobs is connected.
        #[arg(long, value_name = "PERCENT")]
        wait: Option<f64>,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// List your clusters, with job counts and age.
    #[command(after_help = "Example:\n  dask-spank ls")]
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// One row per job: pending, running, connected, failed (with the reason), ended.
    #[command(after_help = "Example:\n  dask-spank status ana --json")]
    Status {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Wait until a percentage of the worker jobs is connected to the scheduler.
    #[command(
        after_help = "Example:\n  dask-spank wait ana --percent 80 --timeout 600\n\nExits non-zero with the reason on a timeout, or when the cluster failed.\n--percent 0 returns at once."
    )]
    Wait {
        name: String,
        #[arg(long, default_value_t = 100.0)]
        percent: f64,
        /// Seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
        #[arg(long)]
        json: bool,
    },
    /// Submit or cancel worker jobs to have N of them.
    #[command(after_help = "Example:\n  dask-spank scale ana 200")]
    Scale { name: String, workers: u32 },
    /// Print the cluster's job logs (--follow to keep printing).
    #[command(after_help = "Example:\n  dask-spank logs ana --job 1234_7 --follow")]
    Logs {
        name: String,
        /// One job (id or array task, e.g. 1234_7).
        #[arg(long)]
        job: Option<String>,
        #[arg(long, short)]
        follow: bool,
    },
    /// Cancel every job of the cluster and check that none is left.
    #[command(after_help = "Example:\n  dask-spank down ana")]
    Down {
        name: String,
        /// Seconds to wait for the jobs to leave the queue.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Hand this job over to the node agent and wait (last line of a job script).
    ///
    /// The agent starts the job's dask scheduler or worker as you, with this
    /// process's environment and directory, and logs into the job's output
    /// file. The exit code is that of the dask process.
    #[command(
        after_help = "Example (job script):\n  #!/bin/bash\n  #SBATCH --dask-role=worker\n  #SBATCH --dask-cluster=ana\n  source ~/envs/analysis/bin/activate\n  exec dask-spank attach"
    )]
    Attach,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Attach => match attach::run() {
            Ok(code) => return ExitCode::from(code.clamp(0, 255) as u8),
            Err(e) => {
                eprintln!("dask-spank attach: {e}");
                return ExitCode::FAILURE;
            }
        },
        Cmd::Up {
            name,
            workers,
            worker_mem,
            worker_cpus,
            worker_time,
            scheduler_mem,
            env,
            wait,
            timeout,
            json,
        } => commands::up(commands::Up {
            name,
            workers,
            worker_mem,
            worker_cpus,
            worker_time,
            scheduler_mem,
            env,
            wait,
            timeout,
            json,
        }),
        Cmd::Ls { json } => commands::ls(json),
        Cmd::Status { name, json } => commands::status(&name, json),
        Cmd::Wait {
            name,
            percent,
            timeout,
            json,
        } => commands::wait(&name, percent, timeout, json),
        Cmd::Scale { name, workers } => commands::scale(&name, workers),
        Cmd::Logs { name, job, follow } => commands::logs(&name, job.as_deref(), follow),
        Cmd::Down { name, timeout } => commands::down(&name, timeout),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dask-spank: {e}");
            ExitCode::FAILURE
        }
    }
}

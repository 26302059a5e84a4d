//! dask-spank: the user command.

mod cluster;
mod cmd;
mod pools;
mod runtime;
mod slurm;
mod target;
mod tls;
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
    Up(Box<cmd::up::Args>),
    Ls(cmd::ls::Args),
    Status(cmd::status::Args),
    Wait(cmd::wait::Args),
    Scale(cmd::scale::Args),
    Adapt(cmd::adapt::Args),
    Logs(cmd::logs::Args),
    Down(cmd::down::Args),
    /// The site's defaults and limits for dask jobs, as the plugin applies them.
    Policy(cmd::policy::Args),
    /// Hand this job over to the node agent and wait (last line of a job script).
    ///
    /// The agent starts the job's dask scheduler or worker as you, with this
    /// process's environment and directory, and logs into the job's output
    /// file. The exit code is that of the dask process.
    #[command(
        after_help = "Example (job script):\n  #!/bin/bash\n  #SBATCH --dask-role=worker\n  #SBATCH --dask-cluster=ana\n  source ~/envs/analysis/bin/activate\n  exec dask-spank attach"
    )]
    Attach,
    /// The files of a cluster directory, as JSON (for the Python package).
    #[command(hide = true)]
    Layout(cmd::layout::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Attach => match runtime::attach() {
            Ok(code) => return ExitCode::from(code.clamp(0, 255) as u8),
            Err(e) => {
                eprintln!("dask-spank attach: {e}");
                return ExitCode::FAILURE;
            }
        },
        Cmd::Up(a) => cmd::up::run(*a),
        Cmd::Ls(a) => cmd::ls::run(a),
        Cmd::Status(a) => cmd::status::run(a),
        Cmd::Wait(a) => cmd::wait::run(a),
        Cmd::Scale(a) => cmd::scale::run(a),
        Cmd::Adapt(a) => cmd::adapt::run(a),
        Cmd::Logs(a) => cmd::logs::run(a),
        Cmd::Down(a) => cmd::down::run(a),
        Cmd::Policy(a) => cmd::policy::run(a),
        Cmd::Layout(a) => cmd::layout::run(a),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dask-spank: {e}");
            ExitCode::FAILURE
        }
    }
}

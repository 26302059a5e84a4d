//! dask-spank: the user command.

mod attach;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    version,
    about = "Dask clusters as Slurm jobs",
    after_help = "Examples:\n  sbatch --dask-role=scheduler --dask-cluster=ana\n  sbatch --dask-role=worker --dask-cluster=ana --array=1-100\n\nIn your own job script, end with:\n  #SBATCH --dask-role=worker\n  source activate myenv\n  exec dask-spank attach"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Hand this job over to the node agent and wait (last line of a job script).
    ///
    /// The agent starts the job's dask scheduler or worker as you, with this
    /// process's environment and directory, and logs into the job's output
    /// file. The exit code is that of the dask process.
    Attach,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Attach => match attach::run() {
            Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
            Err(e) => {
                eprintln!("dask-spank attach: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

//! dask-spank SPANK plugin.
//!
//! The glue is thin: this file dispatches SPANK callbacks by context to
//! `allocator` (sbatch/salloc/srun on the submit host) and `remote`
//! (slurmstepd on the compute node). Parsing, policy and protocol live in
//! pure modules with unit tests.
//!
//! Rule for every callback: never panic and never block without a bound. A
//! panic would poison slurm-spank's global mutexes inside slurmstepd.

pub mod allocator;

pub mod options;
pub mod remote;
pub mod sbatch_args;
pub mod submit;

use dask_spank_common::config::{Config, ConfigError};
use slurm_spank::{Context, Plugin, SpankHandle, SLURM_VERSION_NUMBER, SPANK_PLUGIN};
use std::error::Error;

SPANK_PLUGIN!(b"dask-spank", SLURM_VERSION_NUMBER, DaskSpank);

/// Per-process plugin state (one instance per sbatch or slurmstepd).
#[derive(Default)]
pub struct DaskSpank {
    config: Option<Result<Config, ConfigError>>,
    remote: remote::RemoteState,
}

/// Errors reported to the user: one line, prefixed with `dask-spank:`.
#[derive(Debug)]
pub struct UserError(pub String);

impl std::fmt::Display for UserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "dask-spank: {}", self.0)
    }
}
impl Error for UserError {}

pub(crate) fn user_error(msg: impl Into<String>) -> Box<dyn Error> {
    Box::new(UserError(msg.into()))
}

impl DaskSpank {
    fn config(&self) -> Result<&Config, Box<dyn Error>> {
        match &self.config {
            Some(Ok(c)) => Ok(c),
            Some(Err(e)) => Err(user_error(format!(
                "{e}; ask your site administrator to fix the plugin configuration"
            ))),
            None => Err(user_error("plugin configuration was not read")),
        }
    }
}

unsafe impl Plugin for DaskSpank {
    /// No tracing subscriber: messages go through spank_log directly, and a
    /// second global subscriber would panic.
    fn setup(&mut self, _spank: &mut SpankHandle) -> Result<(), Box<dyn Error>> {
        Ok(())
    }

    fn report_error(&self, _spank: &mut SpankHandle, error: &dyn Error) {
        let msg = error.to_string();
        let msg = if msg.starts_with("dask-spank:") {
            msg
        } else {
            format!("dask-spank: {msg}")
        };
        slurm_spank::spank_log_error!("{}", msg.replace('\n', " "));
    }

    fn init(&mut self, spank: &mut SpankHandle) -> Result<(), Box<dyn Error>> {
        let args = spank.plugin_argv().unwrap_or_default();
        let parsed = Config::parse(args.iter().copied());
        let context = spank.context()?;
        if let Err(e) = &parsed {
            // Loud in every context, but not fatal here: a bad configuration
            // must not take slurmd down. Jobs with --dask-role fail instead.
            slurm_spank::spank_log_error!("dask-spank: {e}");
        }
        self.config = Some(parsed);
        if context == Context::Slurmd || context == Context::JobScript {
            return Ok(());
        }
        options::register(spank)?;
        if context == Context::Allocator {
            allocator::maybe_reexec(self.config())?;
        }
        Ok(())
    }

    fn init_post_opt(&mut self, spank: &mut SpankHandle) -> Result<(), Box<dyn Error>> {
        let opts = options::DaskOptions::read(spank)?;
        let Some(opts) = opts else { return Ok(()) };
        match spank.context()? {
            Context::Allocator | Context::Local => {
                self.config()?;
                allocator::validate(&opts)
            }
            Context::Remote => {
                let cfg = self.config().cloned();
                self.remote.start(spank, cfg, &opts);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn task_init(&mut self, _spank: &mut SpankHandle) -> Result<(), Box<dyn Error>> {
        self.remote.report_in_task()
    }

    fn exit(&mut self, _spank: &mut SpankHandle) -> Result<(), Box<dyn Error>> {
        self.remote.finish();
        Ok(())
    }
}

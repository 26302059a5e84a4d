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

/// The Slurm release whose headers this plugin was built against, e.g.
/// `26.05.5`. Slurm loads the plugin only into that major release.
pub const BUILT_FOR: &str = env!("DASK_SPANK_BUILT_FOR");

/// What `strings spank_dask.so | grep 'built for'` and the load line in
/// slurmd's log show.
pub const BUILD_LINE: &str = concat!(
    "dask-spank plugin ",
    env!("CARGO_PKG_VERSION"),
    " built for Slurm ",
    env!("DASK_SPANK_BUILT_FOR")
);

/// From Slurm 25.05 on, slurmd reads this symbol when it loads a plugin:
/// with `ESPANK_JOB_FAILURE` a failing `slurm_spank_init` fails the job
/// instead of draining the node (`ESPANK_NODE_FAILURE`, the default). A
/// broken dask-spank must never take a compute node out of service. The
/// slurm-spank crate does not export it; build.rs sets the cfg from the
/// headers' `SLURM_VERSION_NUMBER`.
#[cfg(slurm_init_failure_mode)]
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static slurm_spank_init_failure_mode: std::os::raw::c_int =
    slurm_spank::spank_sys::slurm_err_t_ESPANK_JOB_FAILURE as std::os::raw::c_int;

// build.rs and bindgen must have read the same headers.
const _: () = assert!(
    cfg!(slurm_init_failure_mode) == (SLURM_VERSION_NUMBER >= 0x19_05_00),
    "build.rs and bindgen disagree on the Slurm release of the headers"
);

/// Per-process plugin state (one instance per sbatch or slurmstepd).
#[derive(Default)]
pub struct DaskSpank {
    config: Option<Result<Config, ConfigError>>,
    remote: remote::RemoteState,
}

/// Errors reported to the user. Every error a callback returns, this one
/// or another, reaches Slurm's log as one line prefixed with `dask-spank:`
/// ([`error_line`]).
#[derive(Debug)]
pub struct UserError(pub String);

impl std::fmt::Display for UserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl Error for UserError {}

pub(crate) fn user_error(msg: impl Into<String>) -> Box<dyn Error> {
    Box::new(UserError(msg.into()))
}

/// The one line Slurm logs for the error of a callback.
fn error_line(error: &dyn Error) -> String {
    format!("dask-spank: {error}").replace('\n', " ")
}

/// An error told elsewhere than by a callback's return (a failed start
/// of a job, for slurmd's log and then the job's): a [`UserError`] with
/// the `dask-spank:` prefix, any other (Slurm's) as it is.
pub(crate) fn told(error: &(dyn Error + 'static)) -> String {
    match error.downcast_ref::<UserError>() {
        Some(e) => format!("dask-spank: {e}"),
        None => error.to_string(),
    }
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
        slurm_spank::spank_log_error!("{}", error_line(error));
    }

    fn init(&mut self, spank: &mut SpankHandle) -> Result<(), Box<dyn Error>> {
        let args = spank.plugin_argv().unwrap_or_default();
        let parsed = Config::parse(args.iter().copied());
        let context = spank.context()?;
        if context == Context::Slurmd {
            slurm_spank::spank_log_info!(
                "{BUILD_LINE}, commit {} loaded",
                dask_spank_common::build_info::COMMIT
            );
        }
        if let Err(e) = &parsed {
            // Loud on the node (slurmd's log, at its start and in every
            // step), but not fatal: a bad configuration must not take slurmd
            // down. On the submit host it stays quiet for ordinary jobs;
            // a job with --dask-role fails with this line (allocator.rs).
            if !matches!(context, Context::Allocator | Context::Local) {
                slurm_spank::spank_log_error!("dask-spank: {e}");
            }
        }
        self.config = Some(parsed);
        if context == Context::Slurmd || context == Context::JobScript {
            return Ok(());
        }
        options::register(spank)?;
        if context == Context::Allocator {
            if let Err(e) = allocator::maybe_reexec(self.config()) {
                // One line for the user and no more: returning the error
                // would add sbatch's own "init() failed" lines. Exiting is
                // safe here: sbatch registers atexit(spank_fini) only after
                // this init returns, and nothing has been submitted.
                self.report_error(spank, e.as_ref());
                std::process::exit(1);
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_is_one_line_with_one_prefix() {
        let e = user_error("--dask-role=x: must be scheduler or worker");
        assert_eq!(
            error_line(e.as_ref()),
            "dask-spank: --dask-role=x: must be scheduler or worker"
        );
        let io = std::io::Error::other("a\nb");
        assert_eq!(error_line(&io), "dask-spank: a b");
    }

    #[test]
    fn a_user_error_is_told_with_the_prefix_any_other_as_it_is() {
        let e = user_error("node agent refused the job: no");
        assert_eq!(
            told(e.as_ref()),
            "dask-spank: node agent refused the job: no"
        );
        let other: Box<dyn Error> = Box::new(std::io::Error::other("setenv failed"));
        assert_eq!(told(other.as_ref()), "setenv failed");
    }
}

//! Allocator and local context (sbatch, salloc, srun on the submit host),
//! running as the submitting user.

use crate::options::DaskOptions;
use crate::sbatch_args::{parse_cmdline, parse_env, parse_script, Request};
use crate::submit::plan;
use crate::user_error;
use dask_spank_common::config::Config;
use std::error::Error;
use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;

/// Set across the re-exec so that the second sbatch does not re-exec again.
/// Removed from the environment before sbatch copies it into the job.
const GUARD: &str = "DASK_SPANK_REEXEC";
/// Largest script read for `#SBATCH` lines.
const MAX_SCRIPT: u64 = 4 << 20;

/// `--dask-role` makes a batch job whose script the plugin supplies. srun
/// and salloc run the user's own command, so they refuse the option rather
/// than ignore it. Inside a dask job (`job_name` is a dask-spank job name)
/// an srun sees the job's options through its environment (an srun in a
/// dask job's own script); those are left alone. (srun itself puts the
/// options of its command line into its environment before the plugin
/// looks, so the environment cannot tell them apart.)
pub fn check_program(program: &[u8], job_name: Option<&str>) -> Result<(), String> {
    let name = program.rsplit(|b| *b == b'/').next().unwrap_or(program);
    let in_dask_job =
        job_name.is_some_and(|n| n.starts_with("dask-scheduler-") || n.starts_with("dask-worker-"));
    if name == b"sbatch" || in_dask_job {
        return Ok(());
    }
    Err(format!(
        "--dask-role works with sbatch only: {} would run your command, not dask; submit with sbatch --dask-role=...",
        String::from_utf8_lossy(name)
    ))
}

/// The program running the plugin (argv[0]), empty if unknown.
fn program() -> Vec<u8> {
    std::fs::read("/proc/self/cmdline")
        .map(|raw| raw.split(|b| *b == 0).next().unwrap_or_default().to_vec())
        .unwrap_or_default()
}

/// Check option values where the user can see the answer at once.
pub fn validate(opts: &DaskOptions) -> Result<(), Box<dyn Error>> {
    let program = program();
    if !program.is_empty() {
        let job_name = std::env::var("SLURM_JOB_NAME").ok();
        check_program(&program, job_name.as_deref()).map_err(user_error)?;
    }
    if let Some(env) = &opts.env {
        let py = env.join("bin/python");
        if !py.exists() {
            return Err(user_error(format!(
                "--dask-env={}: {} not found (give the prefix of a venv or conda env that has distributed)",
                env.display(),
                py.display()
            )));
        }
    }
    Ok(())
}

fn read_script(path: &str) -> String {
    let mut body = String::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(MAX_SCRIPT).read_to_string(&mut body);
    }
    body
}

/// When sbatch runs with `--dask-role`, re-execute it with the plugin's
/// defaults inserted after argv[0] (see `submit.rs`). This runs in `init`,
/// before sbatch parses anything. Any failure to plan leaves sbatch alone:
/// option errors are then reported by `init_post_opt` with a clear message.
pub fn maybe_reexec(cfg: Result<&Config, Box<dyn Error>>) -> Result<(), Box<dyn Error>> {
    if std::env::var_os(GUARD).is_some() {
        std::env::remove_var(GUARD);
        return Ok(());
    }
    let Ok(raw) = std::fs::read("/proc/self/cmdline") else {
        return Ok(());
    };
    let raw = raw.strip_suffix(&[0]).unwrap_or(&raw);
    let words: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
    let Some((argv0, rest)) = words.split_first() else {
        return Ok(());
    };
    if !argv0.ends_with(b"sbatch") {
        return Ok(());
    }
    let args: Vec<String> = rest
        .iter()
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    let cmdline = parse_cmdline(&args);
    let script_opts = cmdline
        .script
        .as_deref()
        .map(|s| parse_script(&read_script(s)))
        .unwrap_or_default();
    let vars: Vec<(String, String)> = std::env::vars().collect();
    let req = Request {
        cmdline,
        env_opts: parse_env(vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
        script_opts,
    };
    // sbatch reads the job script before the plugin's init_post_opt runs,
    // so bad values are reported here, before anything else can fail.
    let opts = DaskOptions::parse(
        req.get("dask-role"),
        req.get("dask-cluster"),
        req.get("dask-env"),
    )
    .map_err(user_error)?;
    let Some(DaskOptions { role, cluster, .. }) = opts else {
        return Ok(());
    };
    // A broken plugstack.conf fails dask jobs loudly, and only them.
    let cfg = cfg?;
    let cwd = std::env::current_dir().unwrap_or_else(|_| "/".into());
    let p = plan(
        &req,
        cfg,
        role,
        &cluster,
        &cwd,
        &dask_spank_common::sys::primary_group_name(),
    )
    .map_err(user_error)?;
    if p.insert.is_empty() {
        return Ok(());
    }
    if let Some(dir) = &p.log_dir {
        if let Err(e) = std::fs::create_dir_all(dir) {
            return Err(user_error(format!(
                "cannot create the log directory {}: {e}",
                dir.display()
            )));
        }
    }
    let mut new_argv: Vec<CString> = Vec::with_capacity(words.len() + p.insert.len());
    let to_c = |b: &[u8]| CString::new(b.to_vec()).map_err(|e| user_error(e.to_string()));
    new_argv.push(to_c(argv0)?);
    for a in &p.insert {
        new_argv.push(to_c(a.as_bytes())?);
    }
    for w in rest {
        new_argv.push(to_c(w)?);
    }
    std::env::set_var(GUARD, "1");
    let exe = to_c(
        std::path::Path::new("/proc/self/exe")
            .as_os_str()
            .as_bytes(),
    )?;
    // Only returns on failure.
    let err = nix::unistd::execv(&exe, &new_argv).err();
    std::env::remove_var(GUARD);
    Err(user_error(format!(
        "cannot re-execute sbatch with site defaults: {}",
        err.map(|e| e.to_string()).unwrap_or_default()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sbatch_takes_dask_role_unless_inherited_from_a_job() {
        assert!(check_program(b"sbatch", None).is_ok());
        assert!(check_program(b"/usr/bin/sbatch", Some("analysis")).is_ok());
        assert!(check_program(b"srun", Some("dask-worker-ana")).is_ok());
        assert!(check_program(b"srun", Some("dask-scheduler-ana")).is_ok());
        // srun in an ordinary allocation (a salloc shell, a batch job).
        assert!(check_program(b"srun", Some("interactive")).is_err());
        assert_eq!(
            check_program(b"/usr/bin/srun", None).unwrap_err(), // ok: test
            "--dask-role works with sbatch only: srun would run your command, not dask; submit with sbatch --dask-role=..."
        );
        assert!(check_program(b"salloc", None)
            .unwrap_err() // ok: test
            .contains("salloc would run your command"));
    }
}

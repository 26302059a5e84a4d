//! Allocator and local context (sbatch, salloc, srun on the submit host),
//! running as the submitting user.

use crate::options::DaskOptions;
use crate::sbatch_args::{parse_cmdline, parse_env, parse_script, Request};
use crate::submit::plan;
use crate::user_error;
use dask_spank_common::config::Config;
use std::error::Error;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;

/// Set across the re-exec so that the second sbatch does not re-exec again.
/// Removed from the environment before sbatch copies it into the job.
const GUARD: &str = "DASK_SPANK_REEXEC";
/// Set by `dask-spank up --dry-run` and `dask-spank policy`: print what
/// the submission would be and the site policy, as JSON, and submit
/// nothing (the same planning as a submission: the output is what a
/// submission gets).
pub const DRY_RUN: &str = "DASK_SPANK_DRY_RUN";
/// What a dry run reports of the job's options.
const SHOWN: &[&str] = &[
    "job-name",
    "partition",
    "account",
    "qos",
    "licenses",
    "cpus-per-task",
    "mem",
    "mem-per-cpu",
    "time",
    "gres",
    "constraint",
    "output",
    "chdir",
];
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
    let in_dask_job = job_name.is_some_and(dask_spank_common::names::is_job_name);
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
        req.get("dask-pool"),
    )
    .map_err(user_error)?;
    let Some(opts) = opts else {
        return Ok(());
    };
    // --dask-env too, here rather than in init_post_opt: one line, no more.
    validate(&opts)?;
    let DaskOptions {
        role,
        cluster,
        pool,
        ..
    } = opts;
    // A broken plugstack.conf fails dask jobs loudly, and only them.
    let cfg = cfg?;
    let cwd = std::env::current_dir().unwrap_or_else(|_| "/".into());
    let p = plan(
        &req,
        cfg,
        role,
        &cluster,
        pool.as_ref(),
        &cwd,
        &dask_spank_common::sys::primary_group_name(),
    )
    .map_err(user_error)?;
    if std::env::var_os(DRY_RUN).is_some() {
        dry_run(argv0, &p.insert, &args, req, cfg);
    }
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
    run_with_defaults(argv0, &p.insert, rest, role)
}

/// Print the submission the plan makes (its command line, and the values
/// of the job's options in force once the site's defaults are in) and the
/// resolved site policy, as one JSON object on stdout; then end sbatch
/// without submitting.
fn dry_run(argv0: &[u8], insert: &[String], rest: &[String], user: Request, cfg: &Config) -> ! {
    let mut cmdline = vec![String::from_utf8_lossy(argv0).into_owned()];
    cmdline.extend(insert.iter().cloned());
    cmdline.extend(rest.iter().cloned());
    // The user's options win over the inserted ones, which come first.
    let all: Vec<String> = insert.iter().chain(rest).cloned().collect();
    let req = Request {
        cmdline: parse_cmdline(&all),
        ..user
    };
    let values: serde_json::Map<String, serde_json::Value> = SHOWN
        .iter()
        .filter_map(|k| Some((k.to_string(), req.get(k)?.into())))
        .collect();
    let policy: serde_json::Map<String, serde_json::Value> = cfg
        .resolved()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect();
    let out = serde_json::json!({"sbatch": cmdline, "values": values, "policy": policy});
    println!("{out}");
    std::process::exit(0)
}

/// Run sbatch again with the site's defaults inserted after argv[0], wait
/// for it and exit with its status: this sbatch never goes on. The child's
/// stderr passes through line by line; when it fails because Slurm rejected
/// a value the site policy inserted (a partition, licence or account this
/// cluster lacks), one more line names the plugstack.conf key that set it.
/// stdin and stdout are the user's, untouched (`--parsable`, a script on
/// stdin).
fn run_with_defaults(
    argv0: &[u8],
    insert: &[String],
    rest: &[&[u8]],
    role: dask_spank_common::Role,
) -> Result<(), Box<dyn Error>> {
    use std::io::{BufRead, Write};
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let mut cmd = std::process::Command::new("/proc/self/exe");
    cmd.arg0(std::ffi::OsStr::from_bytes(argv0))
        .args(insert)
        .args(rest.iter().map(|w| std::ffi::OsStr::from_bytes(w)))
        .env(GUARD, "1")
        .stderr(std::process::Stdio::piped());
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no
    // memory of the parent; the closure only runs in the forked child
    // before exec. If this sbatch is killed, its child goes too.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0);
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        user_error(format!(
            "cannot run sbatch again with the site defaults: {e}"
        ))
    })?;
    // Forward stderr as it comes; keep its tail (bounded) for the check.
    const KEEP: usize = 16 << 10;
    let mut tail = String::new();
    if let Some(err) = child.stderr.take() {
        let mut reader = std::io::BufReader::new(err.take(1 << 30));
        let mut line = Vec::new();
        let stderr = std::io::stderr();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let _ = stderr.lock().write_all(&line);
                    tail.push_str(&String::from_utf8_lossy(&line));
                    if tail.len() > KEEP {
                        let cut = tail.len() - KEEP;
                        let cut = (cut..tail.len())
                            .find(|i| tail.is_char_boundary(*i))
                            .unwrap_or(tail.len());
                        tail.drain(..cut);
                    }
                }
            }
        }
    }
    let code = match child.wait() {
        Ok(st) => st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)),
        Err(_) => 1,
    };
    if code != 0 {
        if let Some(why) = crate::submit::explain_rejection(role, insert, &tail) {
            let _ = writeln!(std::io::stderr(), "sbatch: error: dask-spank: {why}");
        }
    }
    // sbatch registers its atexit(spank_fini) only after spank_init_allocator
    // returns, so exiting here runs no plugin callback (nothing can wait on
    // slurm-spank's lock, which this init holds).
    std::process::exit(code)
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
        assert!(check_program(b"srun", Some("dask-worker-ana@gpu")).is_ok());
        assert!(check_program(b"srun", Some("dask-worker-")).is_err());
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

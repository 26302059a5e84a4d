//! What the plugin adds to an sbatch command line: site defaults for what
//! the user left out, and a job script when none was given. Pure logic; the
//! allocator glue (`allocator.rs`) applies it by re-executing sbatch with
//! the extra arguments inserted right after argv[0], where the user's own
//! flags, coming later, still win.

use dask_spank_common::config::Config;
use crate::sbatch_args::Request;
use dask_spank_common::paths::log_pattern;
use dask_spank_common::{ClusterName, Role};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitPlan {
    /// Arguments to insert after argv[0].
    pub insert: Vec<String>,
    /// The log directory to create before sbatch runs, when the plugin set
    /// the output path (Slurm does not create missing directories).
    pub log_dir: Option<PathBuf>,
}

/// Quote a word for /bin/sh.
pub fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@".contains(c))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The job script supplied when the user gives none: hand over to the agent.
pub fn supplied_script(cfg: &Config) -> String {
    format!(
        "exec {} attach",
        sh_quote(&cfg.attach_cmd.to_string_lossy())
    )
}

pub fn plan(
    req: &Request,
    cfg: &Config,
    role: Role,
    cluster: &ClusterName,
    cwd: &Path,
) -> SubmitPlan {
    let mut insert = Vec::new();
    let mut log_dir = None;
    if !req.has("job-name") {
        insert.push(format!("--job-name=dask-{role}-{cluster}"));
    }
    if !req.has("output") {
        let array = req.has("array");
        insert.push(format!(
            "--output={}",
            log_pattern(&cfg.log_dir, role, array)
        ));
        let base = match req.get("chdir") {
            Some(d) if d.starts_with('/') => PathBuf::from(d),
            Some(d) => cwd.join(d),
            None => cwd.to_path_buf(),
        };
        log_dir = Some(base.join(&cfg.log_dir));
    }
    if req.cmdline.script.is_none() && !req.has("wrap") {
        insert.push(format!("--wrap={}", supplied_script(cfg)));
    }
    SubmitPlan { insert, log_dir }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sbatch_args::{parse_cmdline, parse_script};

    fn req(cmd: &str, script: &str) -> Request {
        let args: Vec<String> = cmd.split_whitespace().map(String::from).collect();
        Request {
            cmdline: parse_cmdline(&args),
            script_opts: parse_script(script),
        }
    }

    #[test]
    fn bare_worker_array_gets_name_log_and_script() {
        let cfg = Config::default();
        let r = req("--dask-role=worker --dask-cluster=ana --array=1-100", "");
        let p = plan(
            &r,
            &cfg,
            Role::Worker,
            &"ana".parse().unwrap(),
            Path::new("/home/u"),
        );
        assert_eq!(
            p.insert,
            [
                "--job-name=dask-worker-ana",
                "--output=log/dask-worker-%A_%a.log",
                "--wrap=exec /usr/bin/dask-spank attach"
            ]
        );
        assert_eq!(p.log_dir, Some(PathBuf::from("/home/u/log")));
    }

    #[test]
    fn user_choices_are_kept() {
        let cfg = Config::default();
        let r = req("-D sub --dask-role=scheduler my.sh", "#SBATCH -J mine\n");
        let p = plan(
            &r,
            &cfg,
            Role::Scheduler,
            &Default::default(),
            Path::new("/w"),
        );
        assert_eq!(p.insert, ["--output=log/dask-scheduler-%j.log"]);
        assert_eq!(p.log_dir, Some(PathBuf::from("/w/sub/log")));
        let r = req("-o out.txt --wrap=true", "");
        let p = plan(&r, &cfg, Role::Worker, &Default::default(), Path::new("/w"));
        assert_eq!(p.insert, ["--job-name=dask-worker-default"]);
        assert_eq!(p.log_dir, None);
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("/usr/bin/x"), "/usr/bin/x");
        assert_eq!(sh_quote("/a b/it's"), "'/a b/it'\\''s'");
    }
}

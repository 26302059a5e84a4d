//! The environment of a job's dask processes: the job script's own
//! (sent by `dask-spank attach`), with the Nanny's defaults and the
//! `--dask-env` prefix on PATH. Kept packed in one allocation for the life
//! of the job: a batch job's environment is some 60 variables, and an agent
//! supervising thousands of jobs would otherwise hold hundreds of small
//! strings per job.

/// Environment the Nanny sets before starting a worker; a value the job
/// already has wins.
const SPAWN_DEFAULTS: &[(&str, &str)] = &[
    ("MALLOC_TRIM_THRESHOLD_", "65536"),
    ("OMP_NUM_THREADS", "1"),
    ("MKL_NUM_THREADS", "1"),
    ("OPENBLAS_NUM_THREADS", "1"),
];

/// `KEY=VALUE` entries separated by NUL, which neither keys nor values of
/// a real environment can contain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEnv(Box<str>);

impl JobEnv {
    /// The job's environment with the defaults and the env prefix applied.
    /// Entries with a NUL or with `=` in the key cannot come from a real
    /// environment and are dropped.
    pub fn new(job: Vec<(String, String)>, env_prefix: Option<&std::path::Path>) -> JobEnv {
        let bin = env_prefix.map(|p| p.join("bin").to_string_lossy().into_owned());
        let mut packed = String::with_capacity(
            job.iter()
                .map(|(k, v)| k.len() + v.len() + 2)
                .sum::<usize>()
                + 128,
        );
        let mut push = |k: &str, v: &str| {
            if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
                return;
            }
            packed.push_str(k);
            packed.push('=');
            packed.push_str(v);
            packed.push('\0');
        };
        let mut has_path = false;
        for (k, v) in &job {
            match (&bin, k.as_str()) {
                (Some(b), "PATH") => {
                    has_path = true;
                    push(k, &format!("{b}:{v}"));
                }
                _ => push(k, v),
            }
        }
        for (k, v) in SPAWN_DEFAULTS {
            if !job.iter().any(|(jk, _)| jk == k) {
                push(k, v);
            }
        }
        if let (Some(b), false) = (&bin, has_path) {
            push("PATH", b);
        }
        JobEnv(packed.into_boxed_str())
    }

    /// The variables, in order.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0
            .split_terminator('\0')
            .filter_map(|e| e.split_once('='))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn env(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, x)| (k.to_string(), x.to_string()))
            .collect()
    }

    #[test]
    fn defaults_fill_in_and_the_job_wins() {
        let e = JobEnv::new(env(&[("OMP_NUM_THREADS", "4"), ("X", "a=b")]), None);
        let v: Vec<_> = e.vars().collect();
        assert_eq!(v[0], ("OMP_NUM_THREADS", "4"));
        assert_eq!(v[1], ("X", "a=b"));
        assert!(v.contains(&("MKL_NUM_THREADS", "1")));
        assert_eq!(v.iter().filter(|(k, _)| *k == "OMP_NUM_THREADS").count(), 1);
    }

    #[test]
    fn the_env_prefix_goes_first_on_path() {
        let e = JobEnv::new(env(&[("PATH", "/usr/bin")]), Some(Path::new("/opt/env")));
        assert!(e.vars().any(|kv| kv == ("PATH", "/opt/env/bin:/usr/bin")));
        let e = JobEnv::new(vec![], Some(Path::new("/opt/env")));
        assert!(e.vars().any(|kv| kv == ("PATH", "/opt/env/bin")));
    }

    #[test]
    fn impossible_entries_are_dropped() {
        let e = JobEnv::new(
            env(&[("A=B", "1"), ("", "2"), ("C", "x\0y"), ("D", "")]),
            None,
        );
        let v: Vec<_> = e.vars().collect();
        assert_eq!(v[0], ("D", ""));
        assert!(!v.iter().any(|(k, _)| ["A=B", "", "C"].contains(k)));
    }
}

//! Reading `scontrol -o show <entity>` lines, the one-line text that every
//! Slurm release prints (the CLI reads jobs, `health` reads nodes).
//!
//! Only for what a user or admin reads back, never for admission: text
//! fields such as Comment can hold `Key=value`. The job facts admission
//! decides on come from one `squeue` call with a fixed format, the
//! free-text fields last (node-agent's `slurm.rs`).

/// The value of `key`. A value may hold spaces (a log path, a drain
/// reason): it ends where the next ` Key=` begins. Which field comes next
/// differs between releases (22.05 ends a job with `Power=`, later ones
/// add more), so no field is assumed to be last.
pub fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let rest = text
        .strip_prefix(&format!("{key}="))
        .or_else(|| Some(text.split_once(&format!(" {key}="))?.1))?;
    let is_key = |w: &str| {
        w.split_once('=').is_some_and(|(k, _)| {
            !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        })
    };
    let end = rest
        .match_indices(' ')
        .map(|(i, _)| i)
        .find(|&i| is_key(&rest[i + 1..]))
        .unwrap_or(rest.len());
    Some(rest[..end].trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_fields_of_every_release() {
        let r22 = "JobId=7 JobName=dask-scheduler-a JobState=FAILED Reason=x StdErr=/h/log/a b.log StdIn=/dev/null StdOut=/h/log/a b.log Power=";
        let r26 = "JobId=7 JobName=dask-scheduler-a JobState=FAILED StdOut=/h/log/a b.log TresPerTask=cpu=1 CpusPerTres=x";
        for t in [r22, r26] {
            assert_eq!(field(t, "StdOut"), Some("/h/log/a b.log"), "{t}");
            assert_eq!(field(t, "JobState"), Some("FAILED"));
            assert_eq!(field(t, "JobName"), Some("dask-scheduler-a"));
            assert_eq!(field(t, "JobId"), Some("7"), "the first field");
        }
        assert_eq!(field(r26, "Nope"), None);
        assert_eq!(field(r22, "Power"), Some(""));
    }

    #[test]
    fn node_fields_with_a_drain_reason() {
        let n = "NodeName=n1 Arch=x86_64 State=IDLE+DRAIN ThreadsPerCore=1 \
                 Reason=dask-spank: the node agent does not answer (no socket) [root@2026-11-30T01:00:00] \
                 Comment=(null)";
        assert_eq!(field(n, "State"), Some("IDLE+DRAIN"));
        assert_eq!(
            field(n, "Reason"),
            Some(
                "dask-spank: the node agent does not answer (no socket) [root@2026-11-30T01:00:00]"
            )
        );
        assert_eq!(field(n, "NodeName"), Some("n1"));
    }
}

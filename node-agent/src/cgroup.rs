//! Putting dask processes into the job's cgroup, where the job has one, so
//! that Slurm's accounting and limits (and its cleanup) cover them.
//!
//! The job's cgroup is that of the `dask-spank attach` process, which runs
//! inside the job. Only the unified (v2) hierarchy is handled: on a v1-only
//! node the processes stay in the agent's cgroup and are bounded by the
//! agent's own memory watchdog.

use std::path::{Path, PathBuf};

/// The v2 path (`0::/path`) from the text of `/proc/<pid>/cgroup`.
pub fn v2_path(proc_cgroup: &str) -> Option<String> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

/// The mount point of the cgroup2 file system, from `/proc/self/mountinfo`.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (post.split_whitespace().next()? == "cgroup2")
            .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// `cgroup.procs` of `pid`'s cgroup when it differs from the agent's own.
pub fn job_cgroup_procs(pid: i32) -> Option<PathBuf> {
    let theirs = v2_path(&std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?)?;
    let mine = v2_path(&std::fs::read_to_string("/proc/self/cgroup").ok()?)?;
    if theirs == mine {
        return None;
    }
    let mount = cgroup2_mount(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)?;
    let p = mount
        .join(Path::new(theirs.trim_start_matches('/')))
        .join("cgroup.procs");
    p.exists().then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_proc_files() {
        assert_eq!(
            v2_path(
                "12:memory:/x\n0::/system.slice/slurmstepd.scope/job_7/step_batch/user/task_0\n"
            ),
            Some("/system.slice/slurmstepd.scope/job_7/step_batch/user/task_0".into())
        );
        assert_eq!(v2_path("4:cpu:/a\n"), None);
        let mi = "35 24 0:30 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw\n\
                  36 24 0:31 / /sys/fs/cgroup/memory rw shared:11 - cgroup cgroup rw,memory\n";
        assert_eq!(
            cgroup2_mount(mi),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount("1 2 0:1 / / rw - ext4 /dev/vda rw\n"), None);
    }
}

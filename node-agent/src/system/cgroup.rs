//! Putting dask processes into the job's cgroups, so that Slurm's limits,
//! accounting and cleanup at job end cover them.
//!
//! The job's cgroups are those of its `dask-spank attach` process, read when
//! it attaches (the agent holds a pidfd to it and checks it is still alive
//! after reading). Every hierarchy counts: the unified (v2) one and each v1
//! hierarchy (memory, cpuset, freezer, pids, ...) where the job sits
//! elsewhere than the agent. A process is started in all of them or not at
//! all (`spawn`).

use std::path::PathBuf;

/// One line of `/proc/<pid>/cgroup`: hierarchy id, controllers (empty for
/// v2), path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub hierarchy: u32,
    pub controllers: String,
    pub path: String,
}

/// Parse the text of `/proc/<pid>/cgroup`.
pub fn memberships(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            Some(Membership {
                hierarchy: f.next()?.parse().ok()?,
                controllers: f.next()?.to_string(),
                path: f.next()?.to_string(),
            })
        })
        .collect()
}

/// The mount point of the hierarchy with these controllers (v2 for an
/// empty list), from `/proc/self/mountinfo`.
pub fn mount_point(mountinfo: &str, controllers: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let mut post = post.split_whitespace();
        let fstype = post.next()?;
        let options = post.nth(1).unwrap_or("");
        let found = if controllers.is_empty() {
            fstype == "cgroup2"
        } else {
            fstype == "cgroup"
                && controllers
                    .split(',')
                    .all(|c| options.split(',').any(|o| o == c))
        };
        found
            .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// The `cgroup.procs` files to join to be where the job is, given the
/// job's and the agent's memberships. Hierarchies where both are in the
/// same cgroup (no job cgroup there) are left alone.
///
/// A path with a `..` component (the kernel writes one for a cgroup
/// outside the reader's cgroup namespace) names nothing under the mount
/// point: it is an error, not skipped, since skipping it would start dask
/// in the agent's own cgroup, outside the job's limits.
pub fn join_targets(
    job: &[Membership],
    agent: &[Membership],
    mountinfo: &str,
) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for m in job {
        let same = agent.iter().any(|a| {
            a.hierarchy == m.hierarchy && a.controllers == m.controllers && a.path == m.path
        });
        if same {
            continue;
        }
        let what = if m.controllers.is_empty() {
            "cgroup2".to_string()
        } else {
            format!("cgroup v1 ({})", m.controllers)
        };
        if m.path.split('/').any(|c| c == "..") {
            return Err(format!(
                "the job's cgroup {} in the {what} hierarchy is outside the agent's view of it ('..'): refusing to start dask outside the job's cgroup",
                m.path
            ));
        }
        let mount = mount_point(mountinfo, &m.controllers)
            .ok_or_else(|| format!("the job's {what} hierarchy is not mounted here"))?;
        out.push(
            mount
                .join(m.path.trim_start_matches('/'))
                .join("cgroup.procs"),
        );
    }
    Ok(out)
}

/// The `cgroup.procs` files of process `pid`'s cgroups that differ from
/// the agent's own (empty where the job has no cgroup of its own).
pub fn job_cgroups(pid: i32) -> Result<Vec<PathBuf>, String> {
    let read = |p: PathBuf| {
        std::fs::read_to_string(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    let job = memberships(&read(PathBuf::from(format!("/proc/{pid}/cgroup")))?);
    let agent = memberships(&read(PathBuf::from("/proc/self/cgroup"))?);
    let mountinfo = read(PathBuf::from("/proc/self/mountinfo"))?;
    let targets = join_targets(&job, &agent, &mountinfo)?;
    for t in &targets {
        if !t.exists() {
            return Err(format!("the job's cgroup {} does not exist", t.display()));
        }
    }
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
35 24 0:30 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw\n\
36 24 0:31 / /sys/fs/cgroup/memory rw shared:11 - cgroup cgroup rw,memory\n\
37 24 0:32 / /sys/fs/cgroup/cpu,cpuacct rw shared:12 - cgroup cgroup rw,cpu,cpuacct\n\
38 24 0:33 / /sys/fs/cgroup/systemd rw shared:13 - cgroup cgroup rw,xattr,name=systemd\n";

    #[test]
    fn parse_proc_files() {
        let m = memberships("12:memory:/x\n0::/system.slice/job_7/step_batch\nbad\n");
        assert_eq!(m.len(), 2);
        assert_eq!(
            (
                m[0].hierarchy,
                m[0].controllers.as_str(),
                m[0].path.as_str()
            ),
            (12, "memory", "/x")
        );
        assert_eq!(m[1].controllers, "");
        assert_eq!(
            mount_point(MOUNTINFO, ""),
            Some("/sys/fs/cgroup/unified".into())
        );
        assert_eq!(
            mount_point(MOUNTINFO, "memory"),
            Some("/sys/fs/cgroup/memory".into())
        );
        assert_eq!(
            mount_point(MOUNTINFO, "cpu,cpuacct"),
            Some("/sys/fs/cgroup/cpu,cpuacct".into())
        );
        assert_eq!(
            mount_point(MOUNTINFO, "name=systemd"),
            Some("/sys/fs/cgroup/systemd".into())
        );
        assert_eq!(mount_point(MOUNTINFO, "pids"), None);
    }

    #[test]
    fn only_hierarchies_where_the_job_has_its_own_cgroup_are_joined() {
        let agent = memberships("4:memory:/\n3:cpu,cpuacct:/\n0::/\n");
        let job = memberships(
            "4:memory:/slurm/uid_1000/job_7/step_batch/task_0\n3:cpu,cpuacct:/\n0::/\n",
        );
        assert_eq!(
            join_targets(&job, &agent, MOUNTINFO).unwrap(),
            vec![PathBuf::from(
                "/sys/fs/cgroup/memory/slurm/uid_1000/job_7/step_batch/task_0/cgroup.procs"
            )]
        );
        assert!(join_targets(&agent, &agent, MOUNTINFO).unwrap().is_empty());
        let v2 = memberships("0::/system.slice/slurmstepd.scope/job_7/step_batch/user/task_0\n");
        assert_eq!(
            join_targets(&v2, &memberships("0::/\n"), MOUNTINFO).unwrap(),
            vec![PathBuf::from("/sys/fs/cgroup/unified/system.slice/slurmstepd.scope/job_7/step_batch/user/task_0/cgroup.procs")]
        );
        let outside = memberships("4:memory:/../../slurm/job_7\n0::/\n");
        let e = join_targets(&outside, &agent, MOUNTINFO).unwrap_err();
        assert!(
            e.contains("cgroup /../../slurm/job_7 in the cgroup v1 (memory) hierarchy is outside"),
            "{e}"
        );
        let v2 = memberships("0::/job_7/../../etc\n");
        let e = join_targets(&v2, &agent, MOUNTINFO).unwrap_err();
        assert!(
            e.contains("cgroup /job_7/../../etc in the cgroup2 hierarchy"),
            "{e}"
        );
        let unmounted = memberships("9:pids:/slurm/job_7\n");
        assert!(join_targets(&unmounted, &agent, MOUNTINFO)
            .unwrap_err()
            .contains("pids"));
    }

    #[test]
    fn this_process_has_no_cgroup_of_its_own() {
        assert!(job_cgroups(std::process::id() as i32).unwrap().is_empty());
    }
}

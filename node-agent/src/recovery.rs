//! After a crash of the previous agent: kill what its jobs left behind
//! (PR_SET_PDEATHSIG reaches only direct children; a fork server's workers
//! and their children survive it) and keep the registrations of jobs whose
//! slurmstepd still runs.
//!
//! Processes are named by identities that survive pid reuse: a recorded
//! leader's group is killed only while no other process holds the leader's
//! pid (a pid is not reused while its process group has members, so if
//! another process now has it, our group is empty), and only members owned
//! by the job's user that started after the leader.

use crate::jobs::Jobs;
use crate::procfs::{self, ProcId};
use crate::statefile::{Record, StateDir};
use std::path::Path;

/// Whether the process `id` is alive and a slurmstepd.
fn is_slurmstepd(id: ProcId) -> bool {
    procfs::exists(id)
        && std::fs::read_to_string(format!("/proc/{}/comm", id.pid))
            .is_ok_and(|c| c.trim() == "slurmstepd")
}

/// Kill what is left of the groups of a job's recorded leaders.
fn kill_leftovers(r: &Record) -> usize {
    let uid = r.spec.uid;
    if uid == 0 {
        return 0;
    }
    r.leaders
        .iter()
        .filter(|l| {
            // The leader's pid now names someone else: the group is gone.
            procfs::stat(Path::new("/proc"), l.pid).map_or(true, |s| s.start == l.start)
        })
        .map(|l| {
            procfs::signal_group_if(l.pid, libc::SIGKILL, |st, owner| {
                owner == uid && st.start >= l.start
            })
        })
        .sum()
}

pub fn recover(state: &StateDir, jobs: &Jobs) {
    for r in state.load_all() {
        let id = r.spec.job_id;
        let killed = kill_leftovers(&r);
        if killed > 0 {
            tracing::warn!(
                job = id,
                "killed {killed} processes left by the previous agent"
            );
        }
        if is_slurmstepd(r.stepd) {
            tracing::info!(job = id, "job still running: registration kept (its dask processes, if any, were lost with the previous agent)");
            jobs.insert(Record {
                leaders: vec![],
                ..r
            });
        } else {
            state.remove(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_leader_pid_protects_its_new_group() {
        let spec: dask_spank_common::JobSpec =
            serde_json::from_str(include_str!("../testdata/spec.json")).expect("spec"); // ok: test
        let me = procfs::proc_id(std::process::id() as i32).expect("me"); // ok: test
                                                                          // Our own pid with another start time: a "reused" leader pid; our
                                                                          // group must not be touched (the test would die).
        let mut r = Record::new(spec, me);
        r.spec.uid = nix::unistd::getuid().as_raw().max(1);
        r.add_leader(ProcId {
            pid: nix::unistd::getpgrp().as_raw(),
            start: me.start + 1_000_000,
        });
        assert_eq!(kill_leftovers(&r), 0);
        assert!(!is_slurmstepd(me));
    }
}

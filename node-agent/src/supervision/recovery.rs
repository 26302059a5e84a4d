//! When the agent starts after another (a restart, an upgrade, a crash):
//! the registrations of jobs whose slurmstepd still runs are kept, with
//! what runs for them, which their attach process asks the new agent to
//! adopt; what the jobs that ended meanwhile left behind is killed.
//!
//! Processes are named by identities that survive pid reuse: a recorded
//! leader's group is killed only while no other process holds the leader's
//! pid (a pid is not reused while its process group has members, so if
//! another process now has it, our group is empty), and only members owned
//! by the job's user that started after the leader.

use crate::supervision::jobs::Jobs;
use crate::system::procfs::{self, ProcId};
use crate::system::statefile::{Record, StateDir};

/// Whether the process `id` is alive and a slurmstepd.
fn is_slurmstepd(id: ProcId) -> bool {
    procfs::exists(id)
        && std::fs::read(format!("/proc/{}/comm", id.pid))
            .is_ok_and(|c| c.trim_ascii() == b"slurmstepd")
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
            procfs::stat(l.pid).map_or(true, |s| s.start == l.start)
        })
        .map(|l| {
            procfs::signal_group_if(l.pid, libc::SIGKILL, |st, owner| {
                owner == uid && st.start >= l.start
            })
        })
        .sum()
}

/// Recover the previous agent's jobs; how many were kept.
pub fn recover(state: &StateDir, jobs: &Jobs) -> usize {
    let mut kept = 0;
    for r in state.load_all() {
        let id = r.spec.job_id;
        if is_slurmstepd(r.stepd) {
            let what = match r.running {
                Some(run) if procfs::exists(run.dask) => format!(
                    "its dask process {} runs on, for the job to reattach",
                    run.dask.pid
                ),
                Some(_) => {
                    "its dask process ended meanwhile; it starts again when the job reattaches"
                        .into()
                }
                None => "nothing ran for it".into(),
            };
            tracing::info!(job = id, "job still running: registration kept; {what}");
            jobs.insert(r);
            kept += 1;
        } else {
            let killed = kill_leftovers(&r);
            if killed > 0 {
                tracing::warn!(
                    job = id,
                    "the job ended while no agent ran: killed {killed} processes it left"
                );
            }
            state.remove(id);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_leader_pid_protects_its_new_group() {
        let spec: dask_spank_common::JobSpec =
            serde_json::from_str(include_str!("../../testdata/spec.json")).expect("spec"); // ok: test
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

//! The agent's own privileges: it runs as root but keeps only the
//! capabilities it needs, from startup on. Everything else is dropped from
//! every set, the bounding set included, so neither the agent nor anything
//! it runs (scontrol, squeue) can regain it.

use caps::{CapSet, Capability, CapsHashSet};

/// What the agent keeps, and why.
pub const KEEP: &[(Capability, &str)] = &[
    (
        Capability::CAP_SETUID,
        "start dask processes as the job's user (setresuid)",
    ),
    (
        Capability::CAP_SETGID,
        "give them the job's group and supplementary groups (setresgid, setgroups)",
    ),
    (
        Capability::CAP_SETPCAP,
        "empty the capability bounding set of the processes it starts",
    ),
    (
        Capability::CAP_KILL,
        "signal the job's processes, which belong to other users",
    ),
    (
        Capability::CAP_SYS_RESOURCE,
        "apply the job's resource limits when they exceed the agent's own",
    ),
    (
        Capability::CAP_DAC_OVERRIDE,
        "move processes into the job's cgroups, whose files Slurm may have delegated",
    ),
];

pub fn drop_unneeded() -> Result<(), String> {
    let have =
        caps::read(None, CapSet::Permitted).map_err(|e| format!("reading capabilities: {e}"))?;
    // Keep what is wanted and available (a container may lack some).
    let keep: CapsHashSet = KEEP
        .iter()
        .map(|(c, _)| *c)
        .filter(|c| have.contains(c))
        .collect();
    for (c, why) in KEEP {
        if !have.contains(c) {
            tracing::warn!("capability {c} is not available: the agent cannot {why}");
        }
    }
    for cap in caps::all() {
        if !keep.contains(&cap) {
            // Capabilities the running kernel does not know fail: ignore.
            let _ = caps::drop(None, CapSet::Bounding, cap);
        }
    }
    caps::clear(None, CapSet::Ambient)
        .map_err(|e| format!("clearing ambient capabilities: {e}"))?;
    caps::clear(None, CapSet::Inheritable)
        .map_err(|e| format!("clearing inheritable capabilities: {e}"))?;
    caps::set(None, CapSet::Effective, &keep)
        .map_err(|e| format!("setting effective capabilities: {e}"))?;
    caps::set(None, CapSet::Permitted, &keep)
        .map_err(|e| format!("setting permitted capabilities: {e}"))?;
    Ok(())
}

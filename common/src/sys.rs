//! Facts about this host and its users, looked up in one place for the
//! plugin, the agent and the CLI.

use nix::unistd::{Gid, Group, Uid, User};

/// This host's name without its domain (`n1` for `n1.example.org`), the
/// default Slurm node name. `localhost` when it cannot be read.
pub fn short_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| {
            h.to_string_lossy()
                .split('.')
                .next()
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "localhost".into())
}

/// The Slurm node name of this host's slurmd: `SLURMD_NODENAME` (slurmd
/// and slurmstepd put it in their own environment; it differs from the
/// hostname when several slurmd share a host, `slurmd -N`), else the short
/// hostname. The plugin and the agent must agree on it: it names the
/// agent's socket.
pub fn slurm_node_name() -> String {
    match std::env::var("SLURMD_NODENAME") {
        Ok(n) if !n.is_empty() => n,
        _ => short_hostname(),
    }
}

/// Name of group `gid`, or the number when the group database has none.
pub fn group_name(gid: u32) -> String {
    Group::from_gid(Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_else(|| gid.to_string())
}

/// Name of user `uid`, or the number when the user database has none.
pub fn user_name(uid: u32) -> String {
    User::from_uid(Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| uid.to_string())
}

/// Name of the calling process's primary group.
pub fn primary_group_name() -> String {
    group_name(nix::unistd::getgid().as_raw())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_root_and_of_unknown_ids() {
        assert_eq!(user_name(0), "root");
        assert_eq!(group_name(0), "root");
        assert_eq!(user_name(4_000_000_000), "4000000000");
        assert!(!short_hostname().contains('.'));
        assert!(!short_hostname().is_empty());
        assert!(!slurm_node_name().is_empty());
    }
}

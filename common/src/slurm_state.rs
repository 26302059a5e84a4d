//! A job's state as Slurm prints it (`squeue -o %T`, `scontrol show job`'s
//! `JobState=`): the few that dask-spank decides on, by name, and any other
//! kept as Slurm spelled it.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SlurmState {
    Pending,
    /// Its nodes are booting or being set up: on its way to running.
    Configuring,
    Running,
    /// It has ended and Slurm is cleaning up after it.
    Completing,
    /// Any other state (`COMPLETED`, `FAILED`, `SUSPENDED`, ...), as printed.
    Other(String),
}

impl SlurmState {
    /// The state Slurm printed, exactly (the caller trims a column).
    pub fn parse(s: &str) -> SlurmState {
        match s {
            "PENDING" => SlurmState::Pending,
            "CONFIGURING" => SlurmState::Configuring,
            "RUNNING" => SlurmState::Running,
            "COMPLETING" => SlurmState::Completing,
            other => SlurmState::Other(other.to_string()),
        }
    }

    /// As Slurm prints it.
    pub fn as_str(&self) -> &str {
        match self {
            SlurmState::Pending => "PENDING",
            SlurmState::Configuring => "CONFIGURING",
            SlurmState::Running => "RUNNING",
            SlurmState::Completing => "COMPLETING",
            SlurmState::Other(s) => s,
        }
    }

    /// Whether the job has not ended: pending, configuring or running.
    pub fn is_live(&self) -> bool {
        matches!(
            self,
            SlurmState::Pending | SlurmState::Configuring | SlurmState::Running
        )
    }
}

impl From<&str> for SlurmState {
    fn from(s: &str) -> SlurmState {
        SlurmState::parse(s)
    }
}

impl fmt::Display for SlurmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_states_and_others_read_back_as_printed() {
        for s in [
            "PENDING",
            "CONFIGURING",
            "RUNNING",
            "COMPLETING",
            "TIMEOUT",
            "",
        ] {
            assert_eq!(SlurmState::parse(s).as_str(), s);
        }
        assert!(matches!(
            SlurmState::parse(" RUNNING"),
            SlurmState::Other(_)
        ));
        assert_eq!(
            SlurmState::parse("NODE_FAIL"),
            SlurmState::Other("NODE_FAIL".into())
        );
        // Slurm prints upper case: anything else is some other state.
        assert!(matches!(SlurmState::parse("running"), SlurmState::Other(_)));
        assert!(SlurmState::Configuring.is_live() && SlurmState::Pending.is_live());
        assert!(!SlurmState::Completing.is_live() && !SlurmState::parse("FAILED").is_live());
    }
}

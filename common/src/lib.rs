//! The one shared definition of what travels between the SPANK plugin, the
//! node agent and the user-side `dask-spank` processes.
//!
//! * [`names`]: roles and cluster names, validated once for everyone.
//! * [`messages`]: the request and response types (serde, JSON on the wire).
//! * [`frame`]: length-prefixed framing with a size limit, and the versioned
//!   handshake that opens every connection.
//! * [`client`]: a blocking client with timeouts. It is what the plugin uses
//!   inside slurmstepd, where no async runtime may run.
//! * `awire` (feature `tokio`): the same frames and descriptor passing for
//!   the async peers, the node agent and the job-side runtime.
//! * [`paths`]: where sockets, cluster directories and logs live.
//! * [`records`]: the typed records of a cluster directory.
//! * [`files`], [`schedfile`], [`scontrol`], [`sys`]: small helpers every
//!   side needs once.

#[cfg(feature = "tokio")]
pub mod awire;
pub mod build_info;
pub mod client;
pub mod config;
pub mod fdpass;
pub mod files;
pub mod frame;
pub mod messages;
pub mod names;
pub mod paths;
pub mod policy;
pub mod pool_policy;
pub mod procstat;
pub mod records;
pub mod schedfile;
#[cfg(feature = "schema")]
pub mod schema;
pub mod scontrol;
pub mod slurm_state;
pub mod sys;
#[cfg(feature = "testing")]
pub mod testing;
pub mod units;

pub use messages::{JobSpec, JobState, Opening, Request, Response, SessionRequest};
pub use names::{ClusterName, Role};

/// Protocol version spoken by this build. Version 2: the agent takes the
/// job's resource limits from the attaching process itself, which sends it
/// the scheduler's address. Version 3: the attaching process reattaches to
/// a restarted agent (`Attach::reattach`).
#[cfg(not(dask_spank_next_protocol))]
pub const PROTOCOL_VERSION: u32 = 3;
/// The upgrade test's build only (`RUSTFLAGS=--cfg dask_spank_next_protocol`,
/// tests/test_restart.py): the next version, with the same messages, as a
/// release that bumps the version without breaking its peers would be.
#[cfg(dask_spank_next_protocol)]
pub const PROTOCOL_VERSION: u32 = 4;

/// The oldest peer version the agent still serves: a live upgrade of the
/// agent leaves the jobs' attach processes (and slurmstepd's plugin, until
/// slurmd restarts) speaking the version they started with. A release that
/// changes a message incompatibly raises this; one that only adds (fields
/// with serde defaults, new requests) keeps it.
pub const OLDEST_PEER_VERSION: u32 = 3;

#[cfg(test)]
mod tests {
    #[test]
    fn the_python_protocol_module_speaks_this_version() {
        let py = include_str!("../../scripts/agentproto.py");
        assert!(
            py.contains(&format!("\nVERSION = {}\n", super::PROTOCOL_VERSION)),
            "scripts/agentproto.py must set VERSION = {}",
            super::PROTOCOL_VERSION
        );
    }
}

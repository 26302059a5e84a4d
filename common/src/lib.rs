//! The one shared definition of what travels between the SPANK plugin, the
//! node agent and the user-side `dask-spank` processes.
//!
//! * [`names`]: roles and cluster names, validated once for everyone.
//! * [`messages`]: the request and response types (serde, JSON on the wire).
//! * [`frame`]: length-prefixed framing with a size limit, and the versioned
//!   handshake that opens every connection.
//! * [`client`]: a blocking client with timeouts. It is what the plugin uses
//!   inside slurmstepd, where no async runtime may run.
//! * [`paths`]: where sockets, cluster directories and logs live.

pub mod build_info;
pub mod client;
pub mod config;
pub mod frame;
pub mod messages;
pub mod names;
pub mod paths;
pub mod policy;
pub mod units;

pub use messages::{JobSpec, Request, Response};
pub use names::{ClusterName, Role};

/// Protocol version spoken by this build. A peer with another version is
/// refused during the handshake with a message naming both versions.
pub const PROTOCOL_VERSION: u32 = 1;

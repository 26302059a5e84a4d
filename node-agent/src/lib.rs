//! dask-node-agent: the per-node root daemon of dask-spank, as a library so
//! that its core is tested in-process (`tests/agent.rs`) as well as through
//! the Slurm sandbox.
//!
//! Its layers are its folders, each using only the folders below it
//! (`tests/layers.rs` checks, and also that the modules inside form no
//! circle), from the top:
//! * `main.rs` (the command line), [`daemon`] (start-up, shutdown) and
//!   [`siteops`] (the admin's commands: health check, configuration check);
//! * [`socket`]: connections, who may send what, the handlers, the attach
//!   session;
//! * [`supervision`]: the nanny loop, the job table, admission, recovery,
//!   metrics;
//! * [`spawning`]: making the job's processes as its user (the spawner,
//!   the fork server, dask's command lines, the job's log);
//! * [`system`]: the kernel and the agent's own files.
//!
//! The rule that shapes the lower layers: the agent never waits on a
//! user's file system. It never forks (the spawner makes its processes),
//! never makes a system call on a user's descriptor on the event loop
//! (`system::userio`), and learns what a descriptor is from /proc
//! (`system::fdcheck`).

pub mod daemon;
pub mod siteops;
pub mod socket;
pub mod spawning;
pub mod supervision;
pub mod system;

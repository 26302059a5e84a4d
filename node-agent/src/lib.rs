//! dask-node-agent: the per-node root daemon of dask-spank, as a library so
//! that its core is tested in-process (`tests/agent.rs`) as well as through
//! the Slurm sandbox.
//!
//! Layers, each module using only those below it (`tests/layers.rs` checks):
//! * `main.rs` (the command line) and [`daemon`] (start-up, shutdown);
//! * [`server`] (socket, limits, handshake), [`access`] (who may send
//!   what), [`handlers`] and [`attach`] (one per request);
//! * [`supervisor`] (the nanny loop), [`admission`] (policy against Slurm);
//! * [`agent`] (shared state), [`jobs`] (the job table), [`process`],
//!   [`forkserver`], [`spawn`] (through the [`spawner`] process and
//!   [`launch`]), [`memwatch`], [`metrics`], [`joblog`], and the leaves:
//!   [`procfs`], [`cgroup`], [`rlimits`], [`slurm`], [`statefile`] (on
//!   [`rootdir`]), [`recovery`], [`restart`], [`dask_cmd`], [`jobenv`],
//!   [`privileges`], [`connlimit`], [`wire`], [`userio`], [`fdcheck`] and
//!   [`reach`].
//!
//! The rule that shapes the lower layers: the agent never waits on a
//! user's file system. It never forks (the spawner makes its processes),
//! never makes a system call on a user's descriptor on the event loop
//! (`userio`), and learns what a descriptor is from /proc (`fdcheck`).

pub mod access;
pub mod admission;
pub mod agent;
pub mod attach;
pub mod cgroup;
pub mod child;
pub mod conn;
pub mod connlimit;
pub mod daemon;
pub mod dask_cmd;
pub mod fdcheck;
pub mod forkserver;
pub mod handlers;
pub mod jobenv;
pub mod joblog;
pub mod jobs;
pub mod launch;
pub mod memwatch;
pub mod metrics;
pub mod privileges;
pub mod process;
pub mod procfs;
pub mod python_boot;
pub mod reach;
pub mod recovery;
pub mod restart;
pub mod rlimits;
pub mod rootdir;
pub mod server;
pub mod siteops;
pub mod slurm;
pub mod spawn;
pub mod spawner;
pub mod statefile;
pub mod supervisor;
pub mod userio;
pub mod wire;

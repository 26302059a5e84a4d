//! The lowest layer: the kernel and the agent's own files, and nothing of
//! the agent above. `/proc` ([`procfs`], [`fdcheck`]), cgroups
//! ([`cgroup`]), limits ([`rlimits`]), dropping privileges
//! ([`privileges`]), the root-owned state directory ([`rootdir`],
//! [`statefile`]), a user's descriptors and sockets off the event loop
//! ([`userio`], [`wire`]) and a scheduler's reachability ([`reach`]).
//!
//! The rule of this layer: the agent never waits on a user's file system.
//! It never makes a system call on a user's descriptor on the event loop
//! (`userio`), and learns what a descriptor is from /proc (`fdcheck`).

pub mod cgroup;
pub mod fdcheck;
pub mod privileges;
pub mod procfs;
pub mod reach;
pub mod rlimits;
pub mod rootdir;
pub mod statefile;
pub mod userio;
pub mod wire;

//! The agent's socket: accepting connections with per-uid limits
//! ([`server`], [`conn`], [`connlimit`]), who may send what ([`access`]),
//! one handler per control request ([`handlers`]) and the attach session
//! ([`attach`]). Uses the layers below.

pub mod access;
pub mod attach;
pub mod conn;
pub mod connlimit;
pub mod handlers;
pub mod server;

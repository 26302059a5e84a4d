//! What a dask scheduler file (`scheduler.json`, written by the scheduler
//! with `--scheduler-file`) says, for the user-side processes that read it.

use crate::files::read_small_file;
use std::path::Path;

/// Largest scheduler file read (dask writes a few hundred bytes).
pub const MAX_SCHEDULER_FILE: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerInfo {
    /// `tcp://host:port` or `tls://host:port`.
    pub address: String,
    /// The dashboard's port, when the scheduler serves one.
    pub dashboard_port: Option<u16>,
}

impl SchedulerInfo {
    /// Parse the JSON text of a scheduler file.
    pub fn parse(text: &[u8]) -> Option<SchedulerInfo> {
        let v: serde_json::Value = serde_json::from_slice(text).ok()?;
        let address = v.get("address")?.as_str()?.to_string();
        let dashboard_port = v
            .get("services")
            .and_then(|s| s.get("dashboard"))
            .and_then(|p| p.as_u64())
            .and_then(|p| u16::try_from(p).ok());
        Some(SchedulerInfo {
            address,
            dashboard_port,
        })
    }

    /// Read and parse a scheduler file (a small regular file only).
    pub fn read(path: &Path) -> Option<SchedulerInfo> {
        Self::parse(&read_small_file(path, MAX_SCHEDULER_FILE).ok()?)
    }

    /// `host:port` of the scheduler, without the protocol.
    pub fn host_port(&self) -> &str {
        self.address
            .split_once("://")
            .map(|(_, hp)| hp)
            .unwrap_or(&self.address)
    }

    /// The scheduler's host.
    pub fn host(&self) -> &str {
        let hp = self.host_port();
        hp.rsplit_once(':').map(|(h, _)| h).unwrap_or(hp)
    }

    /// `http://host:port` of the dashboard.
    pub fn dashboard_url(&self) -> Option<String> {
        self.dashboard_port
            .map(|p| format!("http://{}:{p}", self.host()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_dask_writes() {
        let s = SchedulerInfo::parse(
            br#"{"type":"Scheduler","id":"x","address":"tcp://127.0.0.1:40123","services":{"dashboard":8787},"workers":{}}"#,
        )
        .unwrap();
        assert_eq!(s.host_port(), "127.0.0.1:40123");
        assert_eq!(s.host(), "127.0.0.1");
        assert_eq!(s.dashboard_url().as_deref(), Some("http://127.0.0.1:8787"));
        let t = SchedulerInfo::parse(br#"{"address":"tls://n1:9"}"#).unwrap();
        assert_eq!((t.host(), t.dashboard_url()), ("n1", None));
        assert!(SchedulerInfo::parse(b"{}").is_none());
        assert!(SchedulerInfo::parse(b"garbage").is_none());
    }
}

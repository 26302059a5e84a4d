//! Talking to a peer that may be hostile: the bounds every connection
//! lives within, replies that cannot block the agent, and refusals.

use crate::joblog::escape;
use crate::wire;
use dask_spank_common::Response;
use std::time::Duration;
use tokio::net::UnixStream;

/// Bound on the handshake and the first request together.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on every reply written to a peer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest handshake frame.
pub const MAX_HELLO: usize = 1024;
/// Largest request but an attach (which carries the job's environment).
pub const MAX_REQUEST: usize = 16 * 1024;

/// Write a reply, within `WRITE_TIMEOUT`.
pub async fn reply(s: &mut UnixStream, r: &Response) -> Result<(), String> {
    match tokio::time::timeout(WRITE_TIMEOUT, wire::write(s, r)).await {
        Ok(res) => res.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "the peer did not take a reply within {}s",
            WRITE_TIMEOUT.as_secs()
        )),
    }
}

/// Refuse with a one-line reason, logged.
pub async fn refuse(s: &mut UnixStream, msg: String) -> Result<(), String> {
    tracing::warn!("refused: {}", escape(&msg));
    reply(
        s,
        &Response::Error {
            message: msg.clone(),
        },
    )
    .await?;
    Err(msg)
}

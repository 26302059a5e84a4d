//! Talking to a peer that may be hostile: the bounds every connection
//! lives within, replies that cannot block the agent, and refusals.

use crate::spawning::joblog::escape;
use dask_spank_common::Response;
use std::time::Duration;
use tokio::net::UnixStream;

/// Bound on the handshake and the first request together.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on every reply written to a peer (a small one; see
/// `reply_deadline` for large ones).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes a peer gets one more second for: a `status` of 3000 jobs (600 kB)
/// to a reader on a node busy stopping them took more than 5 s.
const BYTES_PER_EXTRA_SECOND: usize = 64 * 1024;
/// Largest handshake frame.
pub const MAX_HELLO: usize = 1024;
/// Largest request but an attach (which carries the job's environment).
pub const MAX_REQUEST: usize = 16 * 1024;

/// How long a peer has to take a reply of `len` bytes: `WRITE_TIMEOUT`,
/// plus a second per 64 KiB. A peer that does not read holds its own
/// connection (one of its uid's few) no longer than that, and never the
/// agent; replies are at most 32 MiB (about 9 minutes).
pub fn reply_deadline(len: usize) -> Duration {
    WRITE_TIMEOUT + Duration::from_secs((len / BYTES_PER_EXTRA_SECOND) as u64)
}

/// Write a reply, within its `reply_deadline`.
pub async fn reply(s: &mut UnixStream, r: &Response) -> Result<(), String> {
    write_frame(s, &encode(r)?).await
}

/// The frame of a reply.
pub fn encode(r: &Response) -> Result<Vec<u8>, String> {
    dask_spank_common::frame::encode(r).map_err(|e| e.to_string())
}

/// Write an encoded reply, within its `reply_deadline`.
pub async fn write_frame(s: &mut UnixStream, frame: &[u8]) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let deadline = reply_deadline(frame.len());
    match tokio::time::timeout(deadline, s.write_all(frame)).await {
        Ok(res) => res.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "the peer did not take a reply of {} bytes within {}s",
            frame.len(),
            deadline.as_secs()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_replies_get_a_second_per_64_kib() {
        assert_eq!(reply_deadline(100), WRITE_TIMEOUT);
        assert_eq!(reply_deadline(640 * 1024), Duration::from_secs(15));
        assert_eq!(reply_deadline(32 << 20), Duration::from_secs(5 + 512));
    }
}

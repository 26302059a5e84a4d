//! The async side of the wire (feature `tokio`): frames read and written on
//! a tokio Unix stream, and descriptors passed with SCM_RIGHTS, for the two
//! async peers of the protocol, the node agent and the job-side runtime of
//! `dask-spank attach`. Same framing as [`crate::frame`].
//!
//! Peers may be hostile: a frame is read with a size cap chosen by the
//! caller, and its body is read as it arrives (no buffer of the announced
//! size up front), so a peer that announces 1 MiB and sends nothing costs
//! nothing. Readers never read ahead: a descriptor sent right after a frame
//! is not swallowed. Every write is bounded in time by the caller.

use crate::frame::{self, FrameError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

/// Read exactly one frame of at most `max` bytes.
pub async fn read<T: DeserializeOwned, R: AsyncRead + Unpin>(
    s: &mut R,
    max: usize,
) -> Result<T, FrameError> {
    let mut header = [0u8; 4];
    s.read_exact(&mut header).await.map_err(eof)?;
    let len = frame::body_len(header, max)?;
    let mut body = Vec::with_capacity(len.min(4096));
    (&mut *s)
        .take(len as u64)
        .read_to_end(&mut body)
        .await
        .map_err(eof)?;
    if body.len() != len {
        return Err(FrameError::Closed);
    }
    frame::decode(&body)
}

fn eof(e: io::Error) -> FrameError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        FrameError::Closed
    } else {
        FrameError::Io(e)
    }
}

pub async fn write<T: Serialize, W: AsyncWrite + Unpin>(
    s: &mut W,
    msg: &T,
) -> Result<(), FrameError> {
    s.write_all(&frame::encode(msg)?).await?;
    Ok(())
}

/// Send descriptors with SCM_RIGHTS alongside one byte. Sending does not
/// touch the files (a reference travels).
pub async fn send_fds(s: &UnixStream, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    loop {
        s.writable().await?;
        let res = s.try_io(Interest::WRITABLE, || {
            let iov = [io::IoSlice::new(b"F")];
            sendmsg::<()>(
                s.as_raw_fd(),
                &iov,
                &[ControlMessage::ScmRights(&raw)],
                MsgFlags::MSG_DONTWAIT,
                None,
            )
            .map(|_| ())
            .map_err(io::Error::from)
        });
        match res {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

/// Receive the descriptors sent with SCM_RIGHTS alongside one byte: each
/// one the kernel installed (at most two, the control buffer's room for
/// one), in order; the caller decides what to keep and how to close the
/// rest. An empty list: none was passed.
pub async fn recv_fds(s: &UnixStream) -> io::Result<Vec<OwnedFd>> {
    use nix::sys::socket::MsgFlags;
    loop {
        s.readable().await?;
        let res = s.try_io(Interest::READABLE, || {
            let mut byte = [0u8; 1];
            let (bytes, got) =
                crate::fdpass::recv_with_fds::<1>(s.as_raw_fd(), &mut byte, MsgFlags::empty())?;
            if bytes == 0 && got.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
            Ok(got)
        });
        match res {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Request;
    use std::os::fd::AsFd;

    #[tokio::test]
    async fn frames_are_capped_and_read_as_they_arrive() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        write(&mut a, &Request::Ping).await.unwrap();
        assert_eq!(
            read::<Request, _>(&mut b, 100).await.unwrap(),
            Request::Ping
        );
        // Over the cap: refused from the header alone.
        a.write_all(&100_000u32.to_be_bytes()).await.unwrap();
        assert!(matches!(
            read::<Request, _>(&mut b, 1000).await,
            Err(FrameError::TooLarge { .. })
        ));
        // Announced but never sent: a closed peer ends it.
        let (mut c, mut d) = UnixStream::pair().unwrap();
        c.write_all(&(1u32 << 20).to_be_bytes()).await.unwrap();
        c.write_all(b"{").await.unwrap();
        drop(c);
        assert!(matches!(
            read::<Request, _>(&mut d, 1 << 20).await,
            Err(FrameError::Closed)
        ));
    }

    #[tokio::test]
    async fn descriptors_travel_and_a_frame_after_them_is_not_swallowed() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        send_fds(&a, &[f.as_fd()]).await.unwrap();
        write(&mut a, &Request::Ping).await.unwrap();
        let got = recv_fds(&b).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(
            read::<Request, _>(&mut b, 100).await.unwrap(),
            Request::Ping
        );
        drop(a);
        assert!(recv_fds(&b).await.is_err());
    }
}

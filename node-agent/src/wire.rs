//! Async side of the framing in `dask_spank_common::frame`, and the
//! receipt of a file descriptor passed with SCM_RIGHTS.
//!
//! Peers may be hostile: a frame is read with a size cap chosen by the
//! caller, and its body is read as it arrives (no buffer of the announced
//! size up front), so a peer that announces 1 MiB and sends nothing costs
//! nothing. Every write to a peer is bounded in time by the caller.

use crate::userio::UserFd;
use dask_spank_common::frame::{self, FrameError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

/// Read exactly one frame of at most `max` bytes (no read-ahead, see `frame`).
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

/// Send one file descriptor with SCM_RIGHTS alongside one byte.
pub async fn send_fd(s: &UnixStream, fd: &OwnedFd) -> io::Result<()> {
    use std::os::fd::AsFd;
    send_fds(s, &[fd.as_fd()]).await
}

/// Send descriptors with SCM_RIGHTS alongside one byte. Sending does not
/// touch the files (a reference travels), so a user's descriptor on a file
/// system that hangs is sent without waiting.
pub async fn send_fds(s: &UnixStream, fds: &[std::os::fd::BorrowedFd<'_>]) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
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

/// Receive one file descriptor of user `uid` sent with SCM_RIGHTS
/// alongside one byte. Every descriptor that arrives is a `UserFd` at
/// once: one more than asked for (the control buffer holds two) is closed
/// off the event loop like any other of the user's.
pub async fn recv_fd(s: &UnixStream, uid: u32) -> io::Result<UserFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    loop {
        s.readable().await?;
        let res = s.try_io(Interest::READABLE, || {
            let mut byte = [0u8; 1];
            let mut iov = [io::IoSliceMut::new(&mut byte)];
            let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
            let msg = recvmsg::<()>(
                s.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(io::Error::from)?;
            if msg.bytes == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
            let mut got = None;
            for c in msg.cmsgs().map_err(io::Error::from)? {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    for fd in fds {
                        // SAFETY: the kernel just installed this descriptor in
                        // our table for us; nothing else owns it.
                        let owned = UserFd::new(unsafe { OwnedFd::from_raw_fd(fd) }, uid);
                        got.get_or_insert(owned);
                    }
                }
            }
            got.ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, "no file descriptor was passed")
            })
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
    use dask_spank_common::Request;

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
        // Announced but never sent: the reader waits without allocating it;
        // a closed peer ends it.
        let (mut c, mut d) = UnixStream::pair().unwrap();
        c.write_all(&(1u32 << 20).to_be_bytes()).await.unwrap();
        c.write_all(b"{").await.unwrap();
        drop(c);
        assert!(matches!(
            read::<Request, _>(&mut d, 1 << 20).await,
            Err(FrameError::Closed)
        ));
    }
}

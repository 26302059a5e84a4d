//! Async side of the framing in `dask_spank_common::frame`, and the
//! receipt of a file descriptor passed with SCM_RIGHTS.

use dask_spank_common::frame::{self, FrameError};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

/// Read exactly one frame (no read-ahead, see `frame`).
pub async fn read<T: DeserializeOwned>(s: &mut UnixStream) -> Result<T, FrameError> {
    let mut header = [0u8; 4];
    s.read_exact(&mut header).await.map_err(eof)?;
    let len = frame::body_len(header, frame::MAX_FRAME)?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.map_err(eof)?;
    frame::decode(&body)
}

fn eof(e: io::Error) -> FrameError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        FrameError::Closed
    } else {
        FrameError::Io(e)
    }
}

pub async fn write<T: Serialize>(s: &mut UnixStream, msg: &T) -> Result<(), FrameError> {
    s.write_all(&frame::encode(msg)?).await?;
    Ok(())
}

/// Receive one file descriptor sent with SCM_RIGHTS alongside one byte.
pub async fn recv_fd(s: &UnixStream) -> io::Result<OwnedFd> {
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
                        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                        if got.is_none() {
                            got = Some(owned);
                        }
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

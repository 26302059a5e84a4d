//! The agent's side of the wire: frames and descriptor passing come from
//! `dask_spank_common::awire`; a descriptor received from a user is a
//! `UserFd` from the moment it arrives.

use crate::userio::UserFd;
pub use dask_spank_common::awire::{read, send_fds, write};
use std::io;
use std::os::fd::OwnedFd;
use tokio::net::UnixStream;

/// Send one file descriptor with SCM_RIGHTS alongside one byte.
pub async fn send_fd(s: &UnixStream, fd: &OwnedFd) -> io::Result<()> {
    use std::os::fd::AsFd;
    send_fds(s, &[fd.as_fd()]).await
}

/// Receive one file descriptor of user `uid` sent with SCM_RIGHTS
/// alongside one byte. Every descriptor that arrives is a `UserFd` at
/// once: one more than asked for is closed off the event loop like any
/// other of the user's.
pub async fn recv_fd(s: &UnixStream, uid: u32) -> io::Result<UserFd> {
    let mut fds = dask_spank_common::awire::recv_fds(s)
        .await?
        .into_iter()
        .map(|fd| UserFd::new(fd, uid));
    fds.next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no file descriptor was passed"))
}

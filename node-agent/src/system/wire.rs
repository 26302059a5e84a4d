//! The agent's side of the wire: frames and descriptor passing come from
//! `dask_spank_common::awire`; what a user sends is read so that nothing
//! they attach to it reaches the event loop.
//!
//! A user can attach descriptors (SCM_RIGHTS) to any byte they send, and
//! leave bytes with descriptors unread in the socket when it closes. A
//! plain read lets the kernel drop those descriptors on the reading thread,
//! and closing a socket drops what is queued in it there too; if the user
//! closed their own copies, that drop is the descriptor's last close, which
//! can block (a TCP socket lingering on unsent data, a file on a hung file
//! system). So every read from a user is a `recvmsg` with room for as many
//! descriptors as the kernel passes at once, each one a `UserFd` at once
//! (closed off the loop: `userio`), and a user's connection is a
//! [`UserConn`], closed off the loop too.

use crate::system::userio::UserFd;
pub use dask_spank_common::awire::{send_fds, write};
use dask_spank_common::frame::{self, FrameError};
use serde::de::DeserializeOwned;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, Interest, ReadBuf};
use tokio::net::UnixStream;

/// Descriptors the kernel passes in one message at most (SCM_MAX_FD).
const MAX_PASSED: usize = 253;

/// Send one file descriptor with SCM_RIGHTS alongside one byte.
pub async fn send_fd(s: &UnixStream, fd: &OwnedFd) -> io::Result<()> {
    use std::os::fd::AsFd;
    send_fds(s, &[fd.as_fd()]).await
}

/// One `recvmsg` into `buf`: the bytes read, and the descriptors that came
/// with them (every one, installed close-on-exec).
fn recv_guarded(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::MsgFlags;
    dask_spank_common::fdpass::recv_with_fds::<MAX_PASSED>(fd, buf, MsgFlags::MSG_DONTWAIT)
}

/// A stream of `uid`'s read with `recv_guarded`: descriptors that come
/// along become `UserFd`s of `uid`, which are then dropped (closed off
/// the loop), or kept by `recv_fd`.
pub struct Guarded<S> {
    inner: S,
    uid: u32,
}

/// What `Guarded` reads from.
pub trait AsStream {
    fn stream(&self) -> &UnixStream;
}

impl AsStream for &UnixStream {
    fn stream(&self) -> &UnixStream {
        self
    }
}

impl AsStream for tokio::net::unix::OwnedReadHalf {
    fn stream(&self) -> &UnixStream {
        self.as_ref()
    }
}

impl<S: AsStream> Guarded<S> {
    pub fn new(inner: S, uid: u32) -> Guarded<S> {
        Guarded { inner, uid }
    }

    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsStream + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let uid = self.uid;
        let s = self.inner.stream();
        loop {
            match s.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
            let unfilled = buf.initialize_unfilled();
            match s.try_io(Interest::READABLE, || recv_guarded(s.as_raw_fd(), unfilled)) {
                Ok((n, fds)) => {
                    fds.into_iter().for_each(|f| drop(UserFd::new(f, uid)));
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// Frames read from a user, one at a time, keeping what a cancelled read
/// had read (so `next` may be awaited in a `select!`).
pub struct FrameReader {
    uid: u32,
    header: [u8; 4],
    body: Vec<u8>,
    /// Bytes of the current frame read so far (header included).
    got: usize,
}

impl FrameReader {
    pub fn new(uid: u32) -> FrameReader {
        FrameReader {
            uid,
            header: [0; 4],
            body: Vec::new(),
            got: 0,
        }
    }

    /// The next frame of at most `max` bytes. Cancel safe.
    pub async fn next<T: DeserializeOwned>(
        &mut self,
        s: &UnixStream,
        max: usize,
    ) -> Result<T, FrameError> {
        let mut g = Guarded::new(s, self.uid);
        while self.got < 4 {
            let n = g.read(&mut self.header[self.got..]).await?;
            if n == 0 {
                return Err(FrameError::Closed);
            }
            self.got += n;
        }
        let len = match frame::body_len(self.header, max) {
            Ok(len) => len,
            Err(e) => {
                self.got = 0;
                return Err(e);
            }
        };
        while self.got < 4 + len {
            // Grown as it arrives: an announced frame costs nothing.
            let want = (4 + len - self.got).min(64 * 1024);
            let start = self.body.len();
            self.body.resize(start + want, 0);
            let n = g.read(&mut self.body[start..]).await;
            let n = match n {
                Ok(n) => n,
                Err(e) => {
                    self.body.truncate(start);
                    return Err(e.into());
                }
            };
            self.body.truncate(start + n);
            if n == 0 {
                return Err(FrameError::Closed);
            }
            self.got += n;
        }
        self.got = 0;
        let body = std::mem::take(&mut self.body);
        frame::decode(&body)
    }
}

/// Read one frame of at most `max` bytes from user `uid` (see `FrameReader`).
pub async fn read<T: DeserializeOwned>(
    s: &UnixStream,
    uid: u32,
    max: usize,
) -> Result<T, FrameError> {
    FrameReader::new(uid).next(s, max).await
}

/// Receive one file descriptor of user `uid` sent with SCM_RIGHTS
/// alongside one byte. Every descriptor that arrives is a `UserFd` at
/// once: more than asked for are closed off the event loop like any other
/// of the user's.
pub async fn recv_fd(s: &UnixStream, uid: u32) -> io::Result<UserFd> {
    loop {
        s.readable().await?;
        let mut byte = [0u8; 1];
        match s.try_io(Interest::READABLE, || {
            recv_guarded(s.as_raw_fd(), &mut byte)
        }) {
            Ok((0, fds)) if fds.is_empty() => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ))
            }
            Ok((_, fds)) => {
                let mut fds = fds.into_iter().map(|f| UserFd::new(f, uid));
                return fds.next().ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, "no file descriptor was passed")
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// A user's connection to the agent: closed off the event loop when it
/// goes (its queue may hold descriptors whose last close can block).
pub struct UserConn {
    s: Option<UnixStream>,
    uid: u32,
}

impl UserConn {
    pub fn new(s: UnixStream, uid: u32) -> UserConn {
        UserConn { s: Some(s), uid }
    }

    pub fn uid(&self) -> u32 {
        self.uid
    }
}

impl std::ops::Deref for UserConn {
    type Target = UnixStream;
    fn deref(&self) -> &UnixStream {
        self.s.as_ref().expect("a live connection") // ok: taken only in drop
    }
}

impl std::ops::DerefMut for UserConn {
    fn deref_mut(&mut self) -> &mut UnixStream {
        self.s.as_mut().expect("a live connection") // ok: taken only in drop
    }
}

impl Drop for UserConn {
    fn drop(&mut self) {
        if let Some(s) = self.s.take() {
            if let Ok(std) = s.into_std() {
                drop(UserFd::new(OwnedFd::from(std), self.uid));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::time::{Duration, Instant};
    use tokio::io::AsyncWriteExt;

    /// A TCP socket whose close blocks: unsent data to a peer that never
    /// reads, and a long linger.
    fn lingering() -> (std::net::TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (peer, _) = l.accept().unwrap();
        c.set_nonblocking(true).unwrap();
        let chunk = vec![0u8; 1 << 16];
        while std::io::Write::write(&mut &c, &chunk).is_ok() {}
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 30,
        };
        // SAFETY: setsockopt with a pointer to a local of the right size.
        let r = unsafe {
            libc::setsockopt(
                c.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
        c.set_nonblocking(false).unwrap();
        (c, peer)
    }

    #[tokio::test]
    async fn descriptors_a_user_attaches_to_a_frame_never_close_on_the_reader() {
        let (mut user, agent) = UnixStream::pair().unwrap();
        let (blocking, _peer) = lingering();
        // The frame, with the lingering socket attached, then the user's
        // own copy closed: the agent's drop would be its last close.
        send_fds(&user, &[blocking.as_fd()]).await.unwrap();
        drop(blocking);
        write(&mut user, &dask_spank_common::Request::Ping)
            .await
            .unwrap();
        let t0 = Instant::now();
        let mut r = FrameReader::new(4_200_000);
        // The byte that carried the descriptor is part of the stream.
        let mut g = Guarded::new(&agent, 4_200_000);
        let mut one = [0u8; 1];
        g.read_exact(&mut one).await.unwrap();
        let req: dask_spank_common::Request = r.next(&agent, 1024).await.unwrap();
        assert_eq!(req, dask_spank_common::Request::Ping);
        // Closed queued: a descriptor left unread in a closed connection.
        let (blocking2, _peer2) = lingering();
        send_fds(&user, &[blocking2.as_fd()]).await.unwrap();
        drop(blocking2);
        drop(UserConn::new(agent, 4_200_000));
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        user.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn a_frame_read_cancelled_midway_goes_on_where_it_was() {
        let (mut user, agent) = UnixStream::pair().unwrap();
        let f = dask_spank_common::frame::encode(&dask_spank_common::Request::Status).unwrap();
        user.write_all(&f[..3]).await.unwrap();
        let mut r = FrameReader::new(1);
        let first = tokio::time::timeout(
            Duration::from_millis(50),
            r.next::<dask_spank_common::Request>(&agent, 1024),
        )
        .await;
        assert!(first.is_err(), "cancelled: the frame is not complete");
        user.write_all(&f[3..]).await.unwrap();
        let req: dask_spank_common::Request = r.next(&agent, 1024).await.unwrap();
        assert_eq!(req, dask_spank_common::Request::Status);
    }
}

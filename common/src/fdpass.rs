//! Receiving descriptors passed with SCM_RIGHTS: the one `recvmsg` of the
//! agent (its users' connections, its spawner's answers), of the process
//! it launches, and of the job-side runtime (`awire`).

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// One `recvmsg` on `fd` into `buf`, with a control buffer sized for
/// `ROOM` descriptors (the kernel may fit one more into its padding): the
/// bytes read and every descriptor the kernel installed with them, in
/// order, close-on-exec. `flags` are added to `MSG_CMSG_CLOEXEC`. The
/// caller decides what to keep; the rest close when dropped.
pub fn recv_with_fds<const ROOM: usize>(
    fd: RawFd,
    buf: &mut [u8],
    flags: MsgFlags,
) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = [io::IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; ROOM]);
    let msg = recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC | flags,
    )
    .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(got) = c {
            // SAFETY: the kernel just installed these descriptors in our
            // table for us; nothing else owns them.
            fds.extend(got.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
        }
    }
    Ok((msg.bytes, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{
        sendmsg, socketpair, AddressFamily, ControlMessage, SockFlag, SockType,
    };
    use std::os::fd::{AsFd, AsRawFd};

    fn pair() -> (OwnedFd, OwnedFd) {
        socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap()
    }

    fn send(s: &OwnedFd, bytes: &[u8], fds: &[RawFd]) {
        let iov = [io::IoSlice::new(bytes)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        sendmsg::<()>(s.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).unwrap();
    }

    #[test]
    fn bytes_and_descriptors_in_order_close_on_exec() {
        let (a, b) = pair();
        let (x, y) = pair();
        send(&a, b"F", &[x.as_raw_fd(), y.as_raw_fd()]);
        let mut byte = [0u8; 1];
        let (n, fds) = recv_with_fds::<2>(b.as_raw_fd(), &mut byte, MsgFlags::empty()).unwrap();
        assert_eq!((n, &byte), (1, b"F"));
        assert_eq!(fds.len(), 2);
        for f in &fds {
            let flags = nix::fcntl::fcntl(f.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
            assert_ne!(flags & libc::FD_CLOEXEC, 0);
        }
        // The first received is a copy of x: what goes into it comes out of y.
        nix::unistd::write(fds[0].as_fd(), b"hi").unwrap();
        let mut got = [0u8; 2];
        nix::unistd::read(y.as_raw_fd(), &mut got).unwrap();
        assert_eq!(&got, b"hi");
    }

    #[test]
    fn plain_bytes_and_a_closed_peer() {
        let (a, b) = pair();
        send(&a, b"xyz", &[]);
        let mut buf = [0u8; 8];
        let (n, fds) = recv_with_fds::<1>(b.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
        assert_eq!((n, fds.len()), (3, 0));
        drop(a);
        let (n, fds) = recv_with_fds::<1>(b.as_raw_fd(), &mut buf, MsgFlags::empty()).unwrap();
        assert_eq!((n, fds.len()), (0, 0));
    }
}

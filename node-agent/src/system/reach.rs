//! Whether a job's scheduler answers, asked the way the job's user would.
//!
//! The scheduler's host and port come from the user (the address their
//! attach process reports), so a connection root made there would be
//! root's: a site's firewall rules by uid (`-m owner --uid-owner`), its
//! policy routing by uid and the peer's view (`/proc/net/tcp`) would all
//! see root, not the user. So the socket is made with the user's file
//! system ids (`setfsuid`/`setfsgid`, which the kernel takes as the
//! socket's owner and credentials), for an instant, on the calling thread
//! only: Linux keeps those ids per thread, and nothing else runs on this
//! thread meanwhile.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

/// A new TCP socket for `addr`'s family, owned by `uid`:`gid`.
fn user_socket(addr: &SocketAddr, uid: u32, gid: u32) -> io::Result<OwnedFd> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: setfsgid/setfsuid/socket take plain integers. The ids are
    // those of this thread only, put back before anything else runs on it
    // (fsuid 0 first, which brings back the capabilities it suspended).
    unsafe {
        let old_gid = libc::setfsgid(gid);
        let old_uid = libc::setfsuid(uid);
        let fd = libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        let err = io::Error::last_os_error();
        libc::setfsuid(old_uid as u32);
        libc::setfsgid(old_gid as u32);
        if fd < 0 {
            return Err(err);
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Connect to `addr` with a socket of `uid`:`gid`.
pub async fn connect_as(addr: SocketAddr, uid: u32, gid: u32) -> io::Result<tokio::net::TcpStream> {
    let fd = user_socket(&addr, uid, gid)?;
    let sock = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
    sock.connect(addr).await
}

/// Whether something accepts TCP connections at `hostport` (a dask
/// address without its scheme), asked as `uid`:`gid`, within `timeout`.
pub async fn answers(hostport: &str, uid: u32, gid: u32, timeout: Duration) -> bool {
    let attempt = async {
        for addr in tokio::net::lookup_host(hostport).await.ok()? {
            if connect_as(addr, uid, gid).await.is_ok() {
                return Some(());
            }
        }
        None
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The owner /proc/net/tcp shows for the connection from local port
    /// `local` to remote port `remote`: both ends, since another socket of
    /// the machine (a test running beside, another connection to some
    /// other listener) may have the same local port.
    fn owner_of_connection(local: u16, remote: u16) -> Option<u32> {
        let port = |f: &str| u16::from_str_radix(f.rsplit(':').next()?, 16).ok();
        let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
        table.lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let ends = (port(f.get(1)?)?, port(f.get(2)?)?);
            (ends == (local, remote)).then(|| f.get(7)?.parse().ok())?
        })
    }

    #[tokio::test]
    async fn the_connection_is_the_users() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let c = connect_as(addr, 65534, 65534).await.unwrap();
        let (_server_side, peer) = l.accept().await.unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
        assert_eq!(owner_of_connection(peer.port(), addr.port()), Some(65534));
        // The thread is root again. SAFETY: an invalid id changes nothing
        // and returns the current one.
        assert_eq!(unsafe { libc::setfsuid(u32::MAX) }, 0);
        assert!(answers(&addr.to_string(), 65534, 65534, Duration::from_secs(2)).await);
        drop(l);
        assert!(!answers(&addr.to_string(), 65534, 65534, Duration::from_secs(2)).await);
    }
}

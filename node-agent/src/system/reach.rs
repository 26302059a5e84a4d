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

/// What a connection attempt to a dask address found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Something accepted the connection.
    Answered,
    /// Refused: nothing listens there any more.
    Refused,
    /// No answer within the timeout (or the name did not resolve, or the
    /// network is unreachable): a host that is down, or a live listener
    /// whose accept queue is full, which drops new connections until its
    /// process accepts again.
    Silent,
}

/// Try to connect to `hostport` (a dask address without its scheme) as
/// `uid`:`gid`, within `timeout`.
pub async fn probe(hostport: &str, uid: u32, gid: u32, timeout: Duration) -> Reply {
    let attempt = async {
        let Ok(addrs) = tokio::net::lookup_host(hostport).await else {
            return Reply::Silent;
        };
        let mut reply = Reply::Silent;
        for addr in addrs {
            match connect_as(addr, uid, gid).await {
                Ok(_) => return Reply::Answered,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => reply = Reply::Refused,
                Err(_) => {}
            }
        }
        reply
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or(Reply::Silent)
}

/// Whether what listened at `hostport` is gone: it refuses, or it stays
/// silent for `grace` (each probe given `every`, the next one half of that
/// later). One silent probe is not enough: a scheduler whose event loop
/// hundreds of starting workers hold can leave its accept queue full for
/// seconds (run T, N=256 on 2 cores: nine workers left a live scheduler
/// after one silent 2 s probe; a full queue is the likely cause, not
/// shown there).
pub async fn gone(hostport: &str, uid: u32, gid: u32, grace: Duration, every: Duration) -> bool {
    let end = tokio::time::Instant::now() + grace;
    loop {
        match probe(hostport, uid, gid, every).await {
            Reply::Answered => return false,
            Reply::Refused => return true,
            Reply::Silent if tokio::time::Instant::now() >= end => return true,
            Reply::Silent => {
                tokio::time::sleep_until((tokio::time::Instant::now() + every / 2).min(end)).await
            }
        }
    }
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
        let two = Duration::from_secs(2);
        assert_eq!(
            probe(&addr.to_string(), 65534, 65534, two).await,
            Reply::Answered
        );
        drop(l);
        assert_eq!(
            probe(&addr.to_string(), 65534, 65534, two).await,
            Reply::Refused
        );
    }

    /// A listener that never accepts, its queue full (backlog 0 holds one
    /// connection): new connections get no answer, as with a scheduler
    /// whose event loop is held. Its address and the connections that fill it.
    async fn full_listener() -> (
        tokio::net::TcpListener,
        SocketAddr,
        Vec<tokio::net::TcpStream>,
    ) {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let l = sock.listen(0).unwrap();
        let addr = l.local_addr().unwrap();
        let mut held = Vec::new();
        for _ in 0..4 {
            let c = tokio::time::timeout(
                Duration::from_millis(300),
                tokio::net::TcpStream::connect(addr),
            );
            if let Ok(Ok(c)) = c.await {
                held.push(c);
            }
        }
        (l, addr, held)
    }

    #[tokio::test]
    async fn a_full_accept_queue_is_silent_not_gone_at_once() {
        let (_l, addr, held) = full_listener().await;
        assert!(
            held.len() < 4,
            "the queue never filled: {} connections",
            held.len()
        );
        let (uid, gid) = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        let short = Duration::from_millis(300);
        assert_eq!(
            probe(&addr.to_string(), uid, gid, short).await,
            Reply::Silent
        );
        // Silent through the grace: gone, but only once the grace is over.
        let t0 = std::time::Instant::now();
        assert!(gone(&addr.to_string(), uid, gid, Duration::from_secs(2), short).await);
        assert!(t0.elapsed() >= Duration::from_secs(2), "{:?}", t0.elapsed());
    }

    #[tokio::test]
    async fn a_listener_that_accepts_again_within_the_grace_is_not_gone() {
        let (l, addr, held) = full_listener().await;
        let (uid, gid) = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        // Its process accepts again after a second (the held event loop
        // runs again), well within the grace.
        let accepting = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mut taken = Vec::new();
            loop {
                let (c, _) = l.accept().await.unwrap();
                taken.push(c);
            }
        });
        let short = Duration::from_millis(300);
        assert!(!gone(&addr.to_string(), uid, gid, Duration::from_secs(10), short).await);
        accepting.abort();
        drop(held);
    }

    #[tokio::test]
    async fn a_closed_port_is_gone_at_once() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let (uid, gid) = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        let t0 = std::time::Instant::now();
        assert!(
            gone(
                &addr.to_string(),
                uid,
                gid,
                Duration::from_secs(30),
                Duration::from_secs(2)
            )
            .await
        );
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    }
}

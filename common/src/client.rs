//! Blocking client for the node agent's Unix socket.
//!
//! Used inside slurmstepd by the plugin, so: no threads, no async runtime,
//! and every step (connect, write, read) is bounded by a deadline. A full
//! listen backlog makes a blocking `connect` hang, so the connect is done on
//! a non-blocking socket and retried until the deadline.

use crate::frame::{self, FrameError};
use crate::messages::{Hello, Request, Response};
use crate::PROTOCOL_VERSION;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("node agent socket {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("node agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("node agent: {0}")]
    Frame(#[from] FrameError),
    #[error("node agent refused: {0}")]
    Refused(String),
    #[error("node agent sent an unexpected reply: {0:?}")]
    Unexpected(Box<Response>),
}

impl ClientError {
    /// A reply that does not fit the request (a version mismatch or a bug).
    pub fn unexpected(r: Response) -> ClientError {
        ClientError::Unexpected(Box::new(r))
    }
}

pub struct Client {
    stream: UnixStream,
    timeout: Duration,
}

fn connect_nonblocking(path: &Path, deadline: Instant) -> io::Result<UnixStream> {
    let addr = UnixAddr::new(path).map_err(io::Error::from)?;
    loop {
        let fd: OwnedFd = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(io::Error::from)?;
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => {
                let stream = UnixStream::from(fd);
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            // Backlog full: the agent is alive but busy. Retry until the deadline.
            Err(nix::errno::Errno::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn map_timeout(e: FrameError, t: Duration) -> ClientError {
    match e {
        FrameError::Io(ref io)
            if matches!(
                io.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            ClientError::Timeout(t)
        }
        other => ClientError::Frame(other),
    }
}

impl Client {
    /// Connect and perform the handshake. `timeout` bounds each later read
    /// and write too.
    pub fn connect(path: &Path, who: &str, timeout: Duration) -> Result<Client, ClientError> {
        let deadline = Instant::now() + timeout;
        let stream =
            connect_nonblocking(path, deadline).map_err(|source| ClientError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let mut c = Client { stream, timeout };
        c.set_timeout(timeout)?;
        let hello = Hello {
            version: PROTOCOL_VERSION,
            client: who.to_string(),
        };
        frame::write_frame(&mut c.stream, &hello).map_err(|e| map_timeout(e, timeout))?;
        match c.recv()? {
            Response::Welcome { .. } => Ok(c),
            Response::Error { message } => Err(ClientError::Refused(message)),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// Change the read/write timeout (`None`-like behaviour is not offered:
    /// callers that wait long, like `attach`, pass a long timeout).
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), ClientError> {
        let to = |source| ClientError::Connect {
            path: PathBuf::new(),
            source,
        };
        self.stream.set_read_timeout(Some(timeout)).map_err(to)?;
        self.stream.set_write_timeout(Some(timeout)).map_err(to)?;
        self.timeout = timeout;
        Ok(())
    }

    pub fn send(&mut self, req: &Request) -> Result<(), ClientError> {
        frame::write_frame(&mut self.stream, req).map_err(|e| map_timeout(e, self.timeout))
    }

    pub fn recv(&mut self) -> Result<Response, ClientError> {
        frame::read_reply(&mut self.stream).map_err(|e| map_timeout(e, self.timeout))
    }

    /// Send a request and read one reply; `Error` replies become `Refused`.
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        self.send(req)?;
        match self.recv()? {
            Response::Error { message } => Err(ClientError::Refused(message)),
            other => Ok(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn missing_socket_is_a_connect_error_naming_the_path() {
        let e = Client::connect(
            Path::new("/nonexistent/agent.sock"),
            "test",
            Duration::from_millis(100),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("/nonexistent/agent.sock"), "{e}");
    }

    #[test]
    fn silent_agent_times_out() {
        let dir = std::env::temp_dir().join(format!("dsp-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.sock");
        let _ = std::fs::remove_file(&path);
        let _l = UnixListener::bind(&path).unwrap();
        let t0 = Instant::now();
        let e = Client::connect(&path, "test", Duration::from_millis(200))
            .err()
            .unwrap();
        assert!(matches!(e, ClientError::Timeout(_)), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(2));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Framing: a 4-byte big-endian length, then that many bytes of JSON.
//!
//! Frames above [`MAX_FRAME`] are refused before any allocation, so a
//! hostile or broken peer cannot make the agent allocate unbounded memory.
//! Replies of the agent, which clients trust, may be larger
//! ([`MAX_REPLY`]): the status of thousands of jobs exceeds 1 MiB.
//! Readers consume exactly one frame and never read ahead: a file descriptor
//! sent with SCM_RIGHTS right after a frame is not swallowed by a buffer.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::{self, Read, Write};

/// Largest frame accepted, in bytes (1 MiB: a job environment fits easily).
pub const MAX_FRAME: usize = 1 << 20;
/// Largest reply a client accepts from the agent, in bytes (32 MiB: the
/// status of 100 000 jobs).
pub const MAX_REPLY: usize = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("connection closed")]
    Closed,
    #[error("malformed message: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Encode one message as a complete frame (header included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_REPLY {
        return Err(FrameError::TooLarge {
            len: body.len(),
            max: MAX_REPLY,
        });
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Check a frame header and return the body length it announces, at most
/// `max`.
pub fn body_len(header: [u8; 4], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Decode a frame body.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(body)?)
}

/// Decode a whole buffer holding exactly one frame (used by the fuzzer and
/// by tests).
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<T, FrameError> {
    if buf.len() < 4 {
        return Err(FrameError::Closed);
    }
    let len = body_len([buf[0], buf[1], buf[2], buf[3]], MAX_FRAME)?;
    if buf.len() - 4 != len {
        return Err(FrameError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame announces {len} bytes but carries {}", buf.len() - 4),
        )));
    }
    decode(&buf[4..])
}

pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    w.write_all(&encode(msg)?)?;
    w.flush()?;
    Ok(())
}

/// Read one frame of at most [`MAX_FRAME`] bytes (a request).
pub fn read_frame<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    read_frame_max(r, MAX_FRAME)
}

/// Read one frame of at most [`MAX_REPLY`] bytes (a reply of the agent).
pub fn read_reply<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    read_frame_max(r, MAX_REPLY)
}

fn read_frame_max<R: Read, T: DeserializeOwned>(r: &mut R, max: usize) -> Result<T, FrameError> {
    let mut header = [0u8; 4];
    if let Err(e) = r.read_exact(&mut header) {
        return Err(match e.kind() {
            io::ErrorKind::UnexpectedEof => FrameError::Closed,
            _ => FrameError::Io(e),
        });
    }
    let len = body_len(header, max)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Closed,
        _ => FrameError::Io(e),
    })?;
    decode(&body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{Request, Response};

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Request::Ping).unwrap();
        write_frame(&mut buf, &Response::Ok).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame::<_, Request>(&mut r).unwrap(), Request::Ping);
        assert_eq!(read_frame::<_, Response>(&mut r).unwrap(), Response::Ok);
        assert!(matches!(
            read_frame::<_, Response>(&mut r),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn oversized_frames_are_refused_before_reading_the_body() {
        let mut buf = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(b"{}");
        let e = read_frame::<_, Request>(&mut &buf[..]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "frame of {} bytes exceeds the limit of {MAX_FRAME} bytes",
                MAX_FRAME + 1
            )
        );
    }

    #[test]
    fn replies_may_exceed_the_request_limit() {
        let big = Response::Error {
            message: "x".repeat(MAX_FRAME + 10),
        };
        let mut buf = Vec::new();
        write_frame(&mut buf, &big).unwrap();
        assert!(read_frame::<_, Response>(&mut &buf[..]).is_err());
        assert_eq!(read_reply::<_, Response>(&mut &buf[..]).unwrap(), big);
    }

    #[test]
    fn truncated_and_garbage_frames_are_errors() {
        let e = read_frame::<_, Request>(&mut &[0u8, 0, 0, 9, b'{'][..]).unwrap_err();
        assert!(matches!(e, FrameError::Closed));
        let mut buf = 5u32.to_be_bytes().to_vec();
        buf.extend_from_slice(b"hello");
        let e = read_frame::<_, Request>(&mut &buf[..]).unwrap_err();
        assert!(e.to_string().starts_with("malformed message"), "{e}");
        assert!(decode_frame::<Request>(&buf[..3]).is_err());
    }
}

//! The agent's lifecycle lines in a job's log file ("started", "restarted
//! (why)", "stopped (why)"), interleaved with the dask output.
//!
//! The file descriptor comes from `dask-spank attach`: Slurm opened it as the
//! user, the agent never opens files in users' directories. It is the
//! user's, so it is hostile: checked without asking its file system
//! (`fdcheck`), and even then a write or the final close can block forever
//! (a hung NFS server). So the event loop never writes nor closes: a line
//! goes into the job's bounded queue, and a thread of the user's budget
//! (`userio`) drains it. A job whose writes hang keeps one of its user's
//! threads and loses its later lines (counted); every other job, of this
//! user or another, and the agent go on.
//!
//! Text in a line may come from users (paths, their fork server's words):
//! control characters are escaped, so that a line stays one line and
//! cannot paint a terminal or forge another line.

use crate::system::userio::{self, UserFd};
use std::collections::VecDeque;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Bytes of lines one job may have waiting for a writer.
const MAX_QUEUED_PER_JOB: usize = 16 * 1024;
/// Bytes of lines all jobs together may have waiting.
const MAX_QUEUED_TOTAL: usize = 8 << 20;
/// Longest message kept in one line; the rest is cut.
const MAX_MESSAGE: usize = 2048;

pub struct JobLog {
    sink: Arc<Sink>,
    label: String,
}

struct Sink {
    file: UserFd,
    queue: Mutex<Queue>,
    dropped: AtomicU64,
}

#[derive(Default)]
struct Queue {
    lines: VecDeque<Vec<u8>>,
    bytes: usize,
    /// A drain is queued or running.
    scheduled: bool,
}

/// Make user-supplied text safe for one log line.
pub fn escape(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len().min(MAX_MESSAGE) + 8);
    for c in msg.chars() {
        if out.len() >= MAX_MESSAGE {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

impl JobLog {
    /// A log writing to `fd` (checked with `fdcheck`).
    pub fn new(fd: UserFd, label: String) -> JobLog {
        JobLog {
            sink: Arc::new(Sink {
                file: fd,
                queue: Mutex::default(),
                dropped: AtomicU64::new(0),
            }),
            label,
        }
    }

    /// A log that writes nowhere (tests).
    pub fn discard() -> JobLog {
        let null = std::fs::File::options()
            .write(true)
            .open("/dev/null")
            .map(OwnedFd::from)
            .unwrap_or_else(|_| {
                let (a, _) = std::os::unix::net::UnixStream::pair().expect("socketpair"); // ok: tests only, /dev/null is always there
                OwnedFd::from(a)
            });
        JobLog::new(UserFd::new(null, u32::MAX), "-".into())
    }

    /// The descriptor, to send to a new process as its stdout and stderr
    /// (never to make a system call on here).
    pub fn fd(&self) -> std::io::Result<BorrowedFd<'_>> {
        self.sink
            .file
            .borrow()
            .ok_or_else(|| std::io::Error::other("the job's log is closed"))
    }

    /// Lines lost because the job's file did not take them in time.
    pub fn dropped(&self) -> u64 {
        self.sink.dropped.load(Relaxed)
    }

    /// Write one lifecycle line (never blocks).
    pub fn line(&self, msg: &str) {
        let msg = escape(msg);
        tracing::info!(job = %self.label, "{msg}");
        let ts = humantime::format_rfc3339_seconds(SystemTime::now());
        let text = format!("{ts} dask-spank[{}]: {msg}\n", self.label).into_bytes();
        self.sink.push(text);
    }
}

/// Write all of `buf` to `fd` (no duplicate of the descriptor: closing
/// one would flush the file, a round trip on NFS).
fn write_all(fd: BorrowedFd<'_>, mut buf: &[u8]) -> nix::Result<()> {
    while !buf.is_empty() {
        match nix::unistd::write(fd, buf) {
            Ok(0) => return Err(nix::errno::Errno::EIO),
            Ok(n) => buf = &buf[n..],
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

static QUEUED: AtomicUsize = AtomicUsize::new(0);

impl Sink {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // Every update is a push, a pop or a flag: still consistent.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(self: &Arc<Self>, text: Vec<u8>) {
        let mut q = self.lock();
        let n = text.len();
        if q.bytes + n > MAX_QUEUED_PER_JOB || QUEUED.load(Relaxed) + n > MAX_QUEUED_TOTAL {
            self.dropped.fetch_add(1, Relaxed);
            return;
        }
        q.bytes += n;
        QUEUED.fetch_add(n, Relaxed);
        q.lines.push_back(text);
        if !q.scheduled {
            q.scheduled = true;
            drop(q);
            let sink = self.clone();
            userio::submit(self.file.uid(), move || sink.drain());
        }
    }

    /// Write what is queued, until the queue is empty (on a user I/O thread).
    fn drain(&self) {
        let Some(fd) = self.file.borrow() else {
            return self.lose_all();
        };
        loop {
            let text = {
                let mut q = self.lock();
                match q.lines.pop_front() {
                    Some(t) => {
                        q.bytes -= t.len();
                        QUEUED.fetch_sub(t.len(), Relaxed);
                        t
                    }
                    None => {
                        q.scheduled = false;
                        return;
                    }
                }
            };
            // One write call per line keeps lines whole next to dask's output.
            if write_all(fd, &text).is_err() {
                self.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    /// Count every queued line as lost (the descriptor cannot be used).
    fn lose_all(&self) {
        let mut q = self.lock();
        while let Some(t) = q.lines.pop_front() {
            QUEUED.fetch_sub(t.len(), Relaxed);
            self.dropped.fetch_add(1, Relaxed);
        }
        q.bytes = 0;
        q.scheduled = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    #[test]
    fn control_characters_are_escaped_and_long_text_cut() {
        assert_eq!(escape("a\nb\x1b[31mc\td"), "a\\nb\\u{1b}[31mc\\td");
        assert_eq!(escape("héllo wörld"), "héllo wörld");
        assert!(escape(&"x".repeat(10_000)).len() < MAX_MESSAGE + 8);
    }

    fn tempfile() -> File {
        let p = std::env::temp_dir().join(format!(
            "dsp-joblog-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = File::options()
            .create(true)
            .write(true)
            .read(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        let _ = std::fs::remove_file(&p);
        f
    }

    /// A pipe whose reader never reads, already full: a write blocks.
    fn hung() -> OwnedFd {
        let (r, w) = nix::unistd::pipe().unwrap();
        std::mem::forget(r);
        let full = vec![0u8; 65536];
        let f = File::from(w.try_clone().unwrap());
        let fl = nix::fcntl::FcntlArg::F_SETFL;
        nix::fcntl::fcntl(f.as_raw_fd(), fl(nix::fcntl::OFlag::O_NONBLOCK)).unwrap();
        let _ = (&f).write(&full);
        nix::fcntl::fcntl(f.as_raw_fd(), fl(nix::fcntl::OFlag::empty())).unwrap();
        w
    }

    fn read_when_written(f: &mut File) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut text = String::new();
        while Instant::now() < deadline {
            text.clear();
            f.seek(std::io::SeekFrom::Start(0)).unwrap();
            f.read_to_string(&mut text).unwrap();
            if !text.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        text
    }

    #[test]
    fn hung_logs_never_block_the_caller_nor_another_jobs_lines() {
        let uid = 4_100_000;
        // 20 jobs of one user whose logs hang (a full pipe stands in for a
        // file on a file system that does not answer).
        let hung_logs: Vec<JobLog> = (0..20)
            .map(|i| JobLog::new(UserFd::new(hung(), uid), format!("h{i}")))
            .collect();
        let t0 = Instant::now();
        for i in 0..100 {
            for log in &hung_logs {
                log.line(&format!("line {i} {}", "x".repeat(300)));
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        assert!(hung_logs.iter().all(|l| l.dropped() > 0));
        // Another job of the same user, and one of another user, still get
        // their lines, escaped, one each.
        for (who, label) in [(uid, "2"), (uid + 1, "3")] {
            let mut file = tempfile();
            let log = JobLog::new(
                UserFd::new(OwnedFd::from(file.try_clone().unwrap()), who),
                label.into(),
            );
            log.line("hello\nforged line");
            let text = read_when_written(&mut file);
            assert!(
                text.ends_with(&format!("dask-spank[{label}]: hello\\nforged line\n")),
                "{text:?}"
            );
            assert_eq!(text.lines().count(), 1);
        }
    }
}

//! The agent's lifecycle lines in a job's log file ("started", "restarted
//! (why)", "stopped (why)"), interleaved with the dask output.
//!
//! The file descriptor comes from `dask-spank attach`: Slurm opened it as the
//! user, the agent never opens files in users' directories. It is the
//! user's, so it is hostile: it must be a regular file (or /dev/null), and
//! even a regular file can block a writer forever (a hung NFS server, a
//! FUSE file system the user runs). So the event loop never writes: a line
//! goes into the job's bounded queue, and a small pool of writer threads
//! drains the queues. A job whose writes hang keeps one writer busy and
//! loses its later lines (counted); every other job and the agent go on.
//!
//! Text in a line may come from users (paths, their fork server's words):
//! control characters are escaped, so that a line stays one line and
//! cannot paint a terminal or forge another line.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::SystemTime;

/// Bytes of lines one job may have waiting for a writer.
const MAX_QUEUED_PER_JOB: usize = 16 * 1024;
/// Bytes of lines all jobs together may have waiting.
const MAX_QUEUED_TOTAL: usize = 8 << 20;
/// Longest message kept in one line; the rest is cut.
const MAX_MESSAGE: usize = 2048;
/// Writer threads at most (each one a job whose file hangs, at worst).
const MAX_WRITERS: usize = 16;

pub struct JobLog {
    sink: Arc<Sink>,
    label: String,
}

struct Sink {
    file: File,
    queue: Mutex<Queue>,
    dropped: AtomicU64,
}

#[derive(Default)]
struct Queue {
    lines: VecDeque<Vec<u8>>,
    bytes: usize,
    /// A writer has this sink in hand or in its channel.
    scheduled: bool,
}

/// Whether a descriptor may serve as a job log: a regular file, or /dev/null.
pub fn check_descriptor(fd: &OwnedFd) -> Result<(), String> {
    let f = File::from(fd.try_clone().map_err(|e| e.to_string())?);
    let meta = f.metadata().map_err(|e| e.to_string())?;
    let t = meta.file_type();
    let dev_null = {
        use std::os::unix::fs::MetadataExt;
        t.is_char_device() && meta.rdev() == libc::makedev(1, 3)
    };
    if t.is_file() || dev_null {
        return Ok(());
    }
    let what = if t.is_fifo() {
        "a pipe"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a terminal or device"
    } else {
        "not a file"
    };
    Err(format!(
        "the job's output (the descriptor passed by `dask-spank attach`) is {what}: \
         it must be the job's log file (do not redirect or pipe the output of `dask-spank attach`)"
    ))
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
    /// A log writing to `fd` (checked with `check_descriptor`).
    pub fn new(fd: OwnedFd, label: String) -> JobLog {
        JobLog {
            sink: Arc::new(Sink {
                file: File::from(fd),
                queue: Mutex::default(),
                dropped: AtomicU64::new(0),
            }),
            label,
        }
    }

    /// A log that writes nowhere (tests).
    pub fn discard() -> JobLog {
        let null = File::options()
            .write(true)
            .open("/dev/null")
            .map(OwnedFd::from)
            .unwrap_or_else(|_| {
                let (a, _) = std::os::unix::net::UnixStream::pair().expect("socketpair"); // ok: tests only, /dev/null is always there
                OwnedFd::from(a)
            });
        JobLog::new(null, "-".into())
    }

    /// A copy of the descriptor, for a child's stdout and stderr.
    pub fn fd(&self) -> std::io::Result<OwnedFd> {
        Ok(OwnedFd::from(self.sink.file.try_clone()?))
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
            writers().submit(self.clone());
        }
    }

    /// Write what is queued, until the queue is empty (on a writer thread).
    fn drain(&self) {
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
            if (&self.file).write_all(&text).is_err() {
                self.dropped.fetch_add(1, Relaxed);
            }
        }
    }
}

/// The writer threads, started as needed up to `MAX_WRITERS`.
struct Writers {
    tx: Mutex<mpsc::Sender<Arc<Sink>>>,
    rx: Arc<Mutex<mpsc::Receiver<Arc<Sink>>>>,
    threads: AtomicUsize,
    busy: Arc<AtomicUsize>,
}

fn writers() -> &'static Writers {
    static W: OnceLock<Writers> = OnceLock::new();
    W.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        Writers {
            tx: Mutex::new(tx),
            rx: Arc::new(Mutex::new(rx)),
            threads: AtomicUsize::new(0),
            busy: Arc::new(AtomicUsize::new(0)),
        }
    })
}

impl Writers {
    fn submit(&self, sink: Arc<Sink>) {
        let threads = self.threads.load(Relaxed);
        if self.busy.load(Relaxed) >= threads && threads < MAX_WRITERS {
            self.spawn_thread();
        }
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let _ = tx.send(sink);
    }

    fn spawn_thread(&self) {
        let (rx, busy) = (self.rx.clone(), self.busy.clone());
        let spawned = std::thread::Builder::new()
            .name("joblog-writer".into())
            .stack_size(64 * 1024)
            .spawn(move || loop {
                let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                let Ok(sink) = next else { return };
                busy.fetch_add(1, Relaxed);
                sink.drain();
                busy.fetch_sub(1, Relaxed);
            });
        match spawned {
            Ok(_) => {
                self.threads.fetch_add(1, Relaxed);
            }
            Err(e) => tracing::warn!("cannot start a log writer thread: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn control_characters_are_escaped_and_long_text_cut() {
        assert_eq!(escape("a\nb\x1b[31mc\td"), "a\\nb\\u{1b}[31mc\\td");
        assert_eq!(escape("héllo wörld"), "héllo wörld");
        assert!(escape(&"x".repeat(10_000)).len() < MAX_MESSAGE + 8);
    }

    #[test]
    fn only_files_and_dev_null_are_accepted() {
        let null = OwnedFd::from(File::options().write(true).open("/dev/null").unwrap());
        assert!(check_descriptor(&null).is_ok());
        let file = OwnedFd::from(tempfile());
        assert!(check_descriptor(&file).is_ok());
        let (r, _w) = nix::unistd::pipe().unwrap();
        assert!(check_descriptor(&r).unwrap_err().contains("is a pipe"));
        let (s, _) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(check_descriptor(&OwnedFd::from(s))
            .unwrap_err()
            .contains("socket"));
        let zero = OwnedFd::from(File::open("/dev/zero").unwrap());
        assert!(check_descriptor(&zero).is_err());
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

    #[test]
    fn a_full_pipe_never_blocks_the_caller_and_lines_are_counted_as_dropped() {
        // Even if a pipe got through: its reader never reads.
        let (_r, w) = nix::unistd::pipe().unwrap();
        let full = vec![0u8; 65536];
        let mut f = File::from(w.try_clone().unwrap());
        nix::fcntl::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .unwrap();
        let _ = f.write(&full);
        nix::fcntl::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
        )
        .unwrap();
        let log = JobLog::new(w, "1".into());
        let t0 = Instant::now();
        for i in 0..2000 {
            log.line(&format!("line {i} {}", "x".repeat(100)));
        }
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        assert!(log.dropped() > 1000, "{}", log.dropped());
        // Another job's log still gets its lines.
        let mut other_file = tempfile();
        let other = JobLog::new(OwnedFd::from(other_file.try_clone().unwrap()), "2".into());
        other.line("hello\nforged line");
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut text = String::new();
        while Instant::now() < deadline {
            use std::io::{Read, Seek};
            text.clear();
            other_file.seek(std::io::SeekFrom::Start(0)).unwrap();
            other_file.read_to_string(&mut text).unwrap();
            if !text.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            text.ends_with("dask-spank[2]: hello\\nforged line\n"),
            "{text:?}"
        );
        assert_eq!(text.lines().count(), 1);
    }
}

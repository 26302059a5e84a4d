//! Every system call on a descriptor a user passed (a job's log file) runs
//! here: on a thread of a small pool per user, never on the event loop.
//!
//! Why: such a descriptor may be on a file system that never answers (the
//! user's own FUSE daemon, stopped; a hung NFS or Lustre server). A write,
//! an fstat, even a close (FUSE sends FLUSH and waits for the daemon) can
//! then block the calling thread forever, and SIGKILL does not free a
//! thread blocked in some of them. So the event loop only hands work over:
//! * one user has at most [`PER_USER`] threads at a time, all users
//!   together [`TOTAL`]: a user whose file system hangs ties up at most
//!   their own threads; their further work waits in their own queue, and
//!   every other user's goes on;
//! * threads start on demand and end when no work is left, so an idle
//!   agent has none;
//! * a caller that needs an answer waits with a deadline ([`call`]); one
//!   that gives up leaves the thread to finish whenever the file system
//!   answers, and that user's budget stays one thread smaller meanwhile.
//!
//! A descriptor is held as a [`UserFd`], whose drop closes it here too.
//! Queues hold at most one entry per job log (a log schedules one drain at
//! a time) and one per descriptor to close, so they are bounded by the
//! jobs on the node.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Threads one user may have at a time.
pub const PER_USER: usize = 32;
/// Threads all users together may have at a time.
pub const TOTAL: usize = 1024;

type Work = Box<dyn FnOnce() + Send + 'static>;

#[derive(Default)]
struct Pool {
    queues: HashMap<u32, VecDeque<Work>>,
    running: HashMap<u32, usize>,
    total: usize,
}

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    static POOL: OnceLock<Mutex<Pool>> = OnceLock::new();
    // Every update keeps the counts consistent before it can panic.
    POOL.get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

impl Pool {
    /// A user with queued work and room for one more thread (oldest
    /// waiting first is not tracked: a scan of a few users is cheap).
    fn next_user(&self) -> Option<u32> {
        if self.total >= TOTAL {
            return None;
        }
        self.queues
            .iter()
            .find(|(uid, q)| {
                !q.is_empty() && self.running.get(uid).copied().unwrap_or(0) < PER_USER
            })
            .map(|(uid, _)| *uid)
    }

    /// Take `uid`'s next work and count a thread for it.
    fn take(&mut self, uid: u32) -> Option<Work> {
        let q = self.queues.get_mut(&uid)?;
        let work = q.pop_front()?;
        if q.is_empty() {
            self.queues.remove(&uid);
        }
        *self.running.entry(uid).or_default() += 1;
        self.total += 1;
        Some(work)
    }

    fn release(&mut self, uid: u32) {
        if let Some(n) = self.running.get_mut(&uid) {
            *n -= 1;
            if *n == 0 {
                self.running.remove(&uid);
            }
        }
        self.total -= 1;
    }

    /// Put work back at the head of its user's queue (a thread could not
    /// be started for it).
    fn untake(&mut self, uid: u32, work: Work) {
        self.release(uid);
        self.queues.entry(uid).or_default().push_front(work);
    }

    /// Threads running for `uid` now.
    fn threads_of(&self, uid: u32) -> usize {
        self.running.get(&uid).copied().unwrap_or(0)
    }
}

/// Run `work` on a thread of `uid`'s budget, now or when one frees.
pub fn submit(uid: u32, work: impl FnOnce() + Send + 'static) {
    let mut p = pool();
    p.queues.entry(uid).or_default().push_back(Box::new(work));
    start_threads(&mut p);
}

/// Start a thread for each user with queued work and room for it.
fn start_threads(p: &mut Pool) {
    while let Some(uid) = p.next_user() {
        let Some(work) = p.take(uid) else { return };
        // The work travels in a slot, so that it is not lost (nor dropped
        // here, which could close a user's descriptor on this thread) if
        // no thread can be started.
        let slot = Arc::new(Mutex::new(Some(work)));
        let theirs = slot.clone();
        let started = std::thread::Builder::new()
            .name("user-io".into())
            .stack_size(64 * 1024)
            .spawn(move || worker(uid, theirs));
        if let Err(e) = started {
            tracing::warn!("cannot start a user I/O thread: {e}");
            let back = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(work) = back {
                p.untake(uid, work);
            }
            return;
        }
    }
}

/// A thread's life: its first work, then whatever waits, of its user or of
/// any user with room, until nothing does.
fn worker(mut uid: u32, slot: Arc<Mutex<Option<Work>>>) {
    let mut next = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
    while let Some(work) = next.take() {
        // A panic in one work must not leave its thread counted forever.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
        let mut p = pool();
        p.release(uid);
        if let Some(w) = p.take(uid) {
            next = Some(w);
        } else if let Some(other) = p.next_user() {
            uid = other;
            next = p.take(other);
        }
    }
}

/// Threads of `uid` now (tests).
pub fn threads_of(uid: u32) -> usize {
    pool().threads_of(uid)
}

/// Threads of every user now (metrics): more than a few means writes or
/// closes that wait on a file system.
pub fn threads() -> usize {
    pool().total
}

/// Run `f` on a thread of `uid`'s budget and wait at most `deadline` for
/// its result. `None`: it did not answer in time (it finishes later, on
/// its thread, and its result is dropped there).
pub async fn call<T: Send + 'static>(
    uid: u32,
    deadline: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    submit(uid, move || {
        // A result nobody waits for any more is dropped here, off the loop.
        let _ = tx.send(f());
    });
    tokio::time::timeout(deadline, rx).await.ok()?.ok()
}

/// A descriptor a user passed. It is only ever closed on a thread of its
/// user's budget: a close can block (FUSE's FLUSH, NFS's write-back).
/// Clones share the descriptor; the last one closes it.
#[derive(Clone)]
pub struct UserFd {
    fd: Option<Arc<OwnedFd>>,
    uid: u32,
}

impl UserFd {
    pub fn new(fd: OwnedFd, uid: u32) -> UserFd {
        UserFd {
            fd: Some(Arc::new(fd)),
            uid,
        }
    }

    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The descriptor, for calls that cannot block (sending it with
    /// SCM_RIGHTS, reading /proc about it) or that run in [`call`].
    pub fn borrow(&self) -> Option<BorrowedFd<'_>> {
        self.fd.as_deref().map(|f| f.as_fd())
    }

    /// The descriptor itself, if it is a socket (nothing on it can block
    /// on a file system) held by nobody else; otherwise it is dropped (and
    /// closed off the caller's thread).
    pub fn into_socket(mut self) -> Option<OwnedFd> {
        let fd = self.fd.take()?;
        let socket = crate::system::fdcheck::is_socket(fd.as_fd());
        match Arc::try_unwrap(fd) {
            Ok(owned) if socket => Some(owned),
            Ok(owned) => {
                self.fd = Some(Arc::new(owned));
                None
            }
            Err(shared) => {
                self.fd = Some(shared);
                None
            }
        }
    }
}

impl Drop for UserFd {
    fn drop(&mut self) {
        if let Some(fd) = self.fd.take() {
            submit(self.uid, move || drop(fd));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::time::Instant;

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let t0 = Instant::now();
        while !f() {
            assert!(t0.elapsed() < Duration::from_secs(10), "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_user_whose_work_hangs_ties_up_only_their_own_threads() {
        // Uids of their own: the pool is shared by every test.
        let (stuck_user, other_user) = (4_000_001, 4_000_002);
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let hang = |g: Arc<(Mutex<bool>, std::sync::Condvar)>| {
            move || {
                let mut open = g.0.lock().unwrap();
                while !*open {
                    open = g.1.wait(open).unwrap();
                }
            }
        };
        // Twice the budget of blocked work: PER_USER threads, the rest queued.
        for _ in 0..2 * PER_USER {
            submit(stuck_user, hang(gate.clone()));
        }
        wait_for("the stuck user's threads", || {
            threads_of(stuck_user) == PER_USER
        });
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..100 {
            let d = done.clone();
            submit(other_user, move || {
                d.fetch_add(1, SeqCst);
            });
        }
        wait_for("another user's work", || done.load(SeqCst) == 100);
        // The stuck user's own further work waits for their threads.
        let mine = Arc::new(AtomicUsize::new(0));
        let m = mine.clone();
        submit(stuck_user, move || {
            m.fetch_add(1, SeqCst);
        });
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(mine.load(SeqCst), 0);
        assert_eq!(threads_of(stuck_user), PER_USER);
        // The file system answers again: everything runs, threads end.
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        wait_for("the queued work", || mine.load(SeqCst) == 1);
        wait_for("the threads to end", || {
            threads_of(stuck_user) == 0 && threads_of(other_user) == 0
        });
    }

    #[tokio::test]
    async fn a_call_that_does_not_answer_in_time_is_left_behind() {
        let uid = 4_000_003;
        let t0 = Instant::now();
        let r = call(uid, Duration::from_millis(50), || {
            std::thread::sleep(Duration::from_millis(500));
            7
        })
        .await;
        assert_eq!(r, None);
        assert!(t0.elapsed() < Duration::from_millis(400));
        assert_eq!(call(uid, Duration::from_secs(5), || 8).await, Some(8));
    }

    #[test]
    fn a_user_fd_is_closed_off_the_callers_thread() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = UserFd::new(OwnedFd::from(a), 4_000_004);
        let copy = fd.clone();
        drop(fd);
        assert!(copy.borrow().is_some(), "a clone keeps it open");
        drop(copy);
        // The peer sees the close once a pool thread made it.
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &b, &mut buf).unwrap(), 0);
    }
}

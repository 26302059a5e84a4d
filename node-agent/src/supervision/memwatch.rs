//! The memory watchdog of every worker on the node: one task for all of
//! them, not one timer per worker. A worker far below its limit is looked
//! at rarely, one close to it every tick, so that an agent supervising
//! thousands of workers stays idle when they are (see figure 5 of
//! `scripts/bench`). The supervisor of a worker gets the resident size
//! that crossed the limit through a oneshot channel.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// The fastest a worker is looked at (the Nanny looks every 100 ms at
/// every worker; we do it only close to the limit).
pub const MIN_PERIOD: Duration = Duration::from_millis(200);
/// The slowest: a worker far below its limit.
pub const MAX_PERIOD: Duration = Duration::from_secs(2);
/// Assumed worst growth of a worker's resident memory. A process touching
/// fresh pages grows about this fast on one core; the time to the next look
/// is the headroom at this rate. A faster grower can overshoot the kill
/// threshold by up to one period; Slurm's cgroup limit stays the hard stop.
const GROWTH_MIB_PER_S: u64 = 1024;

/// The processes of one job whose resident memory counts together (a
/// worker, and its fork server, which shares the job's memory).
struct Watched {
    /// Each pid with its `/proc/<pid>/statm`, opened when the watch starts
    /// (the process is then alive and cannot have been reaped) and read
    /// with pread: one system call per look, and it keeps naming this
    /// process even if the pid is reused.
    procs: Vec<(i32, Option<std::fs::File>)>,
    limit_mb: u64,
    due: Instant,
    over: Option<oneshot::Sender<u64>>,
}

#[derive(Default)]
pub struct MemWatch {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    watched: HashMap<u64, Watched>,
}

/// Stops watching its process when dropped.
pub struct Guard {
    watch: Arc<MemWatch>,
    id: u64,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.watch.lock().watched.remove(&self.id);
    }
}

/// Time until the next look at a process with `rss_mb` of `limit_mb`.
pub fn next_period(rss_mb: u64, limit_mb: u64) -> Duration {
    let headroom = limit_mb.saturating_sub(rss_mb);
    Duration::from_millis(headroom.saturating_mul(1000) / GROWTH_MIB_PER_S)
        .clamp(MIN_PERIOD, MAX_PERIOD)
}

/// Open the file `rss_mb` reads.
pub fn open_statm(pid: i32) -> Option<std::fs::File> {
    std::fs::File::open(format!("/proc/{pid}/statm")).ok()
}

/// Resident memory in MiB of the process whose `statm` is open (None: the
/// process is gone).
pub fn rss_mb(statm: &std::fs::File) -> Option<u64> {
    let mut buf = [0u8; 128];
    let n = statm.read_at(&mut buf, 0).ok()?;
    let text = std::str::from_utf8(&buf[..n]).ok()?;
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    Some(pages * page / (1024 * 1024))
}

impl MemWatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update is one insert, remove or field assignment: a
        // poisoned table is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watch `pids` until the guard is dropped; the receiver gets their
    /// resident size together once it exceeds `limit_mb`. Shared pages
    /// count once per process, so a worker and its fork server are killed
    /// a little early rather than left to the kernel's OOM killer. The
    /// first look is at the next tick.
    pub fn watch(self: &Arc<Self>, pids: &[i32], limit_mb: u64) -> (Guard, oneshot::Receiver<u64>) {
        let (tx, rx) = oneshot::channel();
        let mut inner = self.lock();
        inner.next_id += 1;
        let id = inner.next_id;
        inner.watched.insert(
            id,
            Watched {
                procs: pids.iter().map(|&p| (p, open_statm(p))).collect(),
                limit_mb,
                due: Instant::now(),
                over: Some(tx),
            },
        );
        (
            Guard {
                watch: self.clone(),
                id,
            },
            rx,
        )
    }

    /// Processes being watched.
    pub fn len(&self) -> usize {
        self.lock().watched.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Look at every process that is due at `now`; returns how many were
    /// read (for tests).
    pub fn check(
        &self,
        now: Instant,
        read: impl Fn(&mut Option<std::fs::File>, i32) -> Option<u64>,
    ) -> usize {
        let mut inner = self.lock();
        let mut reads = 0;
        for w in inner.watched.values_mut() {
            if w.due > now || w.over.is_none() {
                continue;
            }
            reads += 1;
            let rss: Vec<u64> = w
                .procs
                .iter_mut()
                .filter_map(|(pid, statm)| read(statm, *pid))
                .collect();
            match (!rss.is_empty()).then(|| rss.iter().sum::<u64>()) {
                Some(rss) if rss > w.limit_mb => {
                    if let Some(tx) = w.over.take() {
                        let _ = tx.send(rss);
                    }
                }
                Some(rss) => w.due = now + next_period(rss, w.limit_mb),
                // Gone (its supervisor is about to hear of it): stop looking.
                None => w.due = now + MAX_PERIOD,
            }
        }
        reads
    }

    /// The watchdog task: one tick every `MIN_PERIOD`, for all workers.
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(MIN_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if !self.is_empty() {
                self.check(Instant::now(), |statm, _| rss_mb(statm.as_ref()?));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_follow_the_headroom() {
        assert_eq!(next_period(3000, 2918), MIN_PERIOD);
        assert_eq!(next_period(2900, 2918), MIN_PERIOD);
        assert_eq!(next_period(1918, 2918), Duration::from_millis(976));
        assert_eq!(next_period(100, 2918), MAX_PERIOD);
    }

    #[test]
    fn reports_once_over_the_limit_and_forgets_on_drop() {
        let w = Arc::new(MemWatch::default());
        let (g1, mut over1) = w.watch(&[1], 100);
        let (g2, mut over2) = w.watch(&[2], 100);
        let t0 = Instant::now();
        let rss = |_: &mut _, pid: i32| Some(if pid == 1 { 150 } else { 10 });
        assert_eq!(w.check(t0, rss), 2);
        assert_eq!(over1.try_recv(), Ok(150));
        assert!(over2.try_recv().is_err());
        // pid 1 already reported: not read again; pid 2 is not due yet.
        assert_eq!(w.check(t0 + Duration::from_millis(10), rss), 0);
        // 90 MiB of headroom at 1 GiB/s: due again after the minimum period.
        assert_eq!(w.check(t0 + MIN_PERIOD, rss), 1);
        drop(g1);
        drop(g2);
        assert_eq!(w.len(), 0);
    }

    #[test]
    fn a_jobs_processes_count_together() {
        let w = Arc::new(MemWatch::default());
        let (_g, mut over) = w.watch(&[1, 2], 100);
        let t0 = Instant::now();
        // 60 + 60 MiB: over 100 together. A gone process counts nothing.
        assert_eq!(w.check(t0, |_, pid| (pid != 3).then_some(60)), 1);
        assert_eq!(over.try_recv(), Ok(120));
        let (_g, mut over) = w.watch(&[1, 3], 100);
        w.check(t0, |_, pid| (pid != 3).then_some(60));
        assert!(over.try_recv().is_err());
    }

    #[test]
    fn a_gone_process_is_looked_at_rarely() {
        let w = Arc::new(MemWatch::default());
        let (_g, _over) = w.watch(&[1], 100);
        let t0 = Instant::now();
        assert_eq!(w.check(t0, |_, _| None), 1);
        assert_eq!(w.check(t0 + MIN_PERIOD, |_, _| None), 0);
        assert_eq!(w.check(t0 + MAX_PERIOD, |_, _| None), 1);
    }

    #[test]
    fn reads_a_process_until_it_is_gone() {
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .expect("sleep"); // ok: test
        let statm = open_statm(child.id() as i32).expect("statm"); // ok: test
        assert!(rss_mb(&statm).is_some());
        child.kill().expect("kill"); // ok: test
        child.wait().expect("wait"); // ok: test
        assert_eq!(rss_mb(&statm), None);
        assert!(open_statm(-1).is_none());
    }
}

//! What the agent decides on about processes, to adopt, wait for or signal
//! them: `/proc/<pid>/stat` (parsed in common's `procstat`, the one parser)
//! and the real uid of a process, process identities that survive pid
//! reuse (pid and start time), and pidfds to signal exactly the process
//! that was checked. Other modules read other files of /proc for their own
//! facts: a process's memory (`memwatch`), limits (`rlimits`) and cgroups
//! (`cgroup`), a passed descriptor (`fdcheck`), a recorded slurmstepd's
//! name (`recovery`); the job-side runtime reads `stat` through
//! `procstat` too.
//!
//! What a process says about itself is not trusted to be well formed: its
//! name (`comm`, in parentheses in `stat`) is any 15 bytes it chose with
//! `prctl(PR_SET_NAME)` or by writing `/proc/self/comm`, not necessarily
//! UTF-8, and may hold spaces and parentheses. So `stat` is read as bytes
//! and parsed around the name (first '(' to last ')'); read as a string, a
//! process named `\xff` could not be read and so escaped group signals,
//! memory kills and adoption. Likewise the owner is the real uid, from the
//! `Uid:` line of `/proc/<pid>/status`, not the owner of `/proc/<pid>`.
//! That is the effective uid: a job's process that runs a setuid program
//! shows as the program's owner (root), though its real uid, which the
//! kernel's own permission to signal looks at, is the job's user's. And a
//! process that makes itself non-dumpable (`prctl(PR_SET_DUMPABLE, 0)`, or
//! any change of its credentials) has the files in `/proc/<pid>` owned by
//! root, and before Linux 4.11 the directory too: the agent would no
//! longer find it to be the job's user's, to signal or adopt it.
//!
//! A pid alone names nothing: once its process is reaped, the number can
//! be given to anybody's new process. The agent holds CAP_KILL, so every
//! signal it sends to a process it did not just fork goes through
//! [`signal_if`]: open a pidfd, check the process, signal through the pidfd.
//! If the pid was reused between the check and the signal, the pidfd still
//! names the old (dead) process and the signal fails.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub use dask_spank_common::procstat::ProcStat;

/// A process, named so that pid reuse cannot confuse it with another: the
/// one type of the messages (what the agent tells the job's runtime) and of
/// the agent's state files, which write it the same way.
pub use dask_spank_common::messages::ProcIdent as ProcId;

/// Parse the bytes of `/proc/<pid>/stat` (the one parser, in common).
pub use dask_spank_common::procstat::parse as parse_stat;

/// `/proc/<pid>/stat` of a live process (zombies included).
pub fn stat(pid: i32) -> io::Result<ProcStat> {
    if pid <= 0 {
        return Err(io::ErrorKind::NotFound.into());
    }
    let bytes = std::fs::read(format!("/proc/{pid}/stat"))?;
    parse_stat(&bytes).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{pid}/stat: unexpected format"),
        )
    })
}

/// The real uid of a process, from `/proc/<pid>/status` (see the module
/// doc for why not the owner of `/proc/<pid>`).
pub fn owner(pid: i32) -> io::Result<u32> {
    if pid <= 0 {
        return Err(io::ErrorKind::NotFound.into());
    }
    let bytes = std::fs::read(format!("/proc/{pid}/status"))?;
    parse_real_uid(&bytes).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{pid}/status: no Uid line"),
        )
    })
}

/// The real uid (first field of the `Uid:` line) in the bytes of
/// `/proc/<pid>/status`. The kernel escapes a newline in the `Name:` line
/// that comes first, and the last `Uid:` line is taken anyway, so a name
/// cannot forge one.
pub fn parse_real_uid(status: &[u8]) -> Option<u32> {
    let line = status
        .split(|&b| b == b'\n')
        .filter_map(|l| l.strip_prefix(b"Uid:"))
        .next_back()?;
    std::str::from_utf8(line)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The identity of a live process.
pub fn proc_id(pid: i32) -> io::Result<ProcId> {
    let st = stat(pid)?;
    Ok(ProcId {
        pid,
        start: st.start,
    })
}

/// Whether `id` still names a process that has not been reaped (a zombie
/// counts: its pid cannot be reused yet).
pub fn exists(id: ProcId) -> bool {
    stat(id.pid).is_ok_and(|s| s.start == id.start)
}

/// Every pid in `/proc`.
pub fn pids() -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// A pidfd naming process `pid` from now on, whatever happens to the number.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Send `sig` (0: only check that it lives) to the process of `pidfd`.
pub fn pidfd_signal(pidfd: &OwnedFd, sig: i32) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with a valid descriptor, a signal number, a
    // null siginfo (the kernel fills in the usual kill() siginfo) and no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Signal `pid` with `sig` only if `check` accepts its stat and owner, and
/// only the very process that was checked. `Ok(false)`: not signalled
/// (gone, or not accepted).
pub fn signal_if(pid: i32, sig: i32, check: impl Fn(&ProcStat, u32) -> bool) -> io::Result<bool> {
    let fd = match pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(false),
        Err(e) => return Err(e),
    };
    let (Ok(st), Ok(uid)) = (stat(pid), owner(pid)) else {
        return Ok(false);
    };
    if !check(&st, uid) {
        return Ok(false);
    }
    // Alive now means alive since the pidfd was opened: what was read is
    // this process's.
    match pidfd_signal(&fd, sig) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Signal every process of group `pgrp` that `check` accepts, each through
/// [`signal_if`]. How many were signalled.
pub fn signal_group_if(pgrp: i32, sig: i32, check: impl Fn(&ProcStat, u32) -> bool) -> usize {
    pids()
        .into_iter()
        // A cheap look first; signal_if looks again through a pidfd.
        .filter(|&pid| stat(pid).is_ok_and(|st| st.pgrp == pgrp))
        .filter(|&pid| {
            signal_if(pid, sig, |st, uid| {
                st.pgrp == pgrp && st.state != 'Z' && check(st, uid)
            })
            .unwrap_or(false)
        })
        .count()
}

/// Live members of group `pgrp` other than `except` (zombies do not count),
/// as /proc showed them at most `max_age` before this call.
///
/// One look at /proc reads every process; when many jobs stop at once
/// (a node draining 3000 jobs), each asking after its own group made the
/// teardown quadratic (37 s instead of 1 s). So looks are shared: a caller
/// that can do with one up to `max_age` old takes the last one.
pub fn group_members(pgrp: i32, except: i32, max_age: std::time::Duration) -> usize {
    let asked = std::time::Instant::now();
    let mut last = GROUPS.lock().unwrap_or_else(|p| p.into_inner());
    if last
        .as_ref()
        .is_none_or(|(taken, _)| *taken + max_age < asked)
    {
        *last = Some((std::time::Instant::now(), live_groups()));
    }
    last.as_ref()
        .and_then(|(_, groups)| groups.get(&pgrp))
        .map_or(0, |members| {
            members.iter().filter(|&&p| p != except).count()
        })
}

/// The last look at every live process's group (when it began, group ->
/// pids).
type Groups = std::collections::HashMap<i32, Vec<i32>>;
static GROUPS: std::sync::Mutex<Option<(std::time::Instant, Groups)>> = std::sync::Mutex::new(None);

fn live_groups() -> Groups {
    let mut groups = Groups::new();
    for pid in pids() {
        if let Ok(s) = stat(pid) {
            if s.state != 'Z' {
                groups.entry(s.pgrp).or_default().push(pid);
            }
        }
    }
    groups
}

/// Whether `pid` is `ancestor` or one of its descendants.
pub fn is_descendant(pid: i32, ancestor: i32) -> bool {
    let mut cur = pid;
    for _ in 0..128 {
        if cur == ancestor {
            return true;
        }
        if cur <= 1 {
            return false;
        }
        match stat(cur) {
            Ok(s) => cur = s.ppid,
            Err(_) => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &[u8] =
        b"123 (a) b) (c) R 7 1 2 0 -1 4194304 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 50";

    #[test]
    fn parses_past_odd_command_names() {
        let want = Some(ProcStat {
            state: 'R',
            ppid: 7,
            pgrp: 1,
            session: 2,
            start: 98765,
        });
        assert_eq!(parse_stat(STAT), want);
        // A name that is not UTF-8.
        let odd = [b"123 (\xff\xfe) b) ".as_slice(), &STAT[14..]].concat();
        assert_eq!(parse_stat(&odd), want);
        assert_eq!(parse_stat(b"123 (bash) S 45"), None);
        assert_eq!(parse_stat(b"garbage"), None);
        assert_eq!(parse_stat(b"1 ) R 7 1 2 (x"), None);
    }

    #[test]
    fn the_real_uid_is_the_last_uid_line() {
        let status = b"Name:\t\xff\nUmask:\t0022\nUid:\t1000\t0\t0\t0\nGid:\t5\t5\t5\t5\n";
        assert_eq!(parse_real_uid(status), Some(1000));
        let forged = b"Name:\t\nUid:\t7\nUid:\t1000\t1000\t1000\t1000\n";
        assert_eq!(parse_real_uid(forged), Some(1000));
        assert_eq!(parse_real_uid(b"Name:\tx\n"), None);
        assert_eq!(parse_real_uid(b"Uid:\t\xff\n"), None);
    }

    #[test]
    fn this_process_has_an_identity_and_descends_from_its_parent() {
        let me = std::process::id() as i32;
        let id = proc_id(me).unwrap();
        assert!(exists(id));
        assert!(!exists(ProcId {
            pid: me,
            start: id.start + 1
        }));
        assert_eq!(owner(me).unwrap(), nix::unistd::getuid().as_raw());
        let parent = nix::unistd::getppid().as_raw();
        assert!(is_descendant(me, me));
        assert!(is_descendant(me, parent));
        assert!(!is_descendant(parent, me));
        assert!(!is_descendant(1, me));
    }

    #[test]
    fn signals_reach_only_checked_processes() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        assert!(!signal_if(pid, libc::SIGKILL, |_, _| false).unwrap());
        assert!(signal_if(pid, 0, |st, _| st.ppid == std::process::id() as i32).unwrap());
        assert!(signal_if(pid, libc::SIGKILL, |_, _| true).unwrap());
        child.wait().unwrap();
        assert!(!signal_if(pid, libc::SIGKILL, |_, _| true).unwrap());
        assert!(!signal_if(-3, 0, |_, _| true).unwrap_or(false));
    }

    /// A child process, killed and reaped when dropped (if not yet).
    struct OddChild(nix::unistd::Pid);

    impl Drop for OddChild {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(self.0, nix::sys::signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(self.0, None);
        }
    }

    impl OddChild {
        /// A child that leads its own group, named `\xff\xfe` (not UTF-8)
        /// and, with `ids` (real, effective uid), running as those and
        /// non-dumpable; it waits to be killed. Returns once it has done
        /// all that.
        fn start(ids: Option<(u32, u32)>) -> OddChild {
            let (rx, tx) = nix::unistd::pipe().unwrap();
            // SAFETY: the child runs only `odd_child_body` (async-signal-safe
            // system calls), as required after fork in a threaded process.
            match unsafe { nix::unistd::fork() }.unwrap() {
                nix::unistd::ForkResult::Child => odd_child_body(ids, tx.as_raw_fd()),
                nix::unistd::ForkResult::Parent { child } => {
                    drop(tx);
                    let child = OddChild(child);
                    let mut b = [0u8; 1];
                    let n = nix::unistd::read(rx.as_raw_fd(), &mut b).unwrap();
                    assert_eq!(n, 1, "the child could not become what it should");
                    child
                }
            }
        }

        fn pid(&self) -> i32 {
            self.0.as_raw()
        }

        /// Whether it was killed by SIGKILL (it is reaped).
        fn was_killed(self) -> bool {
            let status = nix::sys::wait::waitpid(self.0, None);
            // Reaped: its pid may be anybody's now, so no kill on drop.
            std::mem::forget(self);
            matches!(
                status,
                Ok(nix::sys::wait::WaitStatus::Signaled(
                    _,
                    nix::sys::signal::SIGKILL,
                    _
                ))
            )
        }
    }

    fn odd_child_body(ids: Option<(u32, u32)>, ready: i32) -> ! {
        // SAFETY: system calls with integer arguments, and for
        // prctl(PR_SET_NAME) a NUL-terminated static string, for write one
        // static byte; none touches memory shared with other threads.
        unsafe {
            libc::setpgid(0, 0);
            if let Some((real, effective)) = ids {
                let ok = libc::syscall(libc::SYS_setresgid, real, real, real) == 0
                    && libc::syscall(libc::SYS_setresuid, real, effective, effective) == 0
                    && libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) == 0;
                if !ok {
                    libc::_exit(1);
                }
            }
            libc::prctl(libc::PR_SET_NAME, c"\xff\xfe".as_ptr(), 0, 0, 0);
            libc::write(ready, b"x".as_ptr().cast(), 1);
            loop {
                libc::pause();
            }
        }
    }

    #[test]
    fn a_process_named_in_invalid_utf8_is_seen_and_signalled() {
        let child = OddChild::start(None);
        let pid = child.pid();
        let comm = std::fs::read(format!("/proc/{pid}/comm")).unwrap();
        assert_eq!(comm, b"\xff\xfe\n");
        let st = stat(pid).unwrap();
        assert_eq!((st.pgrp, st.ppid), (pid, std::process::id() as i32));
        assert!(exists(proc_id(pid).unwrap()));
        assert_eq!(group_members(pid, 0, std::time::Duration::ZERO), 1);
        assert_eq!(signal_group_if(pid, libc::SIGKILL, |_, _| true), 1);
        assert!(child.was_killed());
    }

    #[test]
    fn a_non_dumpable_process_of_another_user_is_still_that_users() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to run a process as another uid");
            return;
        }
        let nobody = 65534;
        let owned = |_: &ProcStat, uid: u32| uid == nobody;
        // As the job's user, non-dumpable: its /proc files are root's.
        let child = OddChild::start(Some((nobody, nobody)));
        let pid = child.pid();
        let status = std::fs::metadata(format!("/proc/{pid}/status")).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&status), 0);
        assert_eq!(owner(pid).unwrap(), nobody);
        assert!(signal_if(pid, 0, owned).unwrap());
        assert_eq!(signal_group_if(pid, libc::SIGKILL, owned), 1);
        assert!(child.was_killed());
        // As after the job's user ran a setuid-root program: /proc/<pid> is
        // root's (the effective uid), the process is still the user's.
        let child = OddChild::start(Some((nobody, 0)));
        let pid = child.pid();
        let dir = std::fs::metadata(format!("/proc/{pid}")).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&dir), 0);
        assert_eq!(owner(pid).unwrap(), nobody);
        assert_eq!(signal_group_if(pid, libc::SIGKILL, owned), 1);
        assert!(child.was_killed());
    }
}

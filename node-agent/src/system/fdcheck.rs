//! What a descriptor a user passed is, found without asking its file
//! system: `/proc/self/fd/N` (the path, or `pipe:[…]`, `socket:[…]`),
//! `/proc/self/fdinfo/N` (the mount it is on) and the sender's
//! `/proc/<pid>/mountinfo` (that mount's type and options). None of these
//! calls the file system; an `fstat` can (FUSE's GETATTR, an NFS or Lustre
//! attribute call), and so can every later write and the final close.
//!
//! So the job's log is refused when it is on FUSE served by a user's
//! daemon: such a daemon (`fusermount3`, or one in an unprivileged user
//! namespace) can stop answering at will, and root's writes and close would
//! wait for it. FUSE mounted by root in the agent's user namespace (CVMFS,
//! a site's ceph-fuse) is the site's own and stays allowed; every other
//! file system (NFS, Lustre, GPFS, local) is allowed, and the agent bounds
//! what it does on it instead (`userio`).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::Path;

/// One line of a mountinfo file, the fields used here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub id: u64,
    pub mount_point: String,
    pub fstype: String,
    pub super_options: String,
}

/// Parse a mountinfo file (proc(5)).
pub fn mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let pre: Vec<&str> = pre.split_whitespace().collect();
            let mut post = post.split_whitespace();
            Some(Mount {
                id: pre.first()?.parse().ok()?,
                mount_point: pre.get(4)?.to_string(),
                fstype: post.next()?.to_string(),
                super_options: post.nth(1).unwrap_or("").to_string(),
            })
        })
        .collect()
}

/// Where descriptor `fd` of this process points, as /proc says.
pub fn link(fd: BorrowedFd<'_>) -> String {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("(unknown: {e})"))
}

/// The id of the mount descriptor `fd` is on.
fn mount_id(fd: BorrowedFd<'_>) -> Option<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Whether a descriptor is a socket.
pub fn is_socket(fd: BorrowedFd<'_>) -> bool {
    link(fd).starts_with("socket:[")
}

fn is_fuse(fstype: &str) -> bool {
    fstype == "fuse" || fstype == "fuseblk" || fstype.starts_with("fuse.")
}

/// The uid FUSE's `user_id=` option names (the mount's owner).
fn fuse_owner(super_options: &str) -> Option<u32> {
    super_options
        .split(',')
        .find_map(|o| o.strip_prefix("user_id="))
        .and_then(|v| v.parse().ok())
}

/// Whether a job's log at `link` may be written by root: `mount` is the
/// mount it is on, as the sender sees it (None: not mounted there), and
/// `same_userns` whether the sender shares the agent's user namespace.
pub fn judge_log(link: &str, mount: Option<&Mount>, same_userns: bool) -> Result<(), String> {
    const FIX: &str = "send the job's output to another file system (sbatch --output)";
    if let Some(kind) = ["pipe:", "socket:", "anon_inode:"]
        .iter()
        .find(|k| link.starts_with(**k))
    {
        let what = kind.trim_end_matches(':');
        return Err(format!(
            "the job's output (the descriptor passed by `dask-spank attach`) is a {what}: \
             it must be the job's log file (do not redirect or pipe the output of `dask-spank attach`)"
        ));
    }
    let Some(m) = mount else {
        return Err(format!(
            "the job's output {link} is on a file system that is not mounted where the job runs: {FIX}"
        ));
    };
    // A user's own namespace may stack anything (an overlay) over a FUSE
    // daemon of theirs: nothing seen from there is the site's.
    if !same_userns {
        return Err(format!(
            "the job's output {link} is seen from a user namespace of the job's own ({} at {}): \
             the root node agent does not write where a user's file system can make it wait forever; {FIX}",
            m.fstype, m.mount_point
        ));
    }
    if is_fuse(&m.fstype) && !(fuse_owner(&m.super_options) == Some(0) && same_userns) {
        let owner = fuse_owner(&m.super_options)
            .map(|u| format!(", user_id={u}"))
            .unwrap_or_default();
        return Err(format!(
            "the job's output {link} is on a FUSE file system served by a user's daemon ({} at {}{owner}): \
             the root node agent does not write where a user's daemon can make it wait forever; {FIX}",
            m.fstype, m.mount_point
        ));
    }
    Ok(())
}

/// [`judge_log`] for descriptor `fd`, received from process `sender`.
pub fn check_log(fd: BorrowedFd<'_>, sender: i32) -> Result<(), String> {
    let link = link(fd);
    let proc_dir = Path::new("/proc").join(sender.to_string());
    let mounts = std::fs::read_to_string(proc_dir.join("mountinfo"))
        .map(|t| mounts(&t))
        .unwrap_or_default();
    let mount = mount_id(fd).and_then(|id| mounts.into_iter().find(|m| m.id == id));
    // Whether the sender is in the agent's user namespace: the same uid
    // map (readable by all; /proc/<pid>/ns/ would need CAP_SYS_PTRACE,
    // which the agent does not keep).
    let map = |p: &Path| std::fs::read_to_string(p.join("uid_map")).ok();
    let same_userns = map(&proc_dir).is_some() && map(&proc_dir) == map(Path::new("/proc/self"));
    judge_log(&link, mount.as_ref(), same_userns)
}

/// The type bits of `fd`'s file (`S_IFMT`) and its device number, from
/// what the kernel has in memory (`AT_STATX_DONT_SYNC`: no call to a
/// network file system's server). Run it through `userio::call` all the
/// same: a file system may still ignore the flag.
pub fn file_type(fd: BorrowedFd<'_>) -> std::io::Result<(u32, u64)> {
    // SAFETY: statx on a descriptor we hold (AT_EMPTY_PATH with ""), into
    // a zeroed buffer of the right type.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_STATX_DONT_SYNC,
            libc::STATX_TYPE,
            &mut st,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let rdev = libc::makedev(st.stx_rdev_major, st.stx_rdev_minor);
    Ok((st.stx_mode as u32 & libc::S_IFMT, rdev))
}

/// Whether a file type (from [`file_type`]) may be a job's log: a regular
/// file, or /dev/null.
pub fn judge_type(link: &str, (kind, rdev): (u32, u64)) -> Result<(), String> {
    if kind == libc::S_IFREG || (kind == libc::S_IFCHR && rdev == libc::makedev(1, 3)) {
        return Ok(());
    }
    let what = match kind {
        libc::S_IFIFO => "a pipe",
        libc::S_IFSOCK => "a socket",
        libc::S_IFCHR => "a terminal or device",
        _ => "not a file",
    };
    Err(format!(
        "the job's output ({link}) is {what}: it must be the job's log file \
         (do not redirect or pipe the output of `dask-spank attach`)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    const MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
98 22 0:50 / /home rw shared:40 - nfs4 srv:/home rw,vers=4.2\n\
120 22 0:60 / /work/mnt rw,nosuid,nodev shared:60 - fuse.hangfs hangfs rw,user_id=1000,group_id=1000\n\
121 22 0:61 / /cvmfs/sw rw shared:61 - fuse cvmfs2 ro,user_id=0,group_id=0\n";

    #[test]
    fn mountinfo_is_parsed() {
        let m = mounts(MOUNTINFO);
        assert_eq!(m.len(), 4);
        assert_eq!(m[2].id, 120);
        assert_eq!(m[2].mount_point, "/work/mnt");
        assert_eq!(m[2].fstype, "fuse.hangfs");
        assert_eq!(fuse_owner(&m[2].super_options), Some(1000));
    }

    #[test]
    fn logs_on_a_users_fuse_or_nowhere_are_refused() {
        let m = mounts(MOUNTINFO);
        assert!(judge_log("/home/u/log/x.log", Some(&m[1]), true).is_ok());
        assert!(judge_log("/cvmfs/sw/x", Some(&m[3]), true).is_ok());
        let e = judge_log("/work/mnt/log", Some(&m[2]), true).unwrap_err();
        assert!(
            e.contains("/work/mnt/log") && e.contains("fuse.hangfs at /work/mnt, user_id=1000"),
            "{e}"
        );
        // Root's FUSE, or anything, seen from another user namespace: the user's.
        assert!(judge_log("/cvmfs/sw/x", Some(&m[3]), false).is_err());
        assert!(judge_log("/home/u/x", Some(&m[1]), false)
            .unwrap_err()
            .contains("user namespace"));
        assert!(judge_log("/x", None, true)
            .unwrap_err()
            .contains("not mounted"));
        assert!(judge_log("pipe:[1234]", None, true)
            .unwrap_err()
            .contains("is a pipe"));
        assert!(judge_log("socket:[1]", None, true)
            .unwrap_err()
            .contains("is a socket"));
    }

    #[test]
    fn this_processs_own_descriptors() {
        let f = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(link(f.as_fd()), "/dev/null");
        assert!(mount_id(f.as_fd()).is_some());
        let me = std::process::id() as i32;
        assert!(
            check_log(f.as_fd(), me).is_ok(),
            "{:?}",
            check_log(f.as_fd(), me)
        );
        assert!(judge_type("/dev/null", file_type(f.as_fd()).unwrap()).is_ok());
        let zero = std::fs::File::open("/dev/zero").unwrap();
        assert!(judge_type("/dev/zero", file_type(zero.as_fd()).unwrap()).is_err());
        let (r, _w) = nix::unistd::pipe().unwrap();
        assert!(!is_socket(r.as_fd()));
        assert!(check_log(r.as_fd(), me).unwrap_err().contains("is a pipe"));
        let (s, _) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(is_socket(s.as_fd()));
        let tmp = std::env::temp_dir().join(format!("dsp-fdcheck-{me}"));
        let file = std::fs::File::create(&tmp).unwrap();
        let _ = std::fs::remove_file(&tmp);
        assert!(check_log(file.as_fd(), me).is_ok());
        assert!(judge_type("x", file_type(file.as_fd()).unwrap()).is_ok());
    }
}

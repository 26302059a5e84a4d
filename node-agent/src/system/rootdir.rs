//! The agent's own directories: `--agent-dir` (its socket) and the state
//! directory in it. Root writes in them, so one that is a symlink, or that
//! another user owns or can write, would let that user steer root's
//! writes (a socket, or a state file, put where the user chooses). Each is
//! created if missing, and otherwise taken only as a real directory of the
//! agent's own uid (root: `daemon::run` refuses to run as anyone else)
//! that no group or other user can write; anything else stops the start,
//! with one line that names the directory and what is wrong.

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

/// Make sure `dir` is a directory of ours that only we can write, with
/// mode `mode` (which must not let group or others write); create it (and
/// its missing parents, 0755) if it does not exist.
pub fn ensure(dir: &Path, mode: u32) -> Result<(), String> {
    let refuse = |why: String| {
        format!(
            "{} {why}: it must be a directory of root's that only root can write; refusing to start",
            dir.display()
        )
    };
    if let Some(parent) = dir.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        // Whatever is there is checked below, whoever made it.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
    }
    // What lstat says, through a descriptor: O_NOFOLLOW refuses a symlink,
    // and the mode is then set on the very directory that was checked.
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = match nix::fcntl::open(dir, flags, Mode::empty()) {
        // SAFETY: open just returned this descriptor; nothing else owns it.
        Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd) },
        Err(Errno::ELOOP | Errno::ENOTDIR) => {
            let link = std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
            let what = if link {
                "is a symbolic link"
            } else {
                "is not a directory"
            };
            return Err(refuse(what.into()));
        }
        Err(e) => return Err(format!("cannot open {}: {e}", dir.display())),
    };
    let st = nix::sys::stat::fstat(fd.as_raw_fd())
        .map_err(|e| format!("cannot stat {}: {e}", dir.display()))?;
    if let Some(why) = not_ours(st.st_uid, st.st_mode, nix::unistd::geteuid().as_raw()) {
        return Err(refuse(why));
    }
    nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(mode))
        .map_err(|e| format!("cannot set the mode of {}: {e}", dir.display()))
}

/// Why a directory of owner `uid` and mode `mode` is not one that only
/// `me` can write, if it is not.
fn not_ours(uid: u32, mode: u32, me: u32) -> Option<String> {
    if uid != me {
        return Some(format!("is owned by uid {uid}"));
    }
    if mode & 0o022 != 0 {
        return Some(format!(
            "has mode {:04o}: group or others can write it",
            mode & 0o7777
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::PathBuf;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dsp-rootdir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_missing_directory_is_made_with_its_parents_and_its_mode() {
        let top = scratch("made");
        let dir = top.join("agent/state-n1");
        ensure(&dir, 0o700).unwrap();
        assert_eq!((mode(&dir), mode(&top.join("agent"))), (0o700, 0o755));
        // An existing one of ours keeps being ours, at the mode asked.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        ensure(&dir, 0o700).unwrap();
        assert_eq!(mode(&dir), 0o700);
        std::fs::remove_dir_all(&top).unwrap();
    }

    #[test]
    fn a_symlink_is_refused_and_its_target_left_alone() {
        let top = scratch("link");
        let target = top.join("target");
        ensure(&target, 0o755).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o711)).unwrap();
        let link = top.join("agent");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = ensure(&link, 0o700).unwrap_err();
        assert_eq!(
            e,
            format!(
                "{} is a symbolic link: it must be a directory of root's that only root can write; refusing to start",
                link.display()
            )
        );
        assert_eq!(mode(&target), 0o711, "not chmodded through the link");
        std::fs::write(top.join("file"), b"").unwrap();
        let e = ensure(&top.join("file"), 0o700).unwrap_err();
        assert!(e.contains("file is not a directory"), "{e}");
        std::fs::remove_dir_all(&top).unwrap();
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let top = scratch("mode");
        let dir = top.join("agent");
        ensure(&dir, 0o755).unwrap();
        for m in [0o777, 0o775, 0o1777] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(m)).unwrap();
            let e = ensure(&dir, 0o755).unwrap_err();
            assert!(
                e.starts_with(&format!("{} has mode {m:04o}", dir.display())),
                "{e}"
            );
            assert_eq!(mode(&dir), m, "left as it was");
        }
        std::fs::remove_dir_all(&top).unwrap();
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to give a directory to another uid");
            return;
        }
        let top = scratch("owner");
        let dir = top.join("agent");
        ensure(&dir, 0o755).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        let e = ensure(&dir, 0o755).unwrap_err();
        assert!(
            e.starts_with(&format!("{} is owned by uid 65534:", dir.display())),
            "{e}"
        );
        std::fs::remove_dir_all(&top).unwrap();
    }
}

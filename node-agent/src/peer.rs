//! Who is on the other end of a connection.

use std::path::Path;

/// Parent pid from the text of `/proc/<pid>/stat`.
pub fn ppid_from_stat(stat: &str) -> Option<i32> {
    crate::procfs::parse_stat(stat).map(|s| s.ppid)
}

fn ppid(proc_root: &Path, pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    ppid_from_stat(&stat)
}

/// Whether `pid` is `ancestor` or one of its descendants.
pub fn is_descendant(proc_root: &Path, pid: i32, ancestor: i32) -> bool {
    let mut cur = pid;
    for _ in 0..128 {
        if cur == ancestor {
            return true;
        }
        if cur <= 1 {
            return false;
        }
        match ppid(proc_root, cur) {
            Some(p) => cur = p,
            None => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_odd_command_names() {
        assert_eq!(ppid_from_stat("123 (bash) S 45 123 123 0"), Some(45));
        assert_eq!(ppid_from_stat("123 (a) b) (c) R 7 1 1"), Some(7));
        assert_eq!(ppid_from_stat("garbage"), None);
    }

    #[test]
    fn this_process_descends_from_its_parent_not_the_reverse() {
        let me = std::process::id() as i32;
        let parent = nix::unistd::getppid().as_raw();
        let proc_root = Path::new("/proc");
        assert!(is_descendant(proc_root, me, me));
        assert!(is_descendant(proc_root, me, parent));
        assert!(!is_descendant(proc_root, parent, me));
        assert!(!is_descendant(proc_root, 1, me));
    }
}

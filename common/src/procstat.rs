//! `/proc/<pid>/stat`, read as bytes, the one parser of it (the node agent
//! and the job-side runtime): the command name in it is whatever the
//! process named itself (`PR_SET_NAME`, any bytes but NUL, not valid UTF-8
//! for all we know, with spaces and parentheses), between the first `(`
//! and the LAST `)`; what follows is the kernel's (ASCII).

/// The fields of `/proc/<pid>/stat` that dask-spank uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
    /// Start time after boot, in clock ticks: with the pid, a name no other
    /// process will ever have.
    pub start: u64,
}

/// Parse the bytes of `/proc/<pid>/stat`.
pub fn parse(stat: &[u8]) -> Option<ProcStat> {
    let open = stat.iter().position(|&b| b == b'(')?;
    let close = stat.iter().rposition(|&b| b == b')')?;
    if close < open {
        return None;
    }
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i)?.parse::<i64>().ok();
    Some(ProcStat {
        state: f.first()?.chars().next()?,
        ppid: num(1)? as i32,
        pgrp: num(2)? as i32,
        session: num(3)? as i32,
        // Field 22 of proc(5); the fields after the name start at 3.
        start: num(19)? as u64,
    })
}

/// `/proc/<pid>/stat` of a process (zombies included).
pub fn read(pid: i32) -> Option<ProcStat> {
    if pid <= 0 {
        return None;
    }
    parse(&std::fs::read(format!("/proc/{pid}/stat")).ok()?)
}

/// The start time of a live (not zombie) process.
pub fn start_time(pid: i32) -> Option<u64> {
    read(pid).filter(|s| s.state != 'Z').map(|s| s.start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_parentheses_and_invalid_utf8_do_not_shift_fields() {
        let mut stat =
            b"123 (a) b\xff\xfe) (c) R 7 1 2 0 -1 4194304 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 50"
                .to_vec();
        let want = ProcStat {
            state: 'R',
            ppid: 7,
            pgrp: 1,
            session: 2,
            start: 98765,
        };
        assert_eq!(parse(&stat), Some(want));
        stat.truncate(20);
        assert_eq!(parse(&stat), None);
        assert_eq!(parse(b"garbage"), None);
    }

    #[test]
    fn this_process() {
        let me = std::process::id() as i32;
        let s = read(me).unwrap();
        assert_eq!(s.ppid, nix::unistd::getppid().as_raw());
        assert_eq!(start_time(me), Some(s.start));
        assert_eq!(start_time(-1), None);
    }
}

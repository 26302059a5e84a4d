//! The resource limits of a job's dask processes: exactly those of the
//! job's own attaching process (`dask-spank attach`), read by the agent from
//! the kernel. Slurm gave that process the job's limits, and the job script
//! may only have lowered them, so the dask processes can never get more
//! than the job has, whatever a user sends.

use std::io;

/// One resource limit (`RLIMIT_*` number, soft and hard values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: i32,
    pub soft: u64,
    pub hard: u64,
}

impl Rlimit {
    pub fn to_libc(&self) -> (i32, libc::rlimit) {
        (
            self.resource,
            libc::rlimit {
                rlim_cur: self.soft,
                rlim_max: self.hard,
            },
        )
    }
}

/// The resources passed on to dask processes, by their name in
/// `/proc/<pid>/limits` (every one Linux has but RLIMIT_RTTIME, which only
/// matters for real-time scheduling).
pub const KNOWN: &[(&str, libc::__rlimit_resource_t)] = &[
    ("Max cpu time", libc::RLIMIT_CPU),
    ("Max file size", libc::RLIMIT_FSIZE),
    ("Max data size", libc::RLIMIT_DATA),
    ("Max stack size", libc::RLIMIT_STACK),
    ("Max core file size", libc::RLIMIT_CORE),
    ("Max resident set", libc::RLIMIT_RSS),
    ("Max processes", libc::RLIMIT_NPROC),
    ("Max open files", libc::RLIMIT_NOFILE),
    ("Max locked memory", libc::RLIMIT_MEMLOCK),
    ("Max address space", libc::RLIMIT_AS),
    ("Max file locks", libc::RLIMIT_LOCKS),
    ("Max pending signals", libc::RLIMIT_SIGPENDING),
    ("Max msgqueue size", libc::RLIMIT_MSGQUEUE),
    ("Max nice priority", libc::RLIMIT_NICE),
    ("Max realtime priority", libc::RLIMIT_RTPRIO),
];

fn value(v: &str) -> Option<u64> {
    if v == "unlimited" {
        Some(libc::RLIM_INFINITY)
    } else {
        v.parse().ok()
    }
}

/// Parse the text of `/proc/<pid>/limits` (written by the kernel: a name
/// padded to 25 columns, then the soft and hard values). Every known
/// resource must be there.
pub fn parse(text: &str) -> Result<Vec<Rlimit>, String> {
    KNOWN
        .iter()
        .map(|(name, res)| {
            let line = text
                .lines()
                .find(|l| l.get(..25).is_some_and(|n| n.trim_end() == *name))
                .ok_or_else(|| format!("no \"{name}\" line"))?;
            let mut f = line[25..].split_whitespace();
            let (Some(soft), Some(hard)) = (f.next().and_then(value), f.next().and_then(value))
            else {
                return Err(format!("unreadable line: {line}"));
            };
            Ok(Rlimit {
                resource: *res as i32,
                soft,
                hard,
            })
        })
        .collect()
}

/// The limits of process `pid`, from `/proc/<pid>/limits` (readable by
/// anybody; `prlimit` on another user's process needs CAP_SYS_RESOURCE).
pub fn of_process(pid: i32) -> io::Result<Vec<Rlimit>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    parse(&text).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{pid}/limits: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_limits_of_a_process() {
        let mine = of_process(std::process::id() as i32).unwrap();
        assert_eq!(mine.len(), KNOWN.len());
        for (_, res) in KNOWN {
            let r = mine.iter().find(|r| r.resource == *res as i32).unwrap();
            let mut want = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit fills in a valid rlimit we own.
            assert_eq!(unsafe { libc::getrlimit(*res, &mut want) }, 0);
            assert_eq!((r.soft, r.hard), (want.rlim_cur, want.rlim_max), "{res}");
        }
        let (soft, hard) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        let nofile = mine
            .iter()
            .find(|r| r.resource == libc::RLIMIT_NOFILE as i32)
            .unwrap();
        assert_eq!((nofile.soft, nofile.hard), (soft, hard));
        assert!(of_process(-5).is_err());
        assert!(parse(
            "Limit                     Soft Limit           Hard Limit           Units\n"
        )
        .is_err());
    }
}

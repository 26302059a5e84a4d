//! The fields of `/proc/<pid>/stat` the agent reads: one parser for the
//! peer check, crash recovery and the fork server's workers.

/// State, parent, process group and session of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
}

/// Parse the text of `/proc/<pid>/stat`. The command name is in
/// parentheses and may itself contain spaces and parentheses, so parsing
/// starts after the last ')'.
pub fn parse_stat(stat: &str) -> Option<ProcStat> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let mut num = || f.next()?.parse::<i32>().ok();
    Some(ProcStat {
        state,
        ppid: num()?,
        pgrp: num()?,
        session: num()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_past_odd_command_names() {
        assert_eq!(
            parse_stat("123 (a) b) (c) R 7 1 2 0"),
            Some(ProcStat {
                state: 'R',
                ppid: 7,
                pgrp: 1,
                session: 2
            })
        );
        assert_eq!(parse_stat("123 (bash) S 45"), None);
        assert_eq!(parse_stat("garbage"), None);
    }
}

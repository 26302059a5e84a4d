//! Slurm's units, parsed the way sbatch parses them.

/// Memory in MiB from a Slurm size: `3072`, `3072M`, `3G`, `1T`, `512K`
/// (no suffix means MiB, as for `--mem`).
pub fn parse_mem_mb(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult_kb): (&str, u64) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1),
        'M' | 'm' => (&s[..s.len() - 1], 1024),
        'G' | 'g' => (&s[..s.len() - 1], 1024 * 1024),
        'T' | 't' => (&s[..s.len() - 1], 1024 * 1024 * 1024),
        c if c.is_ascii_digit() => (s, 1024),
        _ => return None,
    };
    if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let kb = num.parse::<u64>().ok()?.checked_mul(mult_kb)?;
    Some(kb.div_ceil(1024))
}

/// Format MiB the short way (`3G`, `1536M`).
pub fn format_mem_mb(mb: u64) -> String {
    if mb > 0 && mb.is_multiple_of(1024 * 1024) {
        format!("{}T", mb / (1024 * 1024))
    } else if mb > 0 && mb.is_multiple_of(1024) {
        format!("{}G", mb / 1024)
    } else {
        format!("{mb}M")
    }
}

/// A Slurm time limit in seconds: `minutes`, `minutes:seconds`,
/// `hours:minutes:seconds`, `days-hours`, `days-hours:minutes`,
/// `days-hours:minutes:seconds`. `UNLIMITED`/`INFINITE` give `None` inside
/// `Some`: the caller decides whether unlimited is allowed.
pub fn parse_time_s(s: &str) -> Option<Option<u64>> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("unlimited") || s.eq_ignore_ascii_case("infinite") {
        return Some(None);
    }
    let num = |x: &str| -> Option<u64> {
        if x.is_empty() || !x.chars().all(|c| c.is_ascii_digit()) {
            None
        } else {
            x.parse().ok()
        }
    };
    // Components with their unit in seconds, most significant first.
    let (days, rest) = match s.split_once('-') {
        Some((d, r)) => (num(d)?, Some(r)),
        None => (0, None),
    };
    let units: &[u64] = match (rest.is_some(), rest.unwrap_or(s).split(':').count()) {
        (true, 1) => &[3600],
        (true, 2) => &[3600, 60],
        (_, 3) => &[3600, 60, 1],
        (false, 1) => &[60],
        (false, 2) => &[60, 1],
        _ => return None,
    };
    // Checked: a limit too large for any clock is refused, not wrapped.
    let mut total = days.checked_mul(86400)?;
    for (part, unit) in rest.unwrap_or(s).split(':').zip(units) {
        total = total.checked_add(num(part)?.checked_mul(*unit)?)?;
    }
    Some(Some(total))
}

/// Format seconds as Slurm does (`[days-]hours:minutes:seconds`).
/// A duration in the units the policy keys take: `2h`, `5m`, `60s`.
pub fn format_duration_s(s: u64) -> String {
    if s > 0 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s > 60 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

pub fn format_time_s(s: u64) -> String {
    let (d, rem) = (s / 86400, s % 86400);
    let (h, m, sec) = (rem / 3600, rem % 3600 / 60, rem % 60);
    if d > 0 {
        format!("{d}-{h:02}:{m:02}:{sec:02}")
    } else {
        format!("{h}:{m:02}:{sec:02}")
    }
}

/// A duration such as `2h`, `30m`, `90s`, `1d` or plain seconds.
pub fn parse_duration_s(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        's' => (&s[..s.len() - 1], 1),
        'm' => (&s[..s.len() - 1], 60),
        'h' => (&s[..s.len() - 1], 3600),
        'd' => (&s[..s.len() - 1], 86400),
        c if c.is_ascii_digit() => (s, 1),
        _ => return None,
    };
    if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    num.parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory() {
        assert_eq!(parse_mem_mb("3G"), Some(3072));
        assert_eq!(parse_mem_mb("3072"), Some(3072));
        assert_eq!(parse_mem_mb("1536M"), Some(1536));
        assert_eq!(parse_mem_mb("1t"), Some(1 << 20));
        assert_eq!(parse_mem_mb("1500K"), Some(2));
        for bad in ["", "G", "3.5G", "-1G", "3X", "99999999999999999999G"] {
            assert_eq!(parse_mem_mb(bad), None, "{bad}");
        }
        assert_eq!(format_mem_mb(3072), "3G");
        assert_eq!(format_mem_mb(1536), "1536M");
        assert_eq!(format_mem_mb(1 << 20), "1T");
    }

    #[test]
    fn time() {
        assert_eq!(parse_time_s("120"), Some(Some(7200)));
        assert_eq!(parse_time_s("2:00:00"), Some(Some(7200)));
        assert_eq!(parse_time_s("10:30"), Some(Some(630)));
        assert_eq!(parse_time_s("1-0"), Some(Some(86400)));
        assert_eq!(parse_time_s("1-2:30"), Some(Some(86400 + 9000)));
        assert_eq!(parse_time_s("1-02:00:01"), Some(Some(86400 + 7201)));
        assert_eq!(parse_time_s("UNLIMITED"), Some(None));
        for bad in [
            "",
            "a",
            "1:2:3:4",
            "-5",
            "1-",
            "2h",
            "8888888888888888888",
            "213503982334602-0",
            "1-2:3:4:5",
        ] {
            assert_eq!(parse_time_s(bad), None, "{bad}");
        }
        assert_eq!(format_time_s(7200), "2:00:00");
        assert_eq!(format_time_s(86400 + 61), "1-00:01:01");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_s("2h"), Some(7200));
        assert_eq!(parse_duration_s("90"), Some(90));
        assert_eq!(parse_duration_s("15m"), Some(900));
        assert_eq!(parse_duration_s("h"), None);
        assert_eq!(parse_duration_s("1.5h"), None);
    }
}

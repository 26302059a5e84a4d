//! What the user asked sbatch for, read the way sbatch 22.05 reads it.
//!
//! The plugin's allocator `init` runs before sbatch parses its options, so
//! to fill in site defaults (and to supply a job script when none is given)
//! it reads `/proc/self/cmdline` and the script's `#SBATCH` lines itself.
//! This module is that reader: pure, no Slurm, unit-tested.
//!
//! sbatch uses `getopt_long` with a leading `+`: parsing stops at the first
//! non-option word, which is the script; the rest are script arguments. Long
//! options may be abbreviated to a unique prefix. The option table below was
//! taken from Slurm 22.05's option definitions (has_arg of each option), with
//! the options that 24.11 and 26.05 added (`sbatch --help` of each).

/// Long options of sbatch (22.05 to 26.05) that take a required argument.
const REQUIRED: &[&str] = &[
    "account",
    "acctg-freq",
    "array",
    "batch",
    "bb",
    "bbf",
    "begin",
    "chdir",
    "cluster",
    "cluster-constraint",
    "clusters",
    "comment",
    "constraint",
    "container",
    "container-id",
    "container-type",
    "context",
    "core-spec",
    "cores-per-socket",
    "cpu-freq",
    "cpus-per-gpu",
    "cpus-per-task",
    "deadline",
    "delay-boot",
    "dependency",
    "distribution",
    "error",
    "exclude",
    "export",
    "export-file",
    "extra-node-info",
    "gid",
    "gpu-bind",
    "gpu-freq",
    "gpus",
    "gpus-per-node",
    "gpus-per-socket",
    "gpus-per-task",
    "gres",
    "gres-flags",
    "hint",
    "input",
    "job-name",
    "kill-on-invalid-dep",
    "licenses",
    "mail-type",
    "mail-user",
    "mcs-label",
    "mem",
    "mem-bind",
    "mem-per-cpu",
    "mem-per-gpu",
    "mincpus",
    "network",
    "nodefile",
    "nodelist",
    "nodes",
    "ntasks",
    "ntasks-per-core",
    "ntasks-per-gpu",
    "ntasks-per-node",
    "ntasks-per-socket",
    "ntasks-per-tres",
    "open-mode",
    "output",
    "partition",
    "power",
    "prefer",
    "priority",
    "profile",
    "qos",
    "reservation",
    "signal",
    "sockets-per-node",
    "switches",
    "tasks-per-node",
    "thread-spec",
    "threads-per-core",
    "time",
    "time-min",
    "tmp",
    "tres-bind",
    "tres-per-task",
    "uid",
    "wait-all-nodes",
    "wckey",
    "wrap",
    // Added by this plugin (SPANK options take a required argument).
    "dask-role",
    "dask-cluster",
    "dask-env",
    "dask-pool",
];

/// Long options whose argument is optional (only `--opt=value` form).
const OPTIONAL: &[&str] = &[
    "exclusive",
    "get-user-env",
    "nice",
    "no-kill",
    "oom-kill-step",
    "propagate",
    "requeue",
];

/// Long options without argument.
const NO_ARG: &[&str] = &[
    "contiguous",
    "help",
    "hold",
    "ignore-pbs",
    "no-requeue",
    "overcommit",
    "oversubscribe",
    "parsable",
    "quiet",
    "reboot",
    "spread-job",
    "spread-segments",
    "test-only",
    "usage",
    "use-min-nodes",
    "verbose",
    "version",
    "wait",
];

/// Short options and the long option each one stands for.
const SHORT: &[(char, &str)] = &[
    ('A', "account"),
    ('B', "extra-node-info"),
    ('C', "constraint"),
    ('D', "chdir"),
    ('F', "nodefile"),
    ('G', "gpus"),
    ('J', "job-name"),
    ('L', "licenses"),
    ('M', "clusters"),
    ('N', "nodes"),
    ('S', "core-spec"),
    ('a', "array"),
    ('b', "begin"),
    ('c', "cpus-per-task"),
    ('d', "dependency"),
    ('e', "error"),
    ('i', "input"),
    ('m', "distribution"),
    ('n', "ntasks"),
    ('o', "output"),
    ('p', "partition"),
    ('q', "qos"),
    ('t', "time"),
    ('w', "nodelist"),
    ('x', "exclude"),
    ('H', "hold"),
    ('O', "overcommit"),
    ('Q', "quiet"),
    ('V', "version"),
    ('W', "wait"),
    ('h', "help"),
    ('s', "oversubscribe"),
    ('v', "verbose"),
    ('k', "no-kill"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arity {
    Required,
    Optional,
    None,
}

fn arity(long: &str) -> Option<Arity> {
    if REQUIRED.contains(&long) {
        Some(Arity::Required)
    } else if OPTIONAL.contains(&long) {
        Some(Arity::Optional)
    } else if NO_ARG.contains(&long) {
        Some(Arity::None)
    } else {
        None
    }
}

/// Resolve a long option name as getopt_long does: exact match, else a
/// unique prefix. Unknown names are kept as given (sbatch will reject them,
/// or another plugin owns them).
fn resolve_long(name: &str) -> String {
    if arity(name).is_some() {
        return name.to_string();
    }
    let mut hits = REQUIRED
        .iter()
        .chain(OPTIONAL)
        .chain(NO_ARG)
        .filter(|l| l.starts_with(name));
    match (hits.next(), hits.next()) {
        (Some(one), None) if !name.is_empty() => one.to_string(),
        _ => name.to_string(),
    }
}

/// One option occurrence, under its canonical long name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opt {
    pub name: String,
    pub value: Option<String>,
}

/// The command line, split the way sbatch splits it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CmdLine {
    pub opts: Vec<Opt>,
    /// The batch script path, when one is given.
    pub script: Option<String>,
}

/// Parse sbatch's arguments (without argv[0]).
pub fn parse_cmdline(args: &[String]) -> CmdLine {
    let mut out = CmdLine::default();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a == "--" {
            out.script = args.get(i).cloned();
            break;
        }
        if let Some(body) = a.strip_prefix("--") {
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (body, None),
            };
            let name = resolve_long(name);
            let value = match (arity(&name), inline) {
                (_, Some(v)) => Some(v),
                (Some(Arity::Required), None) => {
                    let v = args.get(i).cloned();
                    i += 1;
                    v
                }
                _ => None,
            };
            out.opts.push(Opt { name, value });
        } else if a.len() > 1 && a.starts_with('-') {
            // A cluster of short options: -Hv, -pdebug, -p debug.
            let chars: Vec<char> = a[1..].chars().collect();
            let mut j = 0;
            while j < chars.len() {
                let c = chars[j];
                j += 1;
                let Some((_, long)) = SHORT.iter().find(|(s, _)| *s == c) else {
                    out.opts.push(Opt {
                        name: c.to_string(),
                        value: None,
                    });
                    continue;
                };
                match arity(long) {
                    Some(Arity::Required) => {
                        let rest: String = chars[j..].iter().collect();
                        let value = if rest.is_empty() {
                            let v = args.get(i).cloned();
                            i += 1;
                            v
                        } else {
                            Some(rest)
                        };
                        out.opts.push(Opt {
                            name: long.to_string(),
                            value,
                        });
                        break;
                    }
                    Some(Arity::Optional) => {
                        let rest: String = chars[j..].iter().collect();
                        out.opts.push(Opt {
                            name: long.to_string(),
                            value: (!rest.is_empty()).then_some(rest),
                        });
                        break;
                    }
                    _ => out.opts.push(Opt {
                        name: long.to_string(),
                        value: None,
                    }),
                }
            }
        } else {
            out.script = Some(a.clone());
            break;
        }
    }
    out
}

/// Split one `#SBATCH` line into words, honouring quotes as sbatch does.
fn split_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut have = false;
    let mut quote: Option<char> = None;
    for c in s.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => cur.push(c),
            None if c == '"' || c == '\'' => {
                quote = Some(c);
                have = true;
            }
            None if c == '#' && !have => break, // trailing comment
            None if c.is_whitespace() => {
                if have {
                    words.push(std::mem::take(&mut cur));
                    have = false;
                }
            }
            None => {
                cur.push(c);
                have = true;
            }
        }
    }
    if have {
        words.push(cur);
    }
    words
}

/// Options given by `#SBATCH` lines at the top of a batch script. Like
/// sbatch, reading stops at the first line that is a command.
pub fn parse_script(body: &str) -> Vec<Opt> {
    let mut words = Vec::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("#SBATCH") {
            words.extend(split_words(rest));
            continue;
        }
        let t = line.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        break;
    }
    parse_cmdline(&words).opts
}

/// Input environment variables of sbatch 22.05 that set options the
/// policy cares about. They rank between the command line and the script.
const ENV_OPTIONS: &[(&str, &str)] = &[
    ("SBATCH_ACCOUNT", "account"),
    ("SBATCH_ARRAY_INX", "array"),
    ("SBATCH_JOB_NAME", "job-name"),
    ("SBATCH_MEM_PER_CPU", "mem-per-cpu"),
    ("SBATCH_MEM_PER_GPU", "mem-per-gpu"),
    ("SBATCH_MEM_PER_NODE", "mem"),
    ("SBATCH_PARTITION", "partition"),
    ("SBATCH_TIMELIMIT", "time"),
];

/// Options set through sbatch's input environment variables.
pub fn parse_env<'a>(vars: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<Opt> {
    vars.filter_map(|(k, v)| {
        ENV_OPTIONS
            .iter()
            .find(|(e, _)| *e == k)
            .map(|(_, name)| Opt {
                name: name.to_string(),
                value: Some(v.to_string()),
            })
    })
    .collect()
}

/// The options in force, with sbatch's precedence: command line, then
/// input environment variables, then the script's `#SBATCH` lines.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    pub cmdline: CmdLine,
    pub env_opts: Vec<Opt>,
    pub script_opts: Vec<Opt>,
}

impl Request {
    fn layers(&self) -> [&[Opt]; 3] {
        [&self.cmdline.opts, &self.env_opts, &self.script_opts]
    }

    /// The value of `name` in force (the last one of the strongest layer).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.layers().into_iter().find_map(|layer| {
            layer
                .iter()
                .rev()
                .find(|o| o.name == name)
                .map(|o| o.value.as_deref())
        })?
    }

    pub fn has(&self, name: &str) -> bool {
        self.layers()
            .iter()
            .any(|l| l.iter().any(|o| o.name == name))
    }
}

impl dask_spank_common::policy::Asked for Request {
    fn get(&self, option: &str) -> Option<&str> {
        Request::get(self, option)
    }
    fn has(&self, option: &str) -> bool {
        Request::has(self, option)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn no_script_with_dask_options() {
        let c = parse_cmdline(&argv("--dask-role=worker --dask-cluster x --array=1-4"));
        assert_eq!(c.script, None);
        let r = Request {
            cmdline: c,
            ..Default::default()
        };
        assert_eq!(r.get("dask-role"), Some("worker"));
        assert_eq!(r.get("dask-cluster"), Some("x"));
        assert_eq!(r.get("array"), Some("1-4"));
    }

    #[test]
    fn script_and_its_arguments() {
        let c = parse_cmdline(&argv("-p htc -c2 --hold job.sh --dask-role=x -o y"));
        assert_eq!(c.script.as_deref(), Some("job.sh"));
        assert_eq!(
            c.opts,
            vec![
                Opt {
                    name: "partition".into(),
                    value: Some("htc".into())
                },
                Opt {
                    name: "cpus-per-task".into(),
                    value: Some("2".into())
                },
                Opt {
                    name: "hold".into(),
                    value: None
                },
            ]
        );
    }

    #[test]
    fn short_clusters_optional_args_prefixes_and_double_dash() {
        let c = parse_cmdline(&argv(
            "-Hvpdebug --exclusive --dask-r worker --mem 3G -- s.sh",
        ));
        let names: Vec<_> = c.opts.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "hold",
                "verbose",
                "partition",
                "exclusive",
                "dask-role",
                "mem"
            ]
        );
        assert_eq!(c.opts[2].value.as_deref(), Some("debug"));
        assert_eq!(c.opts[4].value.as_deref(), Some("worker"));
        assert_eq!(c.script.as_deref(), Some("s.sh"));
        // "--exclusive" takes no separate word: "x.sh" is the script.
        let c = parse_cmdline(&argv("--exclusive x.sh"));
        assert_eq!(c.script.as_deref(), Some("x.sh"));
        // An ambiguous prefix is left as is.
        let c = parse_cmdline(&argv("--me 1 s"));
        assert_eq!(c.opts[0].name, "me");
    }

    #[test]
    fn script_directives_and_precedence() {
        let body = "#!/bin/bash\n#SBATCH --dask-role=worker\n#SBATCH -c 4 --mem='5G' # four\n\n# note\n#SBATCH --job-name \"a b\"\nsource env\n#SBATCH --mem=9G\n";
        let s = parse_script(body);
        let r = Request {
            cmdline: parse_cmdline(&argv("--mem=2G job.sh")),
            env_opts: parse_env([("SBATCH_TIMELIMIT", "1:00:00"), ("HOME", "/h")].into_iter()),
            script_opts: s,
        };
        assert_eq!(r.get("time"), Some("1:00:00"));
        assert_eq!(r.get("dask-role"), Some("worker"));
        assert_eq!(r.get("cpus-per-task"), Some("4"));
        assert_eq!(r.get("job-name"), Some("a b"));
        assert_eq!(
            r.get("mem"),
            Some("2G"),
            "command line wins, and lines after a command are ignored"
        );
        assert!(r.has("job-name"));
        assert!(!r.has("output"));
    }

    #[test]
    fn missing_value_at_the_end_is_none() {
        let c = parse_cmdline(&argv("--dask-role"));
        assert_eq!(c.opts[0].value, None);
        let c = parse_cmdline(&argv("-p"));
        assert_eq!(c.opts[0].value, None);
    }
}

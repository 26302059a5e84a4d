//! The admin's commands around the agent: `check-config` (what the
//! plugstack.conf line resolves to, and whether it fits this node) and
//! `health` (Slurm's HealthCheckProgram: drain the node while its agent
//! does not answer, resume it when it does). Blocking: they run from the
//! command line, not in the daemon.

use dask_spank_common::client::Client;
use dask_spank_common::config::Config;
use dask_spank_common::paths::agent_socket;
use dask_spank_common::scontrol::field;
use dask_spank_common::{Request, Response};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The prefix of every drain reason the health check sets: it resumes
/// only nodes it drained itself.
pub const DRAIN_PREFIX: &str = "dask-spank:";

/// Does `name` match a glob of `*` and `?` (plugstack.conf's `include`)?
fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// Files an `include` line names (a path, possibly with a glob in its
/// last component).
fn included(pattern: &str, base: &Path) -> Vec<PathBuf> {
    let p = base.join(pattern);
    let (Some(dir), Some(name)) = (p.parent(), p.file_name().and_then(|n| n.to_str())) else {
        return vec![];
    };
    if !name.contains(['*', '?']) {
        return vec![p.clone()];
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_str().is_some_and(|n| glob_match(name, n)))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The plugin's line in a plugstack.conf (following `include`): its file,
/// line number and arguments.
pub fn find_plugin_line(
    conf: &Path,
    depth: u32,
) -> Result<Option<(PathBuf, usize, Vec<String>)>, String> {
    let text = std::fs::read_to_string(conf)
        .map_err(|e| format!("cannot read {}: {e}", conf.display()))?;
    let base = conf.parent().unwrap_or(Path::new("/"));
    for (i, line) in text.lines().enumerate() {
        let words: Vec<&str> = line
            .split('#')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        match words.as_slice() {
            ["include", pattern, ..] if depth < 8 => {
                for f in included(pattern, base) {
                    if let Some(found) = find_plugin_line(&f, depth + 1)? {
                        return Ok(Some(found));
                    }
                }
            }
            [_, plugin, args @ ..] if plugin.ends_with("spank_dask.so") => {
                return Ok(Some((
                    conf.to_path_buf(),
                    i + 1,
                    args.iter().map(|a| a.to_string()).collect(),
                )));
            }
            _ => {}
        }
    }
    Ok(None)
}

fn scontrol(args: &[&str]) -> Result<String, String> {
    let out = Command::new("scontrol")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run scontrol: {e}"))?;
    if !out.status.success() {
        return Err(one_line(&String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command's error output on one line (scontrol spreads one error over
/// several).
fn one_line(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines.join("; ")
}

/// Where `check-config` looks for the node's agent.
pub struct AgentAt {
    pub node: String,
    /// The agent's --agent-dir as the admin gave it (None: the line's).
    pub agent_dir: Option<PathBuf>,
}

/// Whether the agent answers on `socket`.
pub fn ping(socket: &Path) -> Result<(), String> {
    match Client::connect(socket, "check", Duration::from_secs(5))
        .and_then(|mut c| c.call(&Request::Ping))
    {
        Ok(Response::Ok) => Ok(()),
        Ok(other) => Err(format!("unexpected reply {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// `check-config`: print what every key resolves to, and every problem.
/// Whether there were none.
pub fn check_config(conf: &Path, agent: Option<&AgentAt>) -> bool {
    let (file, line, args) = match find_plugin_line(conf, 0) {
        Ok(Some(x)) => x,
        Ok(None) => {
            println!("no spank_dask.so line in {} (nor in the files it includes): dask-spank is not enabled", conf.display());
            return false;
        }
        Err(e) => {
            println!("{e}");
            return false;
        }
    };
    println!("{}:{line}: the dask-spank line", file.display());
    let cfg = match Config::parse(args.iter().map(String::as_str)) {
        Ok(c) => c,
        Err(e) => {
            println!("ERROR {e}");
            return false;
        }
    };
    for (k, v) in cfg.resolved() {
        let given = args.iter().any(|a| a.split('=').next() == Some(k));
        println!("  {k:<24} {v}{}", if given { "" } else { "  (default)" });
    }
    let ok = match agent {
        Some(at) => check_agent(&cfg, at),
        None => {
            println!("--    a login node: no node agent asked");
            true
        }
    };
    // Slurm itself first: a controller that does not answer is not a
    // missing partition.
    match scontrol(&["ping"]) {
        Ok(_) => check_slurm_names(&cfg) && ok,
        Err(e) => {
            println!("ERROR Slurm does not answer (scontrol ping: {e}): partitions and licences not checked");
            false
        }
    }
}

/// The agent answers where the plugin will look for it.
fn check_agent(cfg: &Config, at: &AgentAt) -> bool {
    let node = &at.node;
    if let Some(dir) = at.agent_dir.as_ref().filter(|d| **d != cfg.agent_dir) {
        println!(
            "ERROR agent_dir={}: the agent runs with --agent-dir {}: the plugin would not find it (make them the same)",
            cfg.agent_dir.display(),
            dir.display()
        );
        return false;
    }
    let sock = agent_socket(&cfg.agent_dir, node);
    match ping(&sock) {
        Ok(()) => {
            println!(
                "ok    the node agent of {node} answers on {}",
                sock.display()
            );
            true
        }
        Err(e) => {
            println!("ERROR agent_dir={}: no node agent of {node} answers on {} ({e}): is the agent running, and is its --agent-dir (and --node) the same? (on a login node: --login-node)", cfg.agent_dir.display(), sock.display());
            false
        }
    }
}

/// Partitions and licences the policy names must exist in Slurm.
fn check_slurm_names(cfg: &Config) -> bool {
    let p = &cfg.policy;
    let mut ok = true;
    for (key, part) in [
        ("scheduler_partition", &p.scheduler.partition),
        ("worker_partition", &p.worker.partition),
    ] {
        if let Some(part) = part {
            match scontrol(&["show", "partition", part]) {
                Ok(_) => println!("ok    {key}={part} exists"),
                Err(e) => {
                    ok = false;
                    println!("ERROR {key}={part}: Slurm has no such partition ({e})");
                }
            }
        }
    }
    let wanted = !p.scheduler.licenses.is_empty() || !p.worker.licenses.is_empty();
    let lic = match wanted.then(|| scontrol(&["show", "licenses"])) {
        None => String::new(),
        Some(Ok(l)) => l,
        Some(Err(e)) => {
            println!("ERROR cannot read Slurm's licences (scontrol show licenses: {e})");
            return false;
        }
    };
    for (key, names) in [
        ("scheduler_licenses", &p.scheduler.licenses),
        ("worker_licenses", &p.worker.licenses),
    ] {
        for l in names {
            if lic.contains(&format!("LicenseName={l} "))
                || lic.contains(&format!("LicenseName={l}\n"))
            {
                println!("ok    {key}: licence {l} exists");
            } else {
                ok = false;
                println!("ERROR {key}: Slurm has no licence {l} (scontrol show licenses)");
            }
        }
    }
    ok
}

/// The node's state and drain reason, from `scontrol -o show node`.
fn node_state(node: &str) -> Result<(String, String), String> {
    let out = scontrol(&["-o", "show", "node", node])?;
    let state = field(&out, "State").unwrap_or_default().to_string();
    // Slurm appends who set the reason and when: " [root@2026-...]".
    let reason = field(&out, "Reason").unwrap_or_default();
    let reason = reason.rsplit_once(" [").map_or(reason, |(r, _)| r);
    Ok((state, reason.trim().to_string()))
}

/// `health`: drain `node` while its agent does not answer (unless it is
/// drained already), resume it when it answers again, if it was drained
/// by this check. The agent's state, for the exit code.
pub fn health(socket: &Path, node: &str) -> Result<(), String> {
    let alive = ping(socket);
    let (state, reason) = node_state(node)?;
    let drained = state.contains("DRAIN");
    match &alive {
        Err(e) if !drained => {
            let why = format!(
                "{DRAIN_PREFIX} the node agent does not answer ({})",
                e.replace('"', "'")
            );
            scontrol(&[
                "update",
                &format!("NodeName={node}"),
                "State=DRAIN",
                &format!("Reason={why}"),
            ])?;
            println!("drained {node}: {why}");
        }
        Ok(()) if drained && reason.starts_with(DRAIN_PREFIX) => {
            scontrol(&["update", &format!("NodeName={node}"), "State=RESUME"])?;
            println!("resumed {node}: the node agent answers again");
        }
        _ => {}
    }
    alive.map_err(|e| {
        format!(
            "the node agent does not answer on {}: {e}",
            socket.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_spread_over_lines_is_said_in_one() {
        assert_eq!(
            one_line("scontrol: error: a\n\n  slurm_load_partitions: b\n"),
            "scontrol: error: a; slurm_load_partitions: b"
        );
    }

    #[test]
    fn globs() {
        assert!(glob_match("*.conf", "dask-spank.conf"));
        assert!(!glob_match("*.conf", "dask-spank.conf.rpmnew"));
        assert!(glob_match("a?c", "abc") && !glob_match("a?c", "ac"));
    }

    #[test]
    fn the_plugin_line_is_found_through_includes() {
        let d = std::env::temp_dir().join(format!("dsp-plugstack-{}", std::process::id()));
        std::fs::create_dir_all(d.join("plugstack.conf.d")).unwrap();
        std::fs::write(
            d.join("plugstack.conf"),
            "optional /x/other.so\ninclude plugstack.conf.d/*.conf\n",
        )
        .unwrap();
        std::fs::write(d.join("plugstack.conf.d/a.conf"), "# nothing\n").unwrap();
        std::fs::write(
            d.join("plugstack.conf.d/dask-spank.conf"),
            "# required /usr/lib64/slurm/spank_dask.so commented=out\nrequired /usr/lib64/slurm/spank_dask.so tls=off worker_mem=2G\n",
        )
        .unwrap();
        let (f, line, args) = find_plugin_line(&d.join("plugstack.conf"), 0)
            .unwrap()
            .unwrap();
        assert!(f.ends_with("dask-spank.conf"));
        assert_eq!(
            (line, args),
            (2, vec!["tls=off".to_string(), "worker_mem=2G".to_string()])
        );
        std::fs::write(d.join("plugstack.conf.d/dask-spank.conf"), "").unwrap();
        assert!(find_plugin_line(&d.join("plugstack.conf"), 0)
            .unwrap()
            .is_none());
        std::fs::remove_dir_all(&d).unwrap();
    }
}

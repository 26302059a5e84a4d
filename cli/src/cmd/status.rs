//! `dask-spank status`: every job of a cluster, and why it is not connected.

use crate::cluster::{known, parse_name, unknown, view, Res};
use crate::view::Row;
use dask_spank_common::names::DEFAULT_POOL;
use dask_spank_common::records::{now, KeeperStatus, PoolKeeperStatus, Target};

/// The table of jobs; a POOL column once the cluster has pools (a cluster
/// without shows the table it always did).
pub fn print_rows(rows: &[&Row]) {
    let pooled = rows.iter().any(|r| r.pool != DEFAULT_POOL);
    let pool = |p: &str| {
        if pooled {
            format!("{p:<10} ")
        } else {
            String::new()
        }
    };
    println!(
        "{:<12} {:<10} {}{:<10} {:<8}  REASON",
        "JOB",
        "ROLE",
        pool("POOL"),
        "STATE",
        "NODE"
    );
    for r in rows {
        let p = if r.role == "worker" {
            r.pool.as_str()
        } else {
            "-"
        };
        println!(
            "{:<12} {:<10} {}{:<10} {:<8}  {}",
            r.job,
            r.role,
            pool(p),
            r.state,
            r.node,
            r.reason
        );
    }
}

/// One row per job: pending, running, connected, failed (with the reason), ended.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Example:\n  dask-spank status ana --json")]
pub struct Args {
    pub name: String,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Res {
    let (c, json) = (parse_name(&a.name)?, a.json);
    let v = view(&c)?;
    if !known(&v) {
        return Err(unknown(&c));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!(
        "cluster '{}': {} of {} worker jobs connected ({} pending, {} running, {} failed, {} ended)",
        v.cluster, v.connected, v.total(), v.pending, v.running, v.failed, v.ended
    );
    // Per pool, once the cluster has more than its default one.
    if v.pools.keys().any(|p| p != "default") {
        for (p, n) in &v.pools {
            println!(
                "  pool {p}: {} of {} connected ({} pending, {} running, {} failed, {} ended)",
                n.connected, n.total, n.pending, n.running, n.failed, n.ended
            );
        }
    }
    if let Some(a) = &v.scheduler_address {
        println!(
            "scheduler {a}, dashboard {}",
            v.dashboard_link.as_deref().unwrap_or("-")
        );
    }
    if let Some(hp) = v
        .dashboard_address
        .as_deref()
        .and_then(|d| d.strip_prefix("http://"))
    {
        let port = hp.rsplit_once(':').map(|(_, p)| p).unwrap_or("8787");
        let page = v
            .dashboard_link
            .as_deref()
            .and_then(|l| l.split_once("/status"))
            .map_or("/status".to_string(), |(_, q)| format!("/status{q}"));
        println!(
            "  from your laptop: ssh -N -L {port}:{hp} {}, then open http://localhost:{port}{page}",
            dask_spank_common::sys::short_hostname()
        );
    }
    println!("scheduler file: {}", v.scheduler_file);
    if let Some(k) = crate::cluster::records_of(&c)?.keeper() {
        println!("{}", keeper_line(&k, now()));
    }
    let mut rows: Vec<&Row> = v.scheduler.iter().collect();
    rows.extend(v.workers.iter());
    print_rows(&rows);
    Ok(())
}

fn intention(t: &Target) -> String {
    match t {
        Target::Adapt { adapt: [lo, hi] } => format!("adaptive {lo}..{hi}"),
        _ => "fixed".into(),
    }
}

/// The keeper's line of `status`: what it aims at and sees (a line more
/// for each pool), and whether the cluster is kept at all (a keeper
/// silent for long, or a helper down).
pub fn keeper_line(k: &KeeperStatus, now: u64) -> String {
    let mut line = pool_line("keeper", &k.default);
    for (name, p) in &k.pools {
        line.push('\n');
        line.push_str(&pool_line(&format!("keeper, pool {name}"), p));
    }
    let age = now.saturating_sub(k.updated);
    if age > KEEPER_SILENT_S {
        line.push_str(&format!(
            "\nNOT KEPT: no word from the keeper for {age}s (its scheduler job is gone or stuck)"
        ));
    } else if !k.helper.running {
        let why = k.helper.last_death.as_deref().unwrap_or("not started yet");
        let when = k
            .helper
            .next_start
            .map(|t| format!("; next start in {}s", t.saturating_sub(now)))
            .unwrap_or_default();
        line.push_str(&format!(
            "\nNOT FULLY KEPT: the keeper's dask helper is down ({why}; {} restarts{when}): \
             no adaptive sizing, no graceful retirement, no connected count meanwhile",
            k.helper.restarts
        ));
    }
    line
}

/// One pool's part of the keeper's line.
fn pool_line(lead: &str, p: &PoolKeeperStatus) -> String {
    let mut line = format!(
        "{lead}: target {} ({}), {} connected, {} pending, {} retiring for their walltime",
        p.target,
        intention(&p.intention),
        p.connected,
        p.pending,
        p.retiring
    );
    if let Some(r) = &p.short_reason {
        line.push_str(&format!("; short: {r}"));
    }
    line
}

/// The keeper writes its record at every decision (every 5 s by default)
/// and when its helper starts or dies: silent longer than this, it is gone.
const KEEPER_SILENT_S: u64 = 60;

#[cfg(test)]
mod tests {
    use super::*;
    use dask_spank_common::records::HelperStatus;

    fn status(helper: HelperStatus, updated: u64) -> KeeperStatus {
        KeeperStatus {
            default: PoolKeeperStatus {
                target: 4,
                intention: Target::Adapt { adapt: [0, 8] },
                pending: 1,
                running: 3,
                retiring: 0,
                connected: 3,
                short_reason: None,
            },
            helper,
            updated,
            pools: Default::default(),
        }
    }

    #[test]
    fn the_keeper_line_says_when_the_cluster_is_not_kept() {
        let up = HelperStatus {
            running: true,
            ..Default::default()
        };
        let l = keeper_line(&status(up.clone(), 1000), 1005);
        assert_eq!(
            l,
            "keeper: target 4 (adaptive 0..8), 3 connected, 1 pending, 0 retiring for their walltime"
        );
        let mut pooled = status(up.clone(), 1000);
        pooled.pools.insert(
            "gpu".into(),
            PoolKeeperStatus {
                target: 2,
                intention: Target::Workers { workers: 2 },
                pending: 1,
                running: 1,
                retiring: 0,
                connected: 1,
                short_reason: Some("sbatch refused 1 of 1 worker jobs: x".into()),
            },
        );
        assert_eq!(
            keeper_line(&pooled, 1005).lines().nth(1),
            Some("keeper, pool gpu: target 2 (fixed), 1 connected, 1 pending, 0 retiring for their walltime; short: sbatch refused 1 of 1 worker jobs: x")
        );
        assert!(keeper_line(&status(up, 1000), 1100)
            .contains("NOT KEPT: no word from the keeper for 100s"));
        let down = HelperStatus {
            running: false,
            restarts: 5,
            last_death: Some("killed by SIGKILL".into()),
            next_start: Some(1016),
            ..Default::default()
        };
        let l = keeper_line(&status(down, 1000), 1000);
        assert!(
            l.contains("NOT FULLY KEPT: the keeper's dask helper is down (killed by SIGKILL; 5 restarts; next start in 16s)"),
            "{l}"
        );
    }
}

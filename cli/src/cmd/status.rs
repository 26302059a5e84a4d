//! `dask-spank status`: every job of a cluster, and why it is not connected.

use crate::cluster::{known, parse_name, unknown, view, Res};
use crate::view::Row;

pub fn print_rows(rows: &[&Row]) {
    println!(
        "{:<12} {:<10} {:<10} {:<8}  REASON",
        "JOB", "ROLE", "STATE", "NODE"
    );
    for r in rows {
        println!(
            "{:<12} {:<10} {:<10} {:<8}  {}",
            r.job, r.role, r.state, r.node, r.reason
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
    if let Some(a) = &v.scheduler_address {
        println!(
            "scheduler {a}, dashboard {}",
            v.dashboard_address.as_deref().unwrap_or("-")
        );
    }
    if let Some(hp) = v
        .dashboard_address
        .as_deref()
        .and_then(|d| d.strip_prefix("http://"))
    {
        let port = hp.rsplit_once(':').map(|(_, p)| p).unwrap_or("8787");
        println!(
            "  from your laptop: ssh -N -L {port}:{hp} {}, then open http://localhost:{port}/status",
            dask_spank_common::sys::short_hostname()
        );
    }
    println!("scheduler file: {}", v.scheduler_file);
    if let Some(k) = crate::target::keeper_status(&crate::cluster::dir_of(&c)?) {
        let intention = match (&k["intention"]["adapt"], &k["intention"]["workers"]) {
            (serde_json::Value::Array(r), _) if r.len() == 2 => {
                format!("adaptive {}..{}", r[0], r[1])
            }
            _ => "fixed".into(),
        };
        println!(
            "keeper: target {} ({intention}), {} connected, {} pending, {} retiring for their walltime{}",
            k["target"], k["connected"], k["pending"], k["retiring"],
            k["short_reason"].as_str().map(|r| format!("; short: {r}")).unwrap_or_default()
        );
    }
    let mut rows: Vec<&Row> = v.scheduler.iter().collect();
    rows.extend(v.workers.iter());
    print_rows(&rows);
    Ok(())
}

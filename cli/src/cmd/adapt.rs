//! `dask-spank adapt`: let the scheduler job size the cluster (or one of
//! its pools) with dask's adaptive target, between a minimum and a maximum
//! of worker jobs.

use crate::cluster::{parse_name, records_of, unknown, view, Res};
use crate::pools::known_pool;
use dask_spank_common::names::PoolName;
use dask_spank_common::records::{ClusterDir, Target};
use dask_spank_common::ClusterName;

/// Size the cluster with dask's adaptive logic, run in the scheduler job.
#[derive(clap::Args, Debug, Clone)]
#[command(
    after_help = "Examples:\n  dask-spank adapt ana 0 16\n  dask-spank adapt ana 0 4 --pool gpu"
)]
pub struct Args {
    pub name: String,
    pub minimum: u32,
    pub maximum: u32,
    /// The pool to size, by the tasks that ask for its worker resources
    /// (default: the default pool, by dask's adaptive target).
    #[arg(long)]
    pub pool: Option<String>,
}

pub fn run(a: Args) -> Res {
    let c = parse_name(&a.name)?;
    if a.minimum > a.maximum {
        return Err(format!(
            "minimum {} exceeds maximum {}",
            a.minimum, a.maximum
        ));
    }
    if view(&c)?.scheduler.is_none() {
        return Err(unknown(&c));
    }
    let dir = records_of(&c)?;
    let pool = known_pool(&dir, c.as_str(), a.pool.as_deref())?;
    if let Some(p) = &pool {
        sizable_by_tasks(&dir, &c, p)?;
    }
    dir.write_target_of(
        pool.as_ref(),
        &Target::Adapt {
            adapt: [a.minimum, a.maximum],
        },
    )
    .map_err(|e| format!("cannot record the target: {e}"))?;
    let by = match &pool {
        Some(p) => format!(" of pool {p}, as many as the tasks asking for its resources fill"),
        None => ", as dask's adaptive target says".into(),
    };
    println!(
        "cluster '{c}': between {} and {} worker jobs{by}; the scheduler job keeps it",
        a.minimum, a.maximum
    );
    Ok(())
}

/// Whether pool `p` can be sized adaptively: its tasks are told by the
/// resources they ask for, so without any the pool cannot be sized by
/// them. Apart from `run` (which asks squeue first) to be tested.
fn sizable_by_tasks(dir: &ClusterDir, c: &ClusterName, p: &PoolName) -> Res {
    if dir
        .worker_args_of(Some(p))
        .is_none_or(|w| w.resources.is_empty())
    {
        return Err(format!(
            "--pool {p}: pool {p} offers no dask worker resources (resources=NAME=AMOUNT), \
             so no task asks for it: give it a fixed size (dask-spank scale {c} N --pool {p})"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dask_spank_common::records::WorkerArgs;

    fn args(name: &str, minimum: u32, maximum: u32) -> Args {
        Args {
            name: name.into(),
            minimum,
            maximum,
            pool: None,
        }
    }

    #[test]
    fn a_range_upside_down_or_a_bad_name_is_refused_before_any_look_at_slurm() {
        assert_eq!(
            run(args("ana", 5, 2)).unwrap_err(),
            "minimum 5 exceeds maximum 2"
        );
        assert!(run(args("-ana", 0, 2))
            .unwrap_err()
            .starts_with("--dask-cluster=-ana: "));
    }

    #[test]
    fn only_a_pool_offering_resources_is_sized_by_its_tasks() {
        let d = std::env::temp_dir().join(format!("dsp-adapt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let dir = ClusterDir(d.clone());
        let (c, p): (ClusterName, PoolName) = ("ana".parse().unwrap(), "gpu".parse().unwrap());
        let refusal = "--pool gpu: pool gpu offers no dask worker resources \
             (resources=NAME=AMOUNT), so no task asks for it: give it a fixed size \
             (dask-spank scale ana N --pool gpu)";
        assert_eq!(sizable_by_tasks(&dir, &c, &p).unwrap_err(), refusal);
        let mut w = WorkerArgs::default();
        dir.write_worker_args_of(Some(&p), &w).unwrap();
        assert_eq!(sizable_by_tasks(&dir, &c, &p).unwrap_err(), refusal);
        w.resources = vec![("GPU".into(), 1.0)];
        dir.write_worker_args_of(Some(&p), &w).unwrap();
        assert_eq!(sizable_by_tasks(&dir, &c, &p), Ok(()));
        std::fs::remove_dir_all(&d).unwrap();
    }
}

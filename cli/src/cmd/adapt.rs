//! `dask-spank adapt`: let the scheduler job size the cluster with dask's
//! adaptive target, between a minimum and a maximum of worker jobs.

use crate::cluster::{parse_name, records_of, unknown, view, Res};
use crate::target::record;
use dask_spank_common::records::Target;

/// Size the cluster with dask's adaptive logic, run in the scheduler job.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Example:\n  dask-spank adapt ana 0 16")]
pub struct Args {
    pub name: String,
    pub minimum: u32,
    pub maximum: u32,
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
    record(
        &records_of(&c)?,
        &Target::Adapt {
            adapt: [a.minimum, a.maximum],
        },
    )?;
    println!(
        "cluster '{c}': between {} and {} worker jobs, as dask's adaptive target says; the scheduler job keeps it",
        a.minimum, a.maximum
    );
    Ok(())
}

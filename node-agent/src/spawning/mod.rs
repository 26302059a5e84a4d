//! Making the job's processes, as its user: the [`spawner`] process
//! (the agent itself never forks) through [`spawn`] and [`launch`], the
//! per-job fork server ([`forkserver`]), dask's command lines
//! ([`dask_cmd`], [`python_boot`]) and environment ([`jobenv`]), the
//! process groups once started ([`process`], [`child`]) and the job's log
//! ([`joblog`]). Uses only `system`.

pub mod child;
pub mod dask_cmd;
pub mod forkserver;
pub mod jobenv;
pub mod joblog;
pub mod launch;
pub mod process;
pub mod python_boot;
pub mod spawn;
pub mod spawner;

//! `dask-spank layout NAME` (hidden): the files of a cluster directory, as
//! JSON, for the Python package and its test (one layout, no drift).

use crate::cluster::{dir_of, parse_name, Res};
use dask_spank_common::paths::layout::ALL;

/// The paths of a cluster's files (JSON).
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    pub name: String,
}

pub fn run(a: Args) -> Res {
    let dir = dir_of(&parse_name(&a.name)?)?;
    let mut m = serde_json::Map::new();
    m.insert("cluster_dir".into(), dir.to_string_lossy().into());
    for (key, file) in ALL {
        m.insert((*key).into(), dir.join(file).to_string_lossy().into());
    }
    println!("{}", serde_json::Value::Object(m));
    Ok(())
}

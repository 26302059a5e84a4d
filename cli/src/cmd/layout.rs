//! `dask-spank layout [NAME]` (hidden): the files of a cluster directory,
//! as JSON, for the Python package and its test (one layout, no drift).
//! Without a name: every cluster directory of the user, by name.

use crate::cluster::{dir_of, parse_name, root, Res};
use dask_spank_common::paths::layout::ALL;
use std::path::Path;

/// The paths of a cluster's files (JSON).
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    pub name: Option<String>,
}

fn files(dir: &Path) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("cluster_dir".into(), dir.to_string_lossy().into());
    for (key, file) in ALL {
        m.insert((*key).into(), dir.join(file).to_string_lossy().into());
    }
    serde_json::Value::Object(m)
}

pub fn run(a: Args) -> Res {
    if let Some(name) = a.name {
        println!("{}", files(&dir_of(&parse_name(&name)?)?));
        return Ok(());
    }
    let mut all = serde_json::Map::new();
    let clusters = root()?.join("clusters");
    for e in std::fs::read_dir(&clusters).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Ok(c) = parse_name(&name) {
            all.insert(name, files(&dir_of(&c)?));
        }
    }
    println!(
        "{}",
        serde_json::json!({"clusters_dir": clusters, "clusters": all})
    );
    Ok(())
}

//! Worker pools as the commands take them: `up --pool
//! gpu:workers=2,gres=gpu:1,resources=GPU=1` (repeatable), and `--pool
//! NAME` of `scale` and `adapt`; or a TOML file of pools (`up --pools
//! FILE`), by the same rules. A pool is a kind of worker of the cluster
//! with its own sbatch options, dask worker resources and size; the
//! default pool is the cluster's plain workers (`--workers`, `--worker-*`).

use crate::target::parse_range;
use dask_spank_common::names::PoolName;
use dask_spank_common::records::{ClusterDir, Target};
use std::path::Path;

/// The keys of `--pool NAME:KEY=VALUE,...`.
const KEYS: &str =
    "workers, adapt, gres, resources, partition, mem, cpus, time, constraint, sbatch, worker_class";

/// The environment variable that names a pool's worker class to the boot
/// code of its workers (python/dask_spank/boot.py, `WORKER_CLASS_ENV`).
pub const WORKER_CLASS_ENV: &str = "DASK_SPANK_WORKER_CLASS";

/// One `--pool` of `up`.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSpec {
    pub name: PoolName,
    pub workers: u32,
    /// MIN, MAX: sized by the tasks asking for its resources.
    pub adapt: Option<(u32, u32)>,
    /// Its worker resources, `NAME=AMOUNT` (dask's `--resources`).
    pub resources: Vec<String>,
    /// Its sbatch options (`--gres=gpu:1`, ...), in the order given.
    pub sbatch: Vec<String>,
    /// Its dask worker class (`MODULE.CLASS`, a `distributed.Worker`).
    pub worker_class: Option<String>,
}

impl PoolSpec {
    /// The size its keeper holds, and how many jobs `up` submits at once.
    pub fn target(&self) -> (Target, u32) {
        match self.adapt {
            Some((lo, hi)) => (Target::Adapt { adapt: [lo, hi] }, lo),
            None => (
                Target::Workers {
                    workers: self.workers,
                },
                self.workers,
            ),
        }
    }
}

/// Parse `NAME:KEY=VALUE,...`; an error is one line naming the option,
/// its value and what is wrong.
pub fn parse(s: &str) -> Result<PoolSpec, String> {
    let (name, rest) = s.split_once(':').unwrap_or((s, ""));
    let pairs = rest
        .split(',')
        .filter(|kv| !kv.is_empty())
        .map(
            |kv| match kv.split_once('=').filter(|(_, v)| !v.is_empty()) {
                Some((k, v)) => Ok((k.to_string(), v.to_string())),
                None => Err(format!(
                    "--pool {s}: {kv}: must be KEY=VALUE (keys: {KEYS})"
                )),
            },
        )
        .collect::<Result<Vec<_>, _>>()?;
    build(&format!("--pool {s}"), name, &pairs)
}

/// A pool from its name and its `KEY=VALUE` pairs (of `--pool` or of a
/// `--pools` file: one set of rules for both); errors start with `label`.
fn build(label: &str, name: &str, pairs: &[(String, String)]) -> Result<PoolSpec, String> {
    let bad = |why: String| format!("{label}: {why}");
    let name: PoolName = name
        .parse()
        .map_err(|e| bad(format!("{e}").replace("--dask-pool=", "pool name ")))?;
    let mut p = PoolSpec {
        name,
        workers: 1,
        adapt: None,
        resources: vec![],
        sbatch: vec![],
        worker_class: None,
    };
    for (k, v) in pairs {
        let flag = |f: &str| format!("--{f}={v}");
        match k.as_str() {
            "workers" => {
                p.workers = v
                    .parse()
                    .map_err(|_| bad(format!("workers={v}: must be a whole number")))?
            }
            "adapt" => {
                p.adapt = Some(parse_range(v).map_err(|_| {
                    bad(format!(
                        "adapt={v}: must be MIN:MAX, two whole numbers with MIN <= MAX"
                    ))
                })?)
            }
            "resources" => {
                if !is_resource(v) {
                    return Err(bad(format!(
                        "resources={v}: must be NAME=AMOUNT, e.g. GPU=1"
                    )));
                }
                p.resources.push(v.to_string());
            }
            "gres" | "partition" | "time" | "constraint" => p.sbatch.push(flag(k)),
            "mem" => p.sbatch.push(flag("mem")),
            "cpus" => {
                v.parse::<u32>()
                    .map_err(|_| bad(format!("cpus={v}: must be a whole number")))?;
                p.sbatch.push(flag("cpus-per-task"));
            }
            "sbatch" if v.starts_with('-') => p.sbatch.push(v.to_string()),
            "sbatch" => {
                return Err(bad(format!(
                    "sbatch={v}: must be an sbatch option, e.g. sbatch=--reservation=r1"
                )))
            }
            "worker_class" if is_dotted_name(v) => p.worker_class = Some(v.to_string()),
            "worker_class" => {
                return Err(bad(format!(
                    "worker_class={v}: must be MODULE.CLASS, a subclass of distributed.Worker"
                )))
            }
            _ => return Err(bad(format!("unknown key '{k}' (keys: {KEYS})"))),
        }
    }
    // Its tasks are told by the resources they ask for: without any, a
    // pool cannot be sized by them.
    if p.adapt.is_some() && p.resources.is_empty() {
        return Err(bad(
            "adapt needs resources=NAME=AMOUNT (a pool grows with the tasks that ask for them)"
                .into(),
        ));
    }
    Ok(p)
}

/// The pools of a `--pools FILE`: a TOML table per pool whose keys are
/// those of `--pool`, a list for a repeatable key and a table for the
/// resources:
///
/// ```toml
/// [gpu]
/// workers = 4
/// gres = "gpu:1"
/// resources = { GPU = 1 }
/// sbatch = ["--reservation=ana"]
/// ```
pub fn parse_file(path: &Path) -> Result<Vec<PoolSpec>, String> {
    let label = format!("--pools {}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| format!("{label}: {e}"))?;
    let doc: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        // toml's message spans lines (the line, a caret): its first line
        // and where.
        let first = e.message().lines().next().unwrap_or("").to_string();
        match e.span() {
            Some(sp) => format!(
                "{label}: line {}: {first}",
                text[..sp.start.min(text.len())].lines().count().max(1)
            ),
            None => format!("{label}: {first}"),
        }
    })?;
    let mut pools = Vec::new();
    for (name, table) in &doc {
        let at = format!("{label}: [{name}]");
        let toml::Value::Table(table) = table else {
            return Err(format!("{at}: must be a table of the pool's keys"));
        };
        let mut pairs = Vec::new();
        for (k, v) in table {
            let scalar = |v: &toml::Value| match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                _ => Err(format!("{at}: {k}: must be a string or a number")),
            };
            match v {
                toml::Value::Table(r) if k == "resources" => {
                    for (n, a) in r {
                        pairs.push((k.clone(), format!("{n}={}", scalar(a)?)));
                    }
                }
                toml::Value::Array(items) => {
                    for item in items {
                        pairs.push((k.clone(), scalar(item)?));
                    }
                }
                v => pairs.push((k.clone(), scalar(v)?)),
            }
        }
        pools.push(build(&at, name, &pairs)?);
    }
    Ok(pools)
}

/// `MODULE.CLASS`: dotted Python identifiers (the boot code imports it).
fn is_dotted_name(v: &str) -> bool {
    let words: Vec<&str> = v.split('.').collect();
    words.len() >= 2
        && words.iter().all(|w| {
            w.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && w.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

/// `NAME=AMOUNT`, as dask takes a worker resource.
fn is_resource(r: &str) -> bool {
    r.split_once('=').is_some_and(|(n, a)| {
        !n.is_empty()
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && a.parse::<f64>().is_ok_and(|a| a.is_finite() && a >= 0.0)
    })
}

/// The resources as numbers, for the keeper (`WorkerArgs::resources`).
pub fn amounts(resources: &[String]) -> Vec<(String, f64)> {
    resources
        .iter()
        .filter_map(|r| {
            let (n, a) = r.split_once('=')?;
            Some((n.to_string(), a.parse().ok()?))
        })
        .collect()
}

/// Every pool of `up`: its `--pool`s and those of its `--pools` file, each
/// name once.
pub fn parse_all(specs: &[String], file: Option<&Path>) -> Result<Vec<PoolSpec>, String> {
    let mut pools: Vec<PoolSpec> = match file {
        Some(f) => parse_file(f)?,
        None => vec![],
    };
    for s in specs {
        let p = parse(s)?;
        if pools.iter().any(|q| q.name == p.name) {
            return Err(format!("--pool {s}: pool {} is given twice", p.name));
        }
        pools.push(p);
    }
    Ok(pools)
}

/// `--pool NAME` of `scale` and `adapt`: None for the default pool; a
/// pool the cluster has (its worker options recorded by `up`, or by its
/// first job submitted by hand).
pub fn known_pool(
    dir: &ClusterDir,
    cluster: &str,
    pool: Option<&str>,
) -> Result<Option<PoolName>, String> {
    let Some(s) = pool else { return Ok(None) };
    let p = PoolName::parse_opt(s).map_err(|e| {
        format!(
            "--pool {s}: {}",
            format!("{e}").replace("--dask-pool=", "pool name ")
        )
    })?;
    match p {
        Some(p) if dir.worker_args_of(Some(&p)).is_none() => Err(format!(
            "--pool {p}: cluster '{cluster}' has no pool {p} (`dask-spank up {cluster} --pool {p}:workers=N,...` makes one)"
        )),
        p => Ok(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_parse_into_sbatch_options_resources_and_a_size() {
        let p = parse("gpu:workers=2,gres=gpu:1,resources=GPU=1,partition=gpu,mem=4G,cpus=2,time=1:00:00,sbatch=--reservation=r")
            .unwrap();
        assert_eq!(p.name.as_str(), "gpu");
        assert_eq!(p.target(), (Target::Workers { workers: 2 }, 2));
        assert_eq!(p.resources, ["GPU=1"]);
        assert_eq!(
            p.sbatch,
            [
                "--gres=gpu:1",
                "--partition=gpu",
                "--mem=4G",
                "--cpus-per-task=2",
                "--time=1:00:00",
                "--reservation=r"
            ]
        );
        assert_eq!(amounts(&p.resources), [("GPU".to_string(), 1.0)]);
        let a = parse("big:adapt=0:4,resources=MEM=64e9").unwrap();
        assert!(parse("big:adapt=0:4")
            .unwrap_err()
            .contains("adapt needs resources"));
        assert_eq!(a.target(), (Target::Adapt { adapt: [0, 4] }, 0));
        assert_eq!(parse("cpu").unwrap().target().1, 1);
        assert_eq!(
            parse("gpu:worker_class=my_pkg.workers.GpuWorker")
                .unwrap()
                .worker_class
                .as_deref(),
            Some("my_pkg.workers.GpuWorker")
        );
    }

    #[test]
    fn a_bad_pool_is_one_line_naming_it() {
        let cases = [
            ("gpu:workrs=2", "--pool gpu:workrs=2: unknown key 'workrs' (keys: workers, adapt, gres, resources, partition, mem, cpus, time, constraint, sbatch, worker_class)"),
            ("gpu:workers=two", "--pool gpu:workers=two: workers=two: must be a whole number"),
            ("gpu:resources=GPU", "--pool gpu:resources=GPU: resources=GPU: must be NAME=AMOUNT, e.g. GPU=1"),
            ("gpu:adapt=4:1", "--pool gpu:adapt=4:1: adapt=4:1: must be MIN:MAX, two whole numbers with MIN <= MAX"),
            ("gpu:gres", "--pool gpu:gres: gres: must be KEY=VALUE (keys: workers, adapt, gres, resources, partition, mem, cpus, time, constraint, sbatch, worker_class)"),
            ("1gpu:workers=1", "--pool 1gpu:workers=1: pool name 1gpu: must start with a letter"),
            ("default:workers=1", "--pool default:workers=1: pool name default: is the default pool: leave --dask-pool out"),
            ("gpu:sbatch=x", "--pool gpu:sbatch=x: sbatch=x: must be an sbatch option, e.g. sbatch=--reservation=r1"),
            ("gpu:worker_class=Worker", "--pool gpu:worker_class=Worker: worker_class=Worker: must be MODULE.CLASS, a subclass of distributed.Worker"),
            ("gpu:worker_class=a.$(x)", "--pool gpu:worker_class=a.$(x): worker_class=a.$(x): must be MODULE.CLASS, a subclass of distributed.Worker"),
        ];
        for (s, want) in cases {
            assert_eq!(parse(s).unwrap_err(), want);
        }
        assert_eq!(
            parse_all(&["gpu".into(), "gpu:workers=2".into()], None).unwrap_err(),
            "--pool gpu:workers=2: pool gpu is given twice"
        );
    }

    fn file(text: &str) -> Result<Vec<PoolSpec>, String> {
        let dir = std::env::temp_dir().join(format!("pools-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join(format!("{}.toml", text.len()));
        std::fs::write(&f, text).unwrap();
        parse_file(&f).map_err(|e| e.replace(&f.display().to_string(), "F"))
    }

    #[test]
    fn a_pools_file_gives_the_same_pools_as_the_options() {
        let got = file(
            "[gpu]\nworkers = 2\ngres = \"gpu:1\"\nresources = { GPU = 1 }\nmem = \"4G\"\nsbatch = [\"--reservation=r\"]\n\n[big]\nadapt = \"0:4\"\nresources = { MEM = 64e9 }\n",
        )
        .unwrap();
        let want = parse("gpu:workers=2,gres=gpu:1,resources=GPU=1,mem=4G,sbatch=--reservation=r")
            .unwrap();
        let gpu = got.iter().find(|p| p.name.as_str() == "gpu").unwrap();
        assert_eq!(gpu.target(), want.target());
        assert_eq!(gpu.resources, want.resources);
        assert_eq!(
            gpu.sbatch.iter().collect::<std::collections::BTreeSet<_>>(),
            want.sbatch.iter().collect()
        );
        let big = got.iter().find(|p| p.name.as_str() == "big").unwrap();
        assert_eq!(big.target(), (Target::Adapt { adapt: [0, 4] }, 0));
        assert_eq!(amounts(&big.resources), [("MEM".to_string(), 64e9)]);
    }

    #[test]
    fn a_bad_pools_file_is_one_line_naming_the_file_the_pool_and_the_key() {
        let cases = [
            ("[gpu]\nworkrs = 2\n", "--pools F: [gpu]: unknown key 'workrs' (keys: workers, adapt, gres, resources, partition, mem, cpus, time, constraint, sbatch, worker_class)"),
            ("[gpu]\nworkers = \"two\"\n", "--pools F: [gpu]: workers=two: must be a whole number"),
            ("[gpu]\nresources = { GPU = \"x\" }\n", "--pools F: [gpu]: resources=GPU=x: must be NAME=AMOUNT, e.g. GPU=1"),
            ("[gpu]\nworkers = true\n", "--pools F: [gpu]: workers: must be a string or a number"),
            ("gpu = 2\n", "--pools F: [gpu]: must be a table of the pool's keys"),
            ("[default]\nworkers = 1\n", "--pools F: [default]: pool name default: is the default pool: leave --dask-pool out"),
        ];
        for (text, want) in cases {
            assert_eq!(file(text).unwrap_err(), want, "{text}");
        }
        let e = file("[gpu]\nworkers = 2\ngres = gpu:1\n").unwrap_err();
        assert!(e.starts_with("--pools F: line 3: "), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = parse_file(Path::new("/nonexistent/pools.toml")).unwrap_err();
        assert!(
            e.starts_with("--pools /nonexistent/pools.toml: No such file"),
            "{e}"
        );
    }
}

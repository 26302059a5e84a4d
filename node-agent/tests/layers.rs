//! The shape of the two supervisors, checked: the agent's modules and the
//! job-side runtime's (`cli/src/runtime`) use each other without a circle
//! (each module only uses modules of lower layers), and no function of
//! any crate is longer than a screen. Run `cargo test -p dask-node-agent
//! --test layers -- --nocapture` to see the layers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Longest function body allowed, in lines.
const MAX_FN_LINES: usize = 80;

fn sources() -> BTreeMap<String, String> {
    tree(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
}

/// The job-side runtime's modules (`mod.rs` named after its directory).
fn runtime_sources() -> BTreeMap<String, String> {
    tree(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../cli/src/runtime"))
}

/// Every `.rs` file under `dir`, by module name.
fn tree(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).expect("src").flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(tree(&p));
            continue;
        }
        if p.extension().is_none_or(|x| x != "rs") {
            continue;
        }
        let stem = p.file_stem().expect("stem").to_string_lossy().into_owned();
        let name = if stem == "mod" {
            dir.file_name().expect("dir").to_string_lossy().into_owned()
        } else {
            stem
        };
        out.insert(name, std::fs::read_to_string(&p).expect("read"));
    }
    out
}

/// The runtime's modules that `text` uses: `name::` as a path's first
/// segment, or after `super::`, `self::`, `crate::runtime::`, `keeper::`.
fn runtime_uses(text: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let code = code(text);
    modules
        .iter()
        .filter(|m| {
            code.match_indices(&format!("{m}::")).any(|(i, _)| {
                let before = &code[..i];
                let first = !before
                    .chars()
                    .last()
                    .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
                first
                    || ["super::", "self::", "crate::runtime::", "keeper::"]
                        .iter()
                        .any(|p| before.ends_with(p))
            })
        })
        .cloned()
        .collect()
}

/// The code of a file before its tests.
fn code(text: &str) -> &str {
    text.split("#[cfg(test)]").next().unwrap_or(text)
}

/// The agent's modules that `text` uses (`crate::x`, `use crate::{x, y}`).
fn uses(text: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let code = code(text);
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + 7..];
        let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
            group.split('}').next().unwrap_or("").split(',').collect()
        } else {
            vec![rest]
        };
        for n in names {
            let n: String = n
                .trim()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if modules.contains(&n) {
                out.insert(n);
            }
        }
    }
    out
}

#[test]
fn modules_form_layers_without_a_circle() {
    let src = sources();
    let modules: BTreeSet<String> = src
        .keys()
        .filter(|m| *m != "lib" && *m != "main")
        .cloned()
        .collect();
    let graph: BTreeMap<String, BTreeSet<String>> = modules
        .iter()
        .map(|m| {
            let mut u = uses(&src[m], &modules);
            u.remove(m);
            (m.clone(), u)
        })
        .collect();
    layers(&modules, &graph);
}

#[test]
fn the_runtimes_modules_form_layers_without_a_circle() {
    let src = runtime_sources();
    let modules: BTreeSet<String> = src.keys().cloned().collect();
    assert!(
        modules.contains("keeper") && modules.contains("decide"),
        "{modules:?}"
    );
    let graph: BTreeMap<String, BTreeSet<String>> = modules
        .iter()
        .map(|m| {
            let mut u = runtime_uses(&src[m], &modules);
            u.remove(m);
            (m.clone(), u)
        })
        .collect();
    layers(&modules, &graph);
    // The keeper's decisions are pure: they use no other module.
    assert!(graph["decide"].is_empty(), "{:?}", graph["decide"]);
}

/// Peel `graph` into layers, printing them; panic on a circle.
fn layers(modules: &BTreeSet<String>, graph: &BTreeMap<String, BTreeSet<String>>) {
    // Peel off layers: modules whose uses are all in lower layers.
    let mut placed: BTreeSet<String> = BTreeSet::new();
    let mut layer = 0;
    while placed.len() < modules.len() {
        let next: Vec<String> = modules
            .iter()
            .filter(|m| !placed.contains(*m) && graph[*m].iter().all(|d| placed.contains(d)))
            .cloned()
            .collect();
        if next.is_empty() {
            let left: Vec<_> = modules.difference(&placed).collect();
            let edges: Vec<String> = left
                .iter()
                .map(|m| {
                    format!(
                        "{m} -> {:?}",
                        graph[*m]
                            .iter()
                            .filter(|d| !placed.contains(*d))
                            .collect::<Vec<_>>()
                    )
                })
                .collect();
            panic!(
                "the modules {left:?} use each other in a circle:\n{}",
                edges.join("\n")
            );
        }
        println!("layer {layer}: {}", next.join(", "));
        placed.extend(next);
        layer += 1;
    }
}

#[test]
fn no_function_is_longer_than_a_screen() {
    let mut long = Vec::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let crates = ["node-agent", "cli", "spank-plugin", "common"];
    let every = crates.iter().flat_map(|c| {
        tree(&root.join(c).join("src"))
            .into_iter()
            .map(move |(m, text)| (format!("{c}/{m}"), text))
    });
    for (name, text) in every {
        let lines: Vec<&str> = code(&text).lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let t = l.trim_start();
            let is_fn = t.starts_with("fn ")
                || t.starts_with("pub fn ")
                || t.starts_with("async fn ")
                || t.starts_with("pub async fn ")
                || t.starts_with("pub(crate) fn ");
            if !is_fn {
                continue;
            }
            let indent = l.len() - t.len();
            // The body ends at the first `}` at the function's indentation.
            let end = lines[i + 1..]
                .iter()
                .position(|x| {
                    x.len() > indent && x[..indent + 1] == format!("{}}}", " ".repeat(indent))
                })
                .map(|p| p + 1)
                .unwrap_or(0);
            if end > MAX_FN_LINES {
                long.push(format!("{name}.rs:{}: {} lines: {}", i + 1, end, t));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FN_LINES} lines:\n{}",
        long.join("\n")
    );
}

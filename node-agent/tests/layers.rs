//! The shape of the two supervisors, checked: the agent's modules and the
//! job-side runtime's (`cli/src/runtime`) use each other without a circle
//! (each module only uses modules of lower layers), the agent's folders
//! are its layers (a module uses only its own folder and those below),
//! and no function of any crate is longer than a screen. Run `cargo test -p dask-node-agent
//! --test layers -- --nocapture` to see the layers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Longest function body allowed, in lines.
const MAX_FN_LINES: usize = 80;

/// The agent's folders, from the lowest layer up; `top` stands for the
/// modules at the crate's root (`daemon`, `siteops`).
const FOLDERS: [&str; 5] = ["system", "spawning", "supervision", "socket", "top"];

/// The agent's modules: name -> (folder, text).
fn agent_modules() -> BTreeMap<String, (String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(&src).expect("src").flatten() {
        let p = e.path();
        let name = p.file_stem().expect("stem").to_string_lossy().into_owned();
        if p.is_dir() {
            assert!(
                FOLDERS.contains(&name.as_str()),
                "folder {name} is not in the layers' order (FOLDERS)"
            );
            for (m, text) in tree(&p) {
                if m != name {
                    out.insert(m, (name.clone(), text));
                }
            }
        } else if p.extension().is_some_and(|x| x == "rs") && name != "lib" && name != "main" {
            out.insert(
                name,
                (
                    "top".to_string(),
                    std::fs::read_to_string(&p).expect("read"),
                ),
            );
        }
    }
    out
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

/// The paths a `use` tree or a path starting at `s` names, groups
/// expanded: `crate::{a::b, c::{d, e}}` gives `crate::a::b`, `crate::c::d`
/// and `crate::c::e`.
fn paths(s: &str) -> Vec<String> {
    let head: String = s
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
        .collect();
    let rest = &s[head.len()..];
    if !head.ends_with("::") || !rest.starts_with('{') {
        return vec![head.trim_end_matches(':').to_string()];
    }
    let (mut depth, mut start, mut items) = (0, 1, vec![]);
    for (i, c) in rest.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 1 => {
                items.push(&rest[start..i]);
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 1 => {
                items.push(&rest[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items
        .iter()
        .filter(|it| !it.trim().is_empty())
        .flat_map(|it| paths(it.trim()))
        .map(|p| format!("{head}{p}"))
        .collect()
}

/// The agent's modules that `text` uses: `crate::FOLDER::MODULE` or, for
/// the root's own, `crate::MODULE`, in paths and `use` groups.
fn uses(text: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let code = code(text);
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        for p in paths(&code[i..]) {
            let mut seg = p.split("::").skip(1);
            let (first, second) = (seg.next().unwrap_or(""), seg.next().unwrap_or(""));
            let m = if FOLDERS.contains(&first) {
                second
            } else {
                first
            };
            if modules.contains(m) {
                out.insert(m.to_string());
            }
        }
    }
    out
}

#[test]
fn paths_of_use_groups_are_expanded() {
    assert_eq!(
        paths("crate::{a::b, c::{d, e}};"),
        ["crate::a::b", "crate::c::d", "crate::c::e"]
    );
    assert_eq!(
        paths("crate::system::procfs::stat(1)"),
        ["crate::system::procfs::stat"]
    );
}

/// The agent's modules use each other without a circle, and each only
/// the modules of its own folder and of the folders below.
#[test]
fn modules_form_layers_without_a_circle_and_folders_are_layers() {
    let src = agent_modules();
    let modules: BTreeSet<String> = src.keys().cloned().collect();
    assert!(
        modules.contains("procfs") && modules.contains("daemon"),
        "{modules:?}"
    );
    let rank = |m: &str| FOLDERS.iter().position(|f| *f == src[m].0).unwrap_or(0);
    let mut upward = vec![];
    let graph: BTreeMap<String, BTreeSet<String>> = modules
        .iter()
        .map(|m| {
            let mut u = uses(&src[m].1, &modules);
            u.remove(m);
            for d in u.iter().filter(|d| rank(d) > rank(m)) {
                upward.push(format!("{}/{m} uses {}/{d}", src[m].0, src[d].0));
            }
            (m.clone(), u)
        })
        .collect();
    assert!(
        upward.is_empty(),
        "a module uses a higher folder:\n{}",
        upward.join("\n")
    );
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

//! The audit surface, measured: the lines of each `src/` file before its
//! first `#[cfg(test)]` (what someone who runs the hook as root reads), the
//! library modules the hook reaches, and the import graph between modules.
//!
//! Fails when `src/` is over 5,000 lines or a file over 700, when the hook's
//! own code is over 350 or what it reaches over 1,500, or when modules import
//! each other in a circle. Run with `--nocapture` to see the table (`.ci/run`
//! does).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

const MAX_TOTAL: usize = 5_000;
const MAX_FILE: usize = 700;
const MAX_HOOK_OWN: usize = 350;
const MAX_HOOK_REACH: usize = 1_500;

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).expect("read src/") {
        let path = entry.expect("read src/ entry").path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// The production part of a file: its lines before `#[cfg(test)]`.
fn production(text: &str) -> Vec<&str> {
    text.lines()
        .take_while(|l| l.trim() != "#[cfg(test)]")
        .collect()
}

/// The modules of `prefix` (`crate` or `npbhq`) that `code` names:
/// `prefix::a`, `prefix::{a, b::c}`. Exported macros (`info!`, ...) are
/// `log`'s.
fn imports(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let needle = format!("{prefix}::");
    let mut rest = code;
    while let Some(at) = rest.find(&needle) {
        rest = &rest[at + needle.len()..];
        let group = rest
            .strip_prefix('{')
            .map(|g| &g[..g.find('}').unwrap_or(g.len())]);
        for name in group.map_or(vec![rest], |g| g.split(',').collect()) {
            let name = name.trim();
            let end = name.find(|c: char| !(c.is_alphanumeric() || c == '_'));
            let name = &name[..end.unwrap_or(name.len())];
            let name = match name {
                "info" | "warning" | "error" => "log",
                _ => name,
            };
            if name.starts_with(|c: char| c.is_lowercase()) {
                found.insert(name.to_string());
            }
        }
    }
    found
}

/// A circle through `graph` reachable from `node`, if any.
fn circle(
    graph: &BTreeMap<String, BTreeSet<String>>,
    node: &str,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if let Some(at) = path.iter().position(|n| n == node) {
        let mut found = path[at..].to_vec();
        found.push(node.to_string());
        return Some(found);
    }
    if done.contains(node) {
        return None;
    }
    path.push(node.to_string());
    for next in graph.get(node).into_iter().flatten() {
        if let Some(found) = circle(graph, next, path, done) {
            return Some(found);
        }
    }
    path.pop();
    done.insert(node.to_string());
    None
}

#[test]
fn audit_surface() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut lines = BTreeMap::new();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let (mut total, mut hook_own, mut hook_uses) = (0, 0, BTreeSet::new());
    let mut problems = Vec::new();
    for file in rust_files(&src) {
        let text = fs::read_to_string(&file).expect("read source");
        let code = production(&text);
        let count = code.len();
        total += count;
        let name = file.strip_prefix(&src).unwrap().display().to_string();
        println!("{count:5} src/{name}");
        if count > MAX_FILE {
            problems.push(format!("src/{name} has {count} lines (at most {MAX_FILE})"));
        }
        let code = code.join("\n");
        if name.starts_with("bin/post-build-hook/") {
            hook_own += count;
            hook_uses.extend(imports(&code, "npbhq"));
        } else if !name.starts_with("bin/") && name != "lib.rs" {
            let module = name.trim_end_matches(".rs").to_string();
            let mut uses = imports(&code, "crate");
            uses.remove(&module);
            lines.insert(module.clone(), count);
            graph.insert(module, uses);
        }
    }
    println!("{total:5} in all (at most {MAX_TOTAL})");
    if total > MAX_TOTAL {
        problems.push(format!("src/ has {total} lines (at most {MAX_TOTAL})"));
    }

    // What the hook reaches: its imports and theirs.
    let mut reach = BTreeSet::new();
    let mut todo: Vec<String> = hook_uses.into_iter().collect();
    while let Some(module) = todo.pop() {
        if reach.insert(module.clone()) {
            todo.extend(graph.get(&module).into_iter().flatten().cloned());
        }
    }
    let reach_lines: usize = reach.iter().filter_map(|m| lines.get(m)).sum();
    println!("{hook_own:5} the hook's own code (at most {MAX_HOOK_OWN})");
    println!("{reach_lines:5} library lines it reaches (at most {MAX_HOOK_REACH}): {reach:?}");
    if hook_own > MAX_HOOK_OWN {
        problems.push(format!("the hook's own code has {hook_own} lines"));
    }
    if reach_lines > MAX_HOOK_REACH {
        problems.push(format!(
            "the hook reaches {reach_lines} library lines: {reach:?}"
        ));
    }

    let mut done = BTreeSet::new();
    for module in graph.keys() {
        if let Some(found) = circle(&graph, module, &mut Vec::new(), &mut done) {
            problems.push(format!(
                "modules import each other in a circle: {}",
                found.join(" -> ")
            ));
            break;
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn imports_are_read_from_use_lines_and_paths() {
    let code = "use crate::{drv, info, sys::uid};\nlet x = crate::journal::Journal::open();";
    let found: Vec<String> = imports(code, "crate").into_iter().collect();
    assert_eq!(found, ["drv", "journal", "log", "sys"]);
    let mut graph = BTreeMap::new();
    graph.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    graph.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
    let found = circle(&graph, "a", &mut Vec::new(), &mut BTreeSet::new());
    assert_eq!(found.unwrap(), ["a", "b", "a"]);
}

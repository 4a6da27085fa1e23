//! The engine's own shape, checked from its source: the modules of `engine/src` import
//! each other without a cycle (each layer knows only those below it), and which path a
//! request travels is decided in `peer.rs` alone.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every library source file (test-only files excluded) with its module path.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, prefix: &str, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).expect("read src") {
            let path = entry.expect("entry").path();
            let name = path.file_stem().unwrap().to_string_lossy().to_string();
            if path.is_dir() {
                walk(&path, &format!("{prefix}{name}::"), out);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") || name.ends_with("_tests") {
                continue;
            }
            let module = match name.as_str() {
                "lib" => "crate".to_string(),
                "mod" => prefix.trim_end_matches("::").to_string(),
                _ => format!("{prefix}{name}"),
            };
            let text = std::fs::read_to_string(&path).expect("read file");
            out.insert(module, text);
        }
    }
    let mut out = BTreeMap::new();
    walk(&src(), "", &mut out);
    out
}

/// The code of a file without comments and without its `#[cfg(test)]` tail.
fn code(text: &str) -> String {
    let body = text.split("#[cfg(test)]").next().unwrap_or(text);
    body.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths a file names after `crate::` or `super::`, brace groups expanded one level
/// (`crate::{a, b::c}` gives `a` and `b::c`).
fn named_paths(code: &str, module: &str) -> Vec<String> {
    let inline = inline_module_depths(code);
    let mut out = Vec::new();
    for anchor in ["crate::", "super::"] {
        let mut rest = code;
        while let Some(at) = rest.find(anchor) {
            let before = rest[..at].chars().next_back();
            let position = code.len() - rest.len() + at;
            rest = &rest[at + anchor.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            // `super` inside an inline `mod x { .. }` is the file's own module.
            let base = match anchor {
                "crate::" => String::new(),
                _ if inline[position] > 0 => module.to_string(),
                _ => parent(module),
            };
            let prefix = |p: &str| {
                if base.is_empty() {
                    p.to_string()
                } else {
                    format!("{base}::{p}")
                }
            };
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                out.extend(
                    group[..end]
                        .split(',')
                        .map(|p| p.trim())
                        .filter(|p| !p.is_empty())
                        .map(prefix),
                );
            } else {
                let end = rest
                    .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                    .unwrap_or(rest.len());
                out.push(prefix(rest[..end].trim_end_matches(':')));
            }
        }
    }
    out
}

/// For every byte of `code`, how many inline `mod name {` blocks enclose it.
fn inline_module_depths(code: &str) -> Vec<u8> {
    let bytes = code.as_bytes();
    let mut out = vec![0u8; bytes.len() + 1];
    // Brace depth at which each open inline module started.
    let mut opened: Vec<usize> = Vec::new();
    let mut depth = 0usize;
    for i in 0..bytes.len() {
        match bytes[i] {
            b'{' => {
                let head = code[..i].trim_end();
                let last = head.rsplit(|c: char| c.is_whitespace()).nth(1);
                if last == Some("mod") {
                    opened.push(depth);
                }
                depth += 1;
            }
            b'}' => {
                depth = depth.saturating_sub(1);
                if opened.last() == Some(&depth) {
                    opened.pop();
                }
            }
            _ => {}
        }
        out[i] = opened.len() as u8;
    }
    out
}

fn parent(module: &str) -> String {
    module
        .rsplit_once("::")
        .map_or(String::new(), |(p, _)| p.to_string())
}

/// Which module each item the crate root re-exports comes from (`pub use m::{A, B}`).
fn reexports(lib: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for stmt in code(lib).split(';') {
        let stmt = stmt.trim();
        let Some(path) = stmt.strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, items)) = path.split_once("::") else {
            continue;
        };
        if module.starts_with("ferry_") {
            continue;
        }
        for item in items.trim_matches(|c| c == '{' || c == '}').split(',') {
            let item = item.trim();
            if !item.is_empty() {
                out.insert(item.to_string(), module.to_string());
            }
        }
    }
    out
}

/// The module a named path lands in: the longest module that prefixes it, or the module
/// an item re-exported by the crate root comes from.
fn target(
    path: &str,
    modules: &BTreeSet<String>,
    reexported: &BTreeMap<String, String>,
) -> Option<String> {
    let segments: Vec<&str> = path.split("::").collect();
    for n in (1..=segments.len()).rev() {
        let candidate = segments[..n].join("::");
        if modules.contains(&candidate) {
            return Some(candidate);
        }
    }
    reexported.get(segments[0]).cloned()
}

#[test]
fn the_modules_of_the_engine_import_each_other_without_a_cycle() {
    let files = modules();
    let names: BTreeSet<String> = files.keys().cloned().collect();
    let reexported = reexports(&files["crate"]);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, text) in &files {
        if module == "crate" {
            continue;
        }
        for path in named_paths(&code(text), module) {
            if let Some(to) = target(&path, &names, &reexported) {
                if &to != module && to != "crate" {
                    edges.entry(module.clone()).or_default().insert(to);
                }
            }
        }
    }
    assert!(
        edges.get("peer").is_some_and(|e| e.contains("registry")),
        "the scan sees imports (peer uses the registry): {edges:?}"
    );
    // Depth-first search for a back edge; report the cycle it closes.
    fn visit(
        m: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(m.to_string(), 1);
        stack.push(m.to_string());
        for next in edges.get(m).into_iter().flatten() {
            match state.get(next).copied().unwrap_or(0) {
                1 => {
                    let from = stack.iter().position(|s| s == next).unwrap_or(0);
                    let mut cycle = stack[from..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(next, edges, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(m.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in &names {
        if state.get(m).copied().unwrap_or(0) == 0 {
            if let Some(cycle) = visit(m, &edges, &mut state, &mut Vec::new()) {
                panic!("engine/src has an import cycle: {}", cycle.join(" -> "));
            }
        }
    }
}

#[test]
fn the_path_of_a_request_is_chosen_in_peer_rs_alone() {
    let files = modules();
    for (module, text) in &files {
        let code = code(text);
        if module.starts_with("batch") {
            assert!(
                !code.contains("Protocol"),
                "{module} must not ask which protocol a request uses; peer.rs decides"
            );
        }
        if module != "peer" {
            for decides in ["fn path_for", "fn retry_leg", "enum Leg", "connect_tcp("] {
                assert!(
                    !code.contains(decides),
                    "{module} contains `{decides}`: routing belongs in peer.rs"
                );
            }
        }
    }
    assert!(files["peer"].contains("fn path_for"));
}

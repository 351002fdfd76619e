//! The companion's import graph, read from its sources: no cycle, refusals at the bottom,
//! and nothing below the Check handler importing from it (plan/001 draws the graph).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use anyhow::{Result, ensure};

/// Module path (`review::turns`) → its source without the unit tests.
fn modules(root: &Path) -> Result<BTreeMap<String, String>> {
    let mut found = BTreeMap::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let Some(relative) = path
                .strip_prefix(root)?
                .to_str()
                .and_then(|p| p.strip_suffix(".rs"))
            else {
                continue;
            };
            let name = relative.replace('/', "::");
            if name == "lib" || name == "main" || name.ends_with("tests") {
                continue;
            }
            let text = std::fs::read_to_string(&path)?;
            // Unit tests may reach anywhere; the graph is the product's.
            let product = text.split("#[cfg(test)]").next().unwrap_or("").to_owned();
            found.insert(name, product);
        }
    }
    Ok(found)
}

/// Expands a use tree (`a::{b, c::{d}}`, whitespace removed) into full paths.
fn expand(prefix: &str, tree: &str, out: &mut Vec<String>) {
    if let Some(inner) = tree.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
        let (mut depth, mut start) = (0, 0);
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand(prefix, &inner[start..i], out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        if start < inner.len() {
            expand(prefix, &inner[start..], out);
        }
        return;
    }
    match tree.find("::{") {
        Some(i) => expand(&format!("{prefix}{}::", &tree[..i]), &tree[i + 2..], out),
        None => out.push(format!("{prefix}{tree}")),
    }
}

/// The modules `source` (of module `name`) imports, by their longest known prefix;
/// its own ancestors and descendants excluded.
fn imports(name: &str, source: &str, known: &BTreeMap<String, String>) -> BTreeSet<String> {
    let mut paths = Vec::new();
    for statement in source.split("use crate::").skip(1) {
        let tree: String = statement
            .split(';')
            .next()
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        expand("", &tree, &mut paths);
    }
    for (i, _) in source.match_indices("crate::") {
        let rest = &source[i + "crate::".len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        paths.push(rest[..end].to_owned());
    }
    let related = |other: &str| {
        other == name
            || name.starts_with(&format!("{other}::"))
            || other.starts_with(&format!("{name}::"))
    };
    paths
        .iter()
        .filter_map(|path| {
            let parts: Vec<&str> = path.split("::").collect();
            (1..=parts.len())
                .rev()
                .map(|n| parts[..n].join("::"))
                .find(|candidate| known.contains_key(candidate))
        })
        .filter(|module| !related(module))
        .collect()
}

fn graph() -> Result<BTreeMap<String, BTreeSet<String>>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../service/src");
    let known = modules(&root)?;
    ensure!(known.len() > 20, "read only {} modules", known.len());
    Ok(known
        .iter()
        .map(|(name, source)| (name.clone(), imports(name, source, &known)))
        .collect())
}

/// A cycle through `from`, if any, as the modules on it.
fn cycle_from(graph: &BTreeMap<String, BTreeSet<String>>, from: &str) -> Option<Vec<String>> {
    let mut stack = vec![(from.to_owned(), vec![from.to_owned()])];
    let mut seen = BTreeSet::new();
    while let Some((at, path)) = stack.pop() {
        for next in graph.get(&at).into_iter().flatten() {
            if next == from {
                return Some(path.clone());
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push((next.clone(), longer));
            }
        }
    }
    None
}

#[test]
fn the_companions_imports_follow_the_request_and_never_loop() -> Result<()> {
    let graph = graph()?;
    for module in graph.keys() {
        if let Some(cycle) = cycle_from(&graph, module) {
            anyhow::bail!("import cycle: {} → {module}", cycle.join(" → "));
        }
    }
    for (module, imported) in &graph {
        ensure!(
            module == "server" || !imported.iter().any(|m| m.starts_with("authz")),
            "{module} imports the Check handler ({imported:?}): stages return deny::Denial"
        );
    }
    let bottom = &graph["deny"];
    ensure!(
        bottom
            .iter()
            .all(|m| ["identity", "error_chain"].contains(&m.as_str())),
        "deny must stay at the bottom, it imports {bottom:?}"
    );
    Ok(())
}

#[test]
fn the_import_reader_sees_nested_use_trees() {
    let mut paths = Vec::new();
    expand("", "{a,b::{c,d::E},f::g}", &mut paths);
    assert_eq!(paths, ["a", "b::c", "b::d::E", "f::g"]);
}

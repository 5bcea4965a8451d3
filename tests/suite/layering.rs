//! The library's layering as ARCHITECTURE.md draws it, read from the source: every
//! `crate::…` and `super::…` path outside test modules points to a lower layer (or
//! within its own top-level module), and no two files import each other, however
//! indirectly. A module's paths to its own ancestors (a child reading its parent's
//! items) are how Rust modules nest and are not counted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The top-level modules of `src/`, highest layer first; a module may only reach the
/// layers after its own. (`main.rs` is the binary, on top of the application.)
const LAYERS: &[&[&str]] = &[
    &["main"],
    &["app"],
    &["load"],
    &["pipeline"],
    &["model", "scheduler", "device"],
    &["noise"],
    &["error"],
];

type Module = Vec<String>;

fn layer(top: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&top))
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module a file holds: `a/b.rs` and `a/b/mod.rs` are `a::b`; `lib.rs` the root.
fn module_of(src: &Path, file: &Path) -> Module {
    let rel = file
        .strip_prefix(src)
        .expect("under src")
        .with_extension("");
    let mut parts: Module = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// The text without comments and without `#[cfg(test)]` items (inline test modules).
fn code_of(text: &str) -> String {
    let uncommented: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = String::with_capacity(uncommented.len());
    let mut rest = uncommented.as_str();
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        // Skip the item: up to its `;` or its brace-balanced block, whichever ends it.
        let (semi, brace) = (after.find(';'), after.find('{'));
        let end = match (semi, brace) {
            (Some(s), Some(b)) if s < b => s + 1,
            (_, Some(b)) => {
                let mut depth = 0usize;
                let mut end = after.len();
                for (i, c) in after[b..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = b + i + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            (Some(s), None) => s + 1,
            (None, None) => after.len(),
        };
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// The paths a `crate::` path names, groups expanded: `crate::a::{b::C, d}` names
/// `a::b::C` and `a::d`. `text` starts right after `crate::`.
fn paths_from(text: &str, prefix: &Module, out: &mut Vec<Module>) {
    let mut path = prefix.clone();
    let mut chars = text.char_indices().peekable();
    let mut ident = String::new();
    while let Some((i, c)) = chars.next() {
        if c.is_alphanumeric() || c == '_' {
            ident.push(c);
            continue;
        }
        if !ident.is_empty() {
            path.push(std::mem::take(&mut ident));
        }
        if c == ':' && text[i..].starts_with("::") {
            chars.next();
            if text[i + 2..].starts_with('{') {
                // A group: each top-level item is a path below `path`.
                let body = &text[i + 3..];
                let mut depth = 0usize;
                let mut start = 0;
                for (j, d) in body.char_indices() {
                    match d {
                        '{' => depth += 1,
                        '}' if depth == 0 => {
                            paths_from(&body[start..j], &path, out);
                            return;
                        }
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            paths_from(&body[start..j], &path, out);
                            start = j + 1;
                        }
                        _ => {}
                    }
                }
                return;
            }
            continue;
        }
        if c.is_whitespace() && path.len() == prefix.len() {
            continue;
        }
        break;
    }
    if !ident.is_empty() {
        path.push(ident);
    }
    out.push(path);
}

/// The file module a path reaches: its longest prefix that is a file.
fn target(path: &[String], files: &BTreeSet<Module>) -> Option<Module> {
    (1..=path.len())
        .rev()
        .map(|k| path[..k].to_vec())
        .find(|p| files.contains(p))
}

/// Each file module's imports of other file modules (not of its own ancestors).
fn import_graph() -> BTreeMap<Module, BTreeSet<Module>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    rust_files(&src, &mut paths);
    let texts: BTreeMap<Module, String> = paths
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p).expect("read");
            (module_of(&src, p), code_of(&text))
        })
        .collect();
    let files: BTreeSet<Module> = texts.keys().cloned().collect();
    let mut graph = BTreeMap::new();
    for (module, code) in &texts {
        let mut named = Vec::new();
        for (at, _) in code.match_indices("crate::") {
            paths_from(&code[at + "crate::".len()..], &Vec::new(), &mut named);
        }
        for (at, _) in code.match_indices("super::") {
            if code[..at].ends_with("super::")
                || code[at + "super::".len()..].starts_with("super::")
            {
                continue;
            }
            let parent = module[..module.len().saturating_sub(1)].to_vec();
            paths_from(&code[at + "super::".len()..], &parent, &mut named);
        }
        let edges: BTreeSet<Module> = named
            .iter()
            .filter_map(|p| target(p, &files))
            .filter(|t| t != module && !module.starts_with(t))
            .collect();
        graph.insert(module.clone(), edges);
    }
    graph
}

/// Imports between top-level modules go down the layers.
#[test]
fn layering_imports_point_down() {
    let graph = import_graph();
    let mut wrong = Vec::new();
    for (from, tos) in &graph {
        let Some(top) = from.first() else { continue };
        let Some(own) = layer(top) else {
            wrong.push(format!(
                "src/{top} is in no layer: add it to LAYERS and ARCHITECTURE.md"
            ));
            continue;
        };
        for to in tos {
            let Some(other) = to.first().filter(|t| *t != top) else {
                continue;
            };
            match layer(other) {
                Some(l) if l > own => {}
                _ => wrong.push(format!("{} imports {}", from.join("::"), to.join("::"))),
            }
        }
    }
    assert!(
        graph.len() > 20,
        "read only {} files: the source was not found",
        graph.len()
    );
    assert!(
        wrong.is_empty(),
        "imports that do not point down:\n{}",
        wrong.join("\n")
    );
}

/// No file reaches itself through other files' imports.
#[test]
fn layering_no_import_circle() {
    let graph = import_graph();
    // Tarjan's strongly connected components; a component of two or more is a circle.
    struct State<'a> {
        graph: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<&'a Module, usize>,
        low: BTreeMap<&'a Module, usize>,
        stack: Vec<&'a Module>,
        on_stack: BTreeSet<&'a Module>,
        circles: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a Module) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.graph.get(v).into_iter().flatten() {
            let Some((w, _)) = s.graph.get_key_value(w) else {
                continue;
            };
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.join("::"));
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                s.circles.push(component);
            }
        }
    }
    let mut state = State {
        graph: &graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        circles: Vec::new(),
    };
    for v in graph.keys() {
        if !state.index.contains_key(v) {
            visit(&mut state, v);
        }
    }
    assert!(
        state.circles.is_empty(),
        "files that import each other: {:?}",
        state.circles
    );
}

/// The reader itself: groups, nesting, `super::` and test modules.
#[test]
fn layering_reads_paths() {
    let mut named = Vec::new();
    paths_from("a::{b::C, d::{e, f}}, x", &Vec::new(), &mut named);
    let got: Vec<String> = named.iter().map(|p| p.join("::")).collect();
    assert_eq!(got, ["a::b::C", "a::d::e", "a::d::f"]);
    let code =
        code_of("use crate::x; // crate::y\n#[cfg(test)]\nmod tests { use crate::z; }\nfn f() {}");
    assert!(code.contains("crate::x") && !code.contains("crate::y") && !code.contains("crate::z"));
    assert!(code.contains("fn f()"));
}

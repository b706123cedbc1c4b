//! The crate's layering (docs/design.md, "Architecture"), checked from the
//! source: every `crate::x` a file under `src/` names (in `use` lines and in
//! paths, `crate::{a, b::c}` groups included; `super::` paths that climb to
//! the crate's root too) must be a module of a lower layer than the file's
//! own, or its own module. Comments and string literals are skipped, so a
//! doc comment may point anywhere.
//!
//! `src/main.rs` and `src/bin/` are binaries on top of the library (they
//! reach it as `user_service::`), and `src/lib.rs` only declares the
//! modules: none of them is checked.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

/// The layers, top to bottom: a module may name modules of the layers
/// below its own, never one of its own layer (siblings stay independent) nor
/// one above.
const LAYERS: &[(&str, &[&str])] = &[
    ("wiring", &["startup"]),
    ("handlers", &["api"]),
    ("operations", &["command", "progress", "move_topic"]),
    ("projection", &["projector"]),
    ("adapters", &["store", "kafka", "transport"]),
    (
        "foundations",
        &["domain", "config", "proto", "tasks", "retry"],
    ),
    ("leaf", &["telemetry"]),
];

/// The layer (its index in [`LAYERS`], 0 at the top) of a top-level module.
fn layer_of(module: &str) -> Option<usize> {
    LAYERS
        .iter()
        .position(|(_, modules)| modules.contains(&module))
}

fn layer_name(layer: usize) -> &'static str {
    LAYERS[layer].0
}

#[test]
fn no_module_names_one_of_its_own_layer_or_above() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut violations = Vec::new();
    let mut checked = 0;
    for file in rust_files(&src) {
        let rel = file.strip_prefix(&src).unwrap();
        let Some(module) = top_module(rel) else {
            continue;
        };
        let own = layer_of(&module).unwrap_or_else(|| {
            panic!(
                "src/{}: module `{module}` is in no layer: place it in LAYERS (tests/layers.rs) \
                 and in docs/design.md's module map",
                rel.display()
            )
        });
        let text = fs::read_to_string(&file).unwrap();
        for (line, named) in crate_references(&code_only(&text), depth(rel)) {
            if named == module {
                continue;
            }
            // A name that is no module (`crate::SomeType`, `super::*`).
            let Some(theirs) = layer_of(&named) else {
                continue;
            };
            if theirs <= own {
                violations.push(format!(
                    "src/{}:{line}: `{module}` ({}) names `crate::{named}` ({}){}",
                    rel.display(),
                    layer_name(own),
                    layer_name(theirs),
                    if theirs == own {
                        ", a module of its own layer"
                    } else {
                        ", a higher layer"
                    }
                ));
            }
        }
        checked += 1;
    }
    assert!(checked > 50, "only {checked} files found under {src:?}");
    assert!(
        violations.is_empty(),
        "imports against the layering (docs/design.md, \"Architecture\"; \
         layers top to bottom: {}):\n  {}",
        LAYERS
            .iter()
            .map(|(name, modules)| format!("{name} [{}]", modules.join(", ")))
            .collect::<Vec<_>>()
            .join(" > "),
        violations.join("\n  ")
    );
}

#[test]
fn every_module_of_the_library_is_in_a_layer() {
    let lib = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let declared: BTreeSet<String> = code_only(&lib)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let rest = l
                .strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("mod "))?;
            Some(rest.trim_end_matches(';').trim().to_owned())
        })
        .collect();
    assert!(declared.len() > 5, "no modules read from src/lib.rs");
    let unplaced: Vec<_> = declared.iter().filter(|m| layer_of(m).is_none()).collect();
    assert!(
        unplaced.is_empty(),
        "modules in no layer of tests/layers.rs: {unplaced:?}"
    );
}

/// The checker itself: what it reads, and what it must not.
#[test]
fn the_reader_finds_crate_paths_and_skips_comments_and_strings() {
    let code = r##"
use crate::store::{RedisStore, Keys};
use crate::{
    api::{health::HealthRegistry, limit::CallBudget},
    kafka::{self, Routing},
};
// use crate::startup::Application;
/// See [`crate::progress`].
/* crate::command::CreateUser /* nested */ crate::command */
fn f() -> crate::domain::UserId { let s = "crate::config"; let r = r#"crate::tasks"#; let c = '"'; let q = '\''; let _: &'static str = s; todo!() }
fn g(x: &super::super::proto::X) {}
"##;
    let found: Vec<(usize, String)> = crate_references(&code_only(code), 2);
    let names: Vec<&str> = found.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(names, ["store", "api", "kafka", "domain", "proto"]);
    let lines: Vec<usize> = found.iter().map(|(l, _)| *l).collect();
    assert_eq!(lines, [2, 4, 5, 10, 11]);
    // One `super::` from a module's own file is already the crate's root.
    let found = crate_references(&code_only("use super::{config::Config, Thing};"), 1);
    assert_eq!(found, [(1, "config".to_owned()), (1, "Thing".to_owned())]);
    assert!(crate_references(&code_only("use super::Sibling;"), 2).is_empty());
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// The top-level module a file under `src/` belongs to; `None` for the
/// binaries and the crate's root.
fn top_module(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?;
    match first {
        "lib.rs" | "main.rs" | "bin" => None,
        f => Some(f.trim_end_matches(".rs").to_owned()),
    }
}

/// How many `super::` lead from the file's module to the crate's root:
/// `src/x.rs` and `src/x/mod.rs` are 1, `src/x/y.rs` is 2. (A `mod tests`
/// inside a file is one deeper; its `super::` are counted from the file,
/// which can only make a climb look shorter, never name a wrong module.)
fn depth(rel: &Path) -> usize {
    let parts = rel.components().count();
    if rel.file_name().is_some_and(|f| f == "mod.rs") {
        parts - 1
    } else {
        parts
    }
}

/// The source with comments and the contents of string and character
/// literals blanked out (newlines kept, so line numbers stay right).
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let blank = |out: &mut Vec<u8>, bytes: &[u8]| {
        out.extend(bytes.iter().map(|&c| if c == b'\n' { b'\n' } else { b' ' }));
    };
    let mut i = 0;
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            let end = rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
            blank(&mut out, &rest[..end]);
            i += end;
        } else if rest.starts_with(b"/*") {
            let (mut j, mut open) = (2, 1);
            while j < rest.len() && open > 0 {
                if rest[j..].starts_with(b"/*") {
                    open += 1;
                    j += 2;
                } else if rest[j..].starts_with(b"*/") {
                    open -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            blank(&mut out, &rest[..j]);
            i += j;
        } else if let Some(len) = raw_string(rest) {
            blank(&mut out, &rest[..len]);
            i += len;
        } else if rest[0] == b'"' || rest.starts_with(b"b\"") {
            let mut j = if rest[0] == b'"' { 1 } else { 2 };
            while j < rest.len() && rest[j] != b'"' {
                j += if rest[j] == b'\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(rest.len());
            blank(&mut out, &rest[..end]);
            i += end;
        } else if rest[0] == b'\'' {
            // A character literal ('x', '\n', '\u{1F600}', '"'), or a
            // lifetime ('a, 'static), which is left as it is.
            let len = if rest.get(1) == Some(&b'\\') {
                // After the backslash and the escaped character.
                rest.get(3..)
                    .and_then(|r| r.iter().position(|&c| c == b'\''))
                    .map(|p| p + 4)
            } else {
                let head = &rest[1..rest.len().min(5)];
                let head = match std::str::from_utf8(head) {
                    Ok(s) => s,
                    Err(e) => std::str::from_utf8(&head[..e.valid_up_to()]).unwrap(),
                };
                head.chars()
                    .next()
                    .map(char::len_utf8)
                    .filter(|&n| rest.get(1 + n) == Some(&b'\''))
                    .map(|n| n + 2)
            };
            match len {
                Some(len) => {
                    blank(&mut out, &rest[..len]);
                    i += len;
                }
                None => {
                    out.push(b'\'');
                    i += 1;
                }
            }
        } else {
            out.push(rest[0]);
            i += 1;
        }
    }
    String::from_utf8(out).expect("blanked source is UTF-8")
}

/// The length of a raw string literal (`r"…"`, `r#"…"#`, `br"…"`) at the
/// start of `s`, if one starts there.
fn raw_string(s: &[u8]) -> Option<usize> {
    let start = if s.starts_with(b"br") {
        2
    } else if s.starts_with(b"r") {
        1
    } else {
        return None;
    };
    let hashes = s[start..].iter().take_while(|&&c| c == b'#').count();
    if s.get(start + hashes) != Some(&b'"') {
        return None;
    }
    let close: Vec<u8> = std::iter::once(b'"')
        .chain(std::iter::repeat_n(b'#', hashes))
        .collect();
    let body = start + hashes + 1;
    let end = s[body..]
        .windows(close.len())
        .position(|w| w == close.as_slice())
        .map_or(s.len(), |p| body + p + close.len());
    Some(end)
}

/// Every top-level name reached through `crate::` (or through `super::`
/// climbing `depth` levels, to the root), with its line: `crate::a::b` and
/// `crate::{a::b, c}` give `a` (and `c`).
fn crate_references(code: &str, depth: usize) -> Vec<(usize, String)> {
    let b = code.as_bytes();
    let is_ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let line_at = |i: usize| 1 + b[..i].iter().filter(|&&c| c == b'\n').count();
    let mut found = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !is_ident(b[i]) || (i > 0 && (is_ident(b[i - 1]) || b[i - 1] == b':')) {
            i += 1;
            continue;
        }
        // At the start of a path: `crate::`, or `super::` repeated.
        let root = if b[i..].starts_with(b"crate") && !b.get(i + 5).is_some_and(|&c| is_ident(c)) {
            Some(i + 5)
        } else {
            let mut j = i;
            let mut climbs = 0;
            while b[j..].starts_with(b"super") && !b.get(j + 5).is_some_and(|&c| is_ident(c)) {
                climbs += 1;
                let after = skip_space(b, j + 5);
                if b[after..].starts_with(b"::")
                    && b[skip_space(b, after + 2)..].starts_with(b"super")
                {
                    j = skip_space(b, after + 2);
                } else {
                    j += 5;
                    break;
                }
            }
            (climbs > 0 && climbs >= depth).then_some(j)
        };
        let Some(end) = root else {
            while i < b.len() && is_ident(b[i]) {
                i += 1;
            }
            continue;
        };
        let after = skip_space(b, end);
        if !b[after..].starts_with(b"::") {
            i = end;
            continue;
        }
        let next = skip_space(b, after + 2);
        if b.get(next) == Some(&b'{') {
            let close = matching_brace(b, next);
            for (at, name) in group_heads(&code[next + 1..close]) {
                found.push((line_at(next + 1 + at), name));
            }
            i = close;
        } else {
            let len = b[next..].iter().take_while(|&&c| is_ident(c)).count();
            if len > 0 {
                found.push((line_at(next), code[next..next + len].to_owned()));
            }
            i = next + len.max(1);
        }
    }
    found
}

fn skip_space(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// The index of the `}` that closes the `{` at `open`.
fn matching_brace(b: &[u8], open: usize) -> usize {
    let mut level = 0;
    for (i, &c) in b.iter().enumerate().skip(open) {
        match c {
            b'{' => level += 1,
            b'}' => {
                level -= 1;
                if level == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    b.len()
}

/// The first name of each comma-separated entry at the top of a `{…}`
/// group, with its offset: `a::{x, y}, b, c as d` gives `a`, `b`, `c`.
fn group_heads(group: &str) -> Vec<(usize, String)> {
    let mut heads = Vec::new();
    let mut level = 0;
    let mut entry_start = 0;
    for (i, c) in group
        .char_indices()
        .chain(std::iter::once((group.len(), ',')))
    {
        match c {
            '{' => level += 1,
            '}' => level -= 1,
            ',' if level == 0 => {
                let entry = &group[entry_start..i];
                let skipped = entry.len() - entry.trim_start().len();
                let head: String = entry
                    .trim_start()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !head.is_empty() {
                    heads.push((entry_start + skipped, head));
                }
                entry_start = i + 1;
            }
            _ => {}
        }
    }
    heads
}

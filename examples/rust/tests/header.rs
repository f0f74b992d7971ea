//! `src/sys.rs` against `include/klvae.h` of the source tree this crate lives in: every
//! function the header declares is declared in `sys` with the same number of parameters,
//! and the version and status numbers agree. Text only; nothing here calls C.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {}", path.display(), e))
}

/// Removes /* ... */ and // ... comments.
fn strip_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let block = rest.find("/*");
        let line = rest.find("//");
        match (block, line) {
            (Some(b), l) if l.map_or(true, |l| b < l) => {
                out.push_str(&rest[..b]);
                let end = rest[b + 2..].find("*/").expect("unterminated comment");
                rest = &rest[b + 2 + end + 2..];
            }
            (_, Some(l)) => {
                out.push_str(&rest[..l]);
                rest = rest[l..].find('\n').map_or("", |e| &rest[l + e..]);
            }
            (None, None) => {
                out.push_str(rest);
                return out;
            }
            // (Some(_), None) is covered by the first arm.
            (Some(_), None) => unreachable!(),
        }
    }
}

/// Function name -> number of parameters, for each `marker ... name(params)` declaration.
fn functions(text: &str, marker: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for (i, _) in text.match_indices(marker) {
        let decl = &text[i + marker.len()..];
        let open = decl.find('(').unwrap();
        let name = decl[..open]
            .rsplit(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .next()
            .unwrap()
            .to_string();
        let close = decl[open..].find(')').unwrap() + open;
        let params = decl[open + 1..close].trim();
        let count = if params.is_empty() || params == "void" {
            0
        } else {
            params.trim_end_matches(',').split(',').count()
        };
        // (skips `#define KLVAE_API __attribute__(...)` and the like)
        if name.starts_with("klvae_") {
            out.insert(name, count);
        }
    }
    out
}

/// `NAME = value` pairs of the header's status enum.
fn header_statuses(header: &str) -> BTreeMap<String, i32> {
    let start = header.find("typedef enum klvae_status").unwrap();
    let end = header[start..].find('}').unwrap() + start;
    header[start..end]
        .split(',')
        .filter_map(|item| {
            let (name, value) = item.split_once('=')?;
            let name = name
                .trim()
                .rsplit(|c: char| c.is_whitespace() || c == '{')
                .next()?;
            Some((name.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

fn header_define(header: &str, name: &str) -> u32 {
    let key = format!("#define {} ", name);
    let line = header.lines().find(|l| l.starts_with(&key)).unwrap();
    line[key.len()..].trim().parse().unwrap()
}

#[test]
fn sys_declares_every_function_of_the_header() {
    let header = strip_comments(&read("../../include/klvae.h"));
    let sys = strip_comments(&read("src/sys.rs"));
    let in_header = functions(&header, "KLVAE_API ");
    let in_sys = functions(&sys, "pub fn ");
    assert!(in_header.len() >= 38, "parsed only {:?}", in_header.keys());
    for (name, count) in &in_header {
        match in_sys.get(name) {
            None => panic!(
                "src/sys.rs does not declare {} (from include/klvae.h)",
                name
            ),
            Some(c) => assert_eq!(c, count, "{}: parameter count", name),
        }
    }
    for name in in_sys.keys() {
        assert!(
            in_header.contains_key(name),
            "src/sys.rs declares {}, the header does not",
            name
        );
    }
}

#[test]
fn status_numbers_and_version_agree_with_the_header() {
    let header = strip_comments(&read("../../include/klvae.h"));
    let statuses = header_statuses(&header);
    let sys = read("src/sys.rs");
    assert_eq!(statuses.len(), 17, "{:?}", statuses);
    for (name, value) in &statuses {
        let decl = format!("pub const {}: klvae_status_t = {};", name, value);
        assert!(sys.contains(&decl), "src/sys.rs lacks `{}`", decl);
        if *value != 0 {
            let status = klvae::Status::from_code(*value).unwrap();
            assert!(
                !matches!(status, klvae::Status::Unknown(_)),
                "{} has no Status",
                name
            );
        }
    }
    assert_eq!(
        header_define(&header, "KLVAE_VERSION_MAJOR"),
        klvae::sys::KLVAE_VERSION_MAJOR
    );
    assert_eq!(
        header_define(&header, "KLVAE_VERSION_MINOR"),
        klvae::sys::KLVAE_VERSION_MINOR
    );
    assert_eq!(
        header_define(&header, "KLVAE_VERSION_PATCH"),
        klvae::sys::KLVAE_VERSION_PATCH
    );
}

#[test]
fn step_stats_fields_match_the_header() {
    let header = strip_comments(&read("../../include/klvae.h"));
    let start = header.find("typedef struct klvae_step_stats {").unwrap();
    let end = header[start..].find('}').unwrap() + start;
    let fields: Vec<String> = header[start..end]
        .split(';')
        .filter_map(|decl| decl.split_whitespace().last())
        .filter(|name| !name.contains('{'))
        .map(|name| name.to_string())
        .collect();
    let sys = read("src/sys.rs");
    let s = sys.find("pub struct klvae_step_stats_t {").unwrap();
    let e = sys[s..].find('}').unwrap() + s;
    let rust: Vec<String> = sys[s..e]
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub "))
        .filter_map(|l| l.split(':').next())
        .filter(|n| !n.contains("struct "))
        .map(|n| n.trim().to_string())
        .collect();
    assert_eq!(fields, rust);
}

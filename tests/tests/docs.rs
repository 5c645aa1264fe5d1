//! The README's reference cannot drift silently: its tables of cache flags,
//! operator flags and RegistryMirror fields, and its TOML example, are checked
//! against `regmirror-cache --help`, `regmirror-operator run --help`, the
//! cache's configuration file format and the CRD, both ways (everything
//! documented exists, everything that exists is documented), defaults included.

use std::collections::{BTreeMap, BTreeSet};

use regmirror_cache::config::FileConfig;
use regmirror_e2e::util::workspace_root;
use regmirror_e2e::{cache_binary, operator_binary};
use serde_json::Value;

fn readme() -> String {
    std::fs::read_to_string(workspace_root().join("README.md")).expect("README.md")
}

/// Rows of the first Markdown table whose header starts with `header`, after
/// the line `heading`; each row as its cells.
fn table(readme: &str, heading: &str, header: &str) -> Vec<Vec<String>> {
    let start = readme
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("README has no {heading:?}"));
    let rest = &readme[start..];
    let at = rest
        .find(&format!("\n{header}"))
        .unwrap_or_else(|| panic!("no table {header:?} under {heading:?}"));
    rest[at + 1..]
        .lines()
        .skip(2) // header and separator
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            // `\|` inside a cell is a literal bar.
            let l = l.replace("\\|", "\u{0}");
            l.trim()
                .trim_matches('|')
                .split('|')
                .map(|c| c.replace('\u{0}', "|").trim().to_owned())
                .collect()
        })
        .collect()
}

/// The text in the first backticks of a cell.
fn code(cell: &str) -> Option<&str> {
    cell.split('`').nth(1)
}

/// A cell's value for comparison with a default: backticks dropped.
fn plain(cell: &str) -> String {
    cell.replace('`', "")
}

#[derive(Debug, Default)]
struct HelpEntry {
    env: Option<String>,
    default: Option<String>,
}

/// Long flags of a clap `--help` with their `[env: X=]` and `[default: X]`
/// (help and version left out).
fn help_entries(help: &str) -> BTreeMap<String, HelpEntry> {
    // An entry starts at a line beginning (after indentation) with `-`; long
    // help continues on more indented lines.
    let mut entries: Vec<String> = Vec::new();
    for line in help.lines() {
        let t = line.trim_start();
        if t.starts_with('-') {
            entries.push(t.to_owned());
        } else if let Some(last) = entries.last_mut()
            && !t.is_empty()
            && line.starts_with("  ")
        {
            last.push(' ');
            last.push_str(t);
        }
    }
    entries
        .iter()
        .filter_map(|e| {
            let e = e
                .strip_prefix("-h, ")
                .or(e.strip_prefix("-V, "))
                .unwrap_or(e);
            let flag = e.strip_prefix("--")?.split([' ', '=']).next()?.to_owned();
            let bracket = |key: &str| {
                e.split(&format!("[{key}: "))
                    .nth(1)
                    .and_then(|d| d.split(']').next())
                    .map(|d| d.trim_end_matches('=').to_owned())
            };
            let entry = HelpEntry {
                env: bracket("env"),
                default: bracket("default"),
            };
            (flag != "help" && flag != "version").then_some((flag, entry))
        })
        .collect()
}

fn help(binary: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(binary)
        .args(args)
        .output()
        .expect("run --help");
    assert!(out.status.success(), "{binary:?} {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Compares a README flag table (`| flag | environment | default | meaning |`) with `--help`.
fn check_flag_table(what: &str, rows: &[Vec<String>], help: &str) {
    let entries = help_entries(help);
    assert!(entries.len() > 3, "{what}: parsed no flags from:\n{help}");
    let version = env!("CARGO_PKG_VERSION");
    let mut documented = BTreeSet::new();
    for row in rows {
        let flag = code(&row[0])
            .and_then(|c| c.strip_prefix("--"))
            .and_then(|c| c.split(' ').next())
            .unwrap_or_else(|| panic!("{what}: bad row {row:?}"));
        documented.insert(flag.to_owned());
        let entry = entries
            .get(flag)
            .unwrap_or_else(|| panic!("{what}: README documents --{flag}, which does not exist"));
        assert_eq!(
            code(&row[1]),
            entry.env.as_deref(),
            "{what}: environment variable of --{flag}"
        );
        if let Some(d) = &entry.default {
            assert_eq!(
                plain(&row[2]).replace("<version>", version),
                *d,
                "{what}: default of --{flag}"
            );
        }
    }
    let existing: BTreeSet<String> = entries.keys().cloned().collect();
    let undocumented: Vec<_> = existing.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "{what}: flags missing from the README: {undocumented:?}"
    );
}

#[test]
fn readme_cache_flags_match_the_binary() {
    let rows = table(
        &readme(),
        "## Configuration",
        "| flag | environment | default | meaning |",
    );
    check_flag_table(
        "regmirror-cache",
        &rows,
        &help(&cache_binary(), &["--help"]),
    );
}

#[test]
fn readme_operator_flags_match_the_binary() {
    let rows = table(
        &readme(),
        "### Operator flags (`regmirror-operator run`)",
        "| flag | environment | default | meaning |",
    );
    check_flag_table(
        "regmirror-operator run",
        &rows,
        &help(&operator_binary(), &["run", "--help"]),
    );
}

/// The fields serde expects at a point of the configuration file, from the
/// error `deny_unknown_fields` gives for an unknown one.
fn file_fields(toml_text: &str) -> BTreeSet<String> {
    let err = toml::from_str::<FileConfig>(toml_text)
        .expect_err("an unknown field is refused")
        .to_string();
    let list = err
        .split("expected one of ")
        .nth(1)
        .or_else(|| err.split("expected ").nth(1))
        .unwrap_or_else(|| panic!("no field list in {err:?}"));
    list.split(',')
        .map(|f| {
            f.trim()
                .trim_matches(|c: char| c == '`' || c.is_whitespace())
        })
        .map(|f| f.lines().next().unwrap_or("").trim_matches('`').to_owned())
        .filter(|f| !f.is_empty())
        .collect()
}

/// Keys of the README's TOML example: `(table, key)` with table "" at the top.
fn toml_keys(v: &toml::Table, table: &str, out: &mut BTreeSet<(String, String)>) {
    for (k, v) in v {
        match v {
            toml::Value::Table(t) => toml_keys(t, k, out),
            toml::Value::Array(a) if a.iter().all(toml::Value::is_table) && !a.is_empty() => {
                for t in a {
                    toml_keys(t.as_table().unwrap(), k, out);
                }
            }
            _ => {}
        }
        out.insert((table.to_owned(), k.clone()));
    }
}

#[test]
fn readme_toml_example_is_the_cache_file_format() {
    let readme = readme();
    let start = readme.find("```toml\n").expect("a TOML example") + "```toml\n".len();
    let block = &readme[start..start + readme[start..].find("```").unwrap()];
    // Everything in the example exists (unknown fields are refused) and parses.
    toml::from_str::<FileConfig>(block)
        .unwrap_or_else(|e| panic!("README's TOML example is not a valid config: {e}"));
    // And every field is in the example.
    let mut keys = BTreeSet::new();
    toml_keys(&toml::from_str(block).unwrap(), "", &mut keys);
    for (table, probe) in [
        ("", "zz_probe = 1\n"),
        ("timeouts", "[timeouts]\nzz_probe = 1\n"),
        ("upstream", "[[upstream]]\nhost = \"a\"\nzz_probe = 1\n"),
    ] {
        let fields = file_fields(probe);
        assert!(fields.len() > 2, "{table}: {fields:?}");
        for f in fields {
            assert!(
                keys.contains(&(table.to_owned(), f.clone())),
                "config field {table}.{f} is missing from README's TOML example"
            );
        }
    }
}

/// Every property path under `schema` (`a.b`, arrays as `a[].b`), with its
/// default and whether it has sub-properties.
fn crd_paths(schema: &Value, prefix: &str, out: &mut BTreeMap<String, (Option<Value>, bool)>) {
    let Some(props) = schema["properties"].as_object() else {
        return;
    };
    for (name, s) in props {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        let (inner, path_inner) = if s["type"] == "array" {
            (&s["items"], format!("{path}[]"))
        } else {
            (s, path.clone())
        };
        let has_children = inner["properties"].is_object();
        out.insert(path.clone(), (s.get("default").cloned(), has_children));
        crd_paths(inner, &path_inner, out);
    }
}

#[test]
fn readme_registrymirror_reference_matches_the_crd() {
    let crd: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(workspace_root().join("crds/registrymirror.yaml")).unwrap(),
    )
    .unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut paths = BTreeMap::new();
    crd_paths(spec, "", &mut paths);
    let rows = table(
        &readme(),
        "### RegistryMirror reference",
        "| field | type | default | meaning |",
    );
    let mut documented = BTreeSet::new();
    for row in &rows {
        let field = code(&row[0]).unwrap_or_else(|| panic!("bad row {row:?}"));
        let (default, _) = paths
            .get(field)
            .unwrap_or_else(|| panic!("README documents spec.{field}, which the CRD lacks"));
        if let Some(d) = default.as_ref().filter(|d| !d.is_object()) {
            let d = d
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| d.to_string());
            assert_eq!(plain(&row[2]), d, "default of spec.{field}");
        }
        documented.insert(field.to_owned());
    }
    // Every leaf is documented, itself or through an ancestor documented as a
    // whole (a Kubernetes type such as `cache.resources`), and intermediate
    // objects need no row of their own.
    for (path, (_, has_children)) in &paths {
        if *has_children {
            continue;
        }
        let under =
            |p: &str, d: &str| p.starts_with(&format!("{d}.")) || p.starts_with(&format!("{d}[]."));
        let covered = documented.contains(path)
            || documented
                .iter()
                .any(|d| under(path, d) && !documented.iter().any(|o| under(o, d)));
        assert!(
            covered,
            "spec.{path} is not in README's RegistryMirror reference"
        );
    }
}

//! Which files make up containerd's configuration: the main `config.toml` and
//! everything its `imports` pull in, in the order containerd merges them.
//!
//! Mirrors containerd's `LoadConfig` and `resolveImports`
//! (`services/server/config/config.go` in 1.x,
//! `cmd/containerd/server/config/config.go` in 2.x): files are loaded
//! breadth first (the main file, then its imports in order, then theirs), a
//! path already loaded is skipped (so cycles end), an import is cleaned and,
//! if relative, joined to the importing file's directory, and an import
//! containing `*` is expanded with Go's `filepath.Glob` (sorted names, `*`
//! and `?` never match `/`, dot files included, no match is no file). A
//! missing or unreadable import, or one that does not parse, makes containerd
//! refuse to start. Before 1.6.29 and 1.7.16 a glob was expanded as written,
//! i.e. relative to containerd's working directory (`/` under systemd).

use std::collections::{HashSet, VecDeque};
use std::io;
use std::path::{Path, PathBuf};

/// Read access to a node's files by node path (`/etc/containerd/config.toml`).
pub trait NodeFiles {
    /// Text of the file at `path`.
    fn read(&self, path: &str) -> io::Result<String>;
    /// Names (not paths) in the directory `dir`; `None` when it is not a
    /// readable directory (Go's `glob` ignores such I/O errors).
    fn names(&self, dir: &str) -> Option<Vec<String>>;
}

/// A node's filesystem mounted at a host root (`/host` in the agent pod,
/// `/` when run on the node itself).
#[derive(Debug, Clone)]
pub struct HostRoot<'a>(pub &'a Path);

impl HostRoot<'_> {
    fn seen(&self, node_path: &str) -> PathBuf {
        self.0.join(node_path.trim_start_matches('/'))
    }
}

impl NodeFiles for HostRoot<'_> {
    fn read(&self, path: &str) -> io::Result<String> {
        std::fs::read_to_string(self.seen(path))
    }

    fn names(&self, dir: &str) -> Option<Vec<String>> {
        let entries = std::fs::read_dir(self.seen(dir)).ok()?;
        Some(
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect(),
        )
    }
}

/// One loaded configuration file.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigFile {
    /// Node path, as containerd names it (cleaned, imports joined).
    pub path: String,
    /// Its parsed content.
    pub doc: toml::Table,
}

/// A configuration's files, as loaded.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Loaded {
    /// In containerd's merge order, the main file first.
    pub files: Vec<ConfigFile>,
    /// Glob imports that matched no file (containerd says nothing of them),
    /// e.g. `import "conf.d/*.toml" of /etc/containerd/config.toml matches no file`.
    pub unmatched: Vec<String>,
}

/// Loads `main` and its imports in containerd's merge order. `globs_from_dir`:
/// relative glob imports are joined to the importing file's directory
/// (containerd 1.6.29+, 1.7.16+, 2.x) rather than taken as written.
/// Errors: why containerd would refuse to start, naming the node path.
pub fn load(files: &dyn NodeFiles, main: &str, globs_from_dir: bool) -> Result<Loaded, String> {
    let mut unmatched = Vec::new();
    let mut loaded = HashSet::new();
    let mut pending = VecDeque::from([main.to_owned()]);
    let mut out = Vec::new();
    while let Some(path) = pending.pop_front() {
        if loaded.contains(&path) {
            continue;
        }
        let text = files
            .read(&path)
            .map_err(|e| format!("cannot read {path}: {e}"))?;
        let doc: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| format!("{path} does not parse: {}", e.message()))?;
        let imports = match doc.get("imports") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .and_then(|a| a.iter().map(|i| i.as_str()).collect::<Option<Vec<_>>>())
                .ok_or_else(|| format!("{path}: imports is not a list of paths"))?
                .into_iter()
                .map(str::to_owned)
                .collect(),
        };
        for import in imports {
            let resolved = resolve_import(&path, &import, globs_from_dir);
            if resolved.contains('*') {
                let matches = glob(files, &resolved)
                    .map_err(|e| format!("{path}: import {import:?}: {e}"))?;
                if matches.is_empty() {
                    let cwd = if resolved.starts_with('/') {
                        ""
                    } else {
                        ", relative to containerd's working directory"
                    };
                    unmatched.push(format!("import {import:?} of {path} matches no file{cwd}"));
                }
                pending.extend(matches);
            } else {
                pending.push_back(resolved);
            }
        }
        loaded.insert(path.clone());
        out.push(ConfigFile { path, doc });
    }
    Ok(Loaded {
        files: out,
        unmatched,
    })
}

/// The path containerd reads for `import` written in the file `parent`
/// (`resolveImports`). With `globs_from_dir` false (containerd before
/// 1.6.29/1.7.16) a path containing `*` is left exactly as written.
pub fn resolve_import(parent: &str, import: &str, globs_from_dir: bool) -> String {
    if !globs_from_dir && import.contains('*') {
        return import.to_owned();
    }
    let path = clean(import);
    if path.starts_with('/') {
        path
    } else {
        clean(&format!("{}/{path}", dir(parent)))
    }
}

/// Go's `filepath.Clean` (Unix): lexically removes `.`, `..` and repeated
/// slashes; `""` is `"."`.
pub fn clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            p => parts.push(p),
        }
    }
    match (rooted, parts.is_empty()) {
        (true, _) => format!("/{}", parts.join("/")),
        (false, true) => ".".to_owned(),
        (false, false) => parts.join("/"),
    }
}

/// Go's `filepath.Dir`.
fn dir(path: &str) -> String {
    match path.rfind('/') {
        Some(i) => clean(&path[..=i]),
        None => ".".to_owned(),
    }
}

fn has_meta(s: &str) -> bool {
    s.contains(['*', '?', '[', '\\'])
}

/// Go's `filepath.Glob`: the paths matching `pattern`, names sorted per
/// directory. Errors only for a malformed pattern (`ErrBadPattern`).
pub fn glob(files: &dyn NodeFiles, pattern: &str) -> Result<Vec<String>, String> {
    glob_match(pattern, "")?;
    if !has_meta(pattern) {
        // Go: Lstat, the pattern itself if it exists.
        let (d, name) = split(pattern);
        let found = files
            .names(&clean_glob_dir(d))
            .is_some_and(|n| n.iter().any(|n| n == name));
        return Ok(if found {
            vec![pattern.to_owned()]
        } else {
            Vec::new()
        });
    }
    let (d, file) = split(pattern);
    let d = clean_glob_dir(d);
    if !has_meta(&d) {
        return glob_dir(files, &d, file);
    }
    if d == pattern {
        return Err("syntax error in pattern".to_owned());
    }
    let mut out = Vec::new();
    for sub in glob(files, &d)? {
        out.extend(glob_dir(files, &sub, file)?);
    }
    Ok(out)
}

fn split(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..=i], &path[i + 1..]),
        None => ("", path),
    }
}

fn clean_glob_dir(d: &str) -> String {
    match d {
        "" => ".".to_owned(),
        "/" => "/".to_owned(),
        d => d[..d.len() - 1].to_owned(),
    }
}

fn glob_dir(files: &dyn NodeFiles, d: &str, pattern: &str) -> Result<Vec<String>, String> {
    let Some(mut names) = files.names(d) else {
        return Ok(Vec::new());
    };
    names.sort();
    let mut out = Vec::new();
    for n in names {
        if glob_match(pattern, &n)? {
            out.push(if d == "." {
                n
            } else {
                clean(&format!("{d}/{n}"))
            });
        }
    }
    Ok(out)
}

/// Go's `filepath.Match` for one name: `*` any run and `?` any one character
/// except `/`, `[a-z]`/`[^a-z]` classes, `\` escapes. Errors on a malformed
/// pattern, as Go does.
pub fn glob_match(pattern: &str, name: &str) -> Result<bool, String> {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    validate(&p)?;
    Ok(match_from(&p, &n))
}

const BAD: &str = "syntax error in pattern";

fn validate(p: &[char]) -> Result<(), String> {
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            '\\' => {
                if i + 1 >= p.len() {
                    return Err(BAD.to_owned());
                }
                i += 2;
            }
            '[' => i = class(p, i, None).ok_or(BAD)?.1,
            _ => i += 1,
        }
    }
    Ok(())
}

/// Parses the class at `p[start] == '['`; with `c`, whether it matches `c`.
/// Returns (matched, index after `]`), `None` if malformed.
fn class(p: &[char], start: usize, c: Option<char>) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negated = p.get(i) == Some(&'^');
    if negated {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    loop {
        let ch = *p.get(i)?;
        if ch == ']' && !first {
            return Some((matched != negated && c.is_some(), i + 1));
        }
        first = false;
        let (lo, next) = class_char(p, i)?;
        i = next;
        let mut hi = lo;
        if p.get(i) == Some(&'-') {
            let (h, next) = class_char(p, i + 1)?;
            hi = h;
            i = next;
        }
        if c.is_some_and(|c| lo <= c && c <= hi) {
            matched = true;
        }
    }
}

fn class_char(p: &[char], i: usize) -> Option<(char, usize)> {
    match *p.get(i)? {
        '-' | ']' => None,
        '\\' => Some((*p.get(i + 1)?, i + 2)),
        c => Some((c, i + 1)),
    }
}

fn match_from(p: &[char], n: &[char]) -> bool {
    let Some(&first) = p.first() else {
        return n.is_empty();
    };
    match first {
        '*' => (0..=n.len())
            .take_while(|&k| k == 0 || n[k - 1] != '/')
            .any(|k| match_from(&p[1..], &n[k..])),
        '?' => n.first().is_some_and(|&c| c != '/') && match_from(&p[1..], &n[1..]),
        '[' => match n.first() {
            Some(&c) if c != '/' => match class(p, 0, Some(c)) {
                Some((true, next)) => match_from(&p[next..], &n[1..]),
                _ => false,
            },
            _ => false,
        },
        '\\' => n.first() == p.get(1) && match_from(&p[2..], &n[1..]),
        c => n.first() == Some(&c) && match_from(&p[1..], &n[1..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A node's files in memory: node path -> text (directories implied).
    #[derive(Default)]
    struct Files(BTreeMap<String, String>);

    impl Files {
        fn of(files: &[(&str, &str)]) -> Self {
            Self(
                files
                    .iter()
                    .map(|(p, t)| ((*p).to_owned(), (*t).to_owned()))
                    .collect(),
            )
        }
    }

    impl NodeFiles for Files {
        fn read(&self, path: &str) -> io::Result<String> {
            self.0
                .get(path)
                .cloned()
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }

        fn names(&self, dir: &str) -> Option<Vec<String>> {
            let prefix = if dir == "/" {
                "/".to_owned()
            } else {
                format!("{dir}/")
            };
            let names: std::collections::BTreeSet<String> = self
                .0
                .keys()
                .filter_map(|k| k.strip_prefix(&prefix))
                .map(|rest| rest.split('/').next().unwrap_or_default().to_owned())
                .collect();
            (!names.is_empty()).then(|| names.into_iter().collect())
        }
    }

    fn paths(files: &dyn NodeFiles, main: &str) -> Vec<String> {
        load(files, main, true)
            .unwrap()
            .files
            .into_iter()
            .map(|f| f.path)
            .collect()
    }

    #[test]
    fn clean_and_resolve_like_go() {
        assert_eq!(clean("a/./b/../c//d/"), "a/c/d");
        assert_eq!(clean("/../x"), "/x");
        assert_eq!(clean("../x"), "../x");
        assert_eq!(clean(""), ".");
        let main = "/etc/containerd/config.toml";
        assert_eq!(
            resolve_import(main, "conf.d/a.toml", true),
            "/etc/containerd/conf.d/a.toml"
        );
        assert_eq!(
            resolve_import(main, "./../x/./y.toml", true),
            "/etc/x/y.toml"
        );
        assert_eq!(resolve_import(main, "/opt/c.toml", false), "/opt/c.toml");
        assert_eq!(
            resolve_import(main, "conf.d/*.toml", true),
            "/etc/containerd/conf.d/*.toml"
        );
        // Before 1.6.29/1.7.16 a glob is used as written.
        assert_eq!(
            resolve_import(main, "conf.d/*.toml", false),
            "conf.d/*.toml"
        );
        assert_eq!(
            resolve_import(main, "conf.d/a.toml", false),
            "/etc/containerd/conf.d/a.toml"
        );
    }

    #[test]
    fn glob_matches_names_like_go() {
        for (p, n, want) in [
            ("*.toml", "10-registry.toml", true),
            ("*.toml", ".hidden.toml", true),
            ("*.toml", "a.toml.bak", false),
            ("?0-*.toml", "10-x.toml", true),
            ("[0-4]*", "3x", true),
            ("[^0-4]*", "3x", false),
            ("[!a]", "!", true),
            ("a\\*", "a*", true),
            ("a\\*", "ab", false),
            ("*", "", true),
        ] {
            assert_eq!(glob_match(p, n), Ok(want), "{p} {n}");
        }
        for bad in ["[", "a\\", "[]", "[a-]", "[z"] {
            assert!(glob_match(bad, "x").is_err(), "{bad}");
        }
    }

    #[test]
    fn imports_load_breadth_first_sorted_once_each() {
        let files = Files::of(&[
            (
                "/etc/containerd/config.toml",
                "imports = [\"conf.d/*.toml\", \"/opt/last.toml\"]",
            ),
            (
                "/etc/containerd/conf.d/20-b.toml",
                "imports = [\"../deep.toml\"]",
            ),
            ("/etc/containerd/conf.d/10-a.toml", ""),
            ("/etc/containerd/conf.d/notes.txt", ""),
            ("/etc/containerd/deep.toml", ""),
            ("/opt/last.toml", ""),
        ]);
        assert_eq!(
            paths(&files, "/etc/containerd/config.toml"),
            [
                "/etc/containerd/config.toml",
                "/etc/containerd/conf.d/10-a.toml",
                "/etc/containerd/conf.d/20-b.toml",
                "/opt/last.toml",
                "/etc/containerd/deep.toml",
            ]
        );
        // Globs in directory parts, and no match is no file.
        let files = Files::of(&[
            (
                "/c/config.toml",
                "imports = [\"/c/*/x.toml\", \"/none/*.toml\"]",
            ),
            ("/c/b/x.toml", ""),
            ("/c/a/x.toml", ""),
            ("/c/a/y.toml", ""),
        ]);
        assert_eq!(
            paths(&files, "/c/config.toml"),
            ["/c/config.toml", "/c/a/x.toml", "/c/b/x.toml"]
        );
    }

    #[test]
    fn cycles_end_and_missing_imports_refuse() {
        let files = Files::of(&[
            ("/c/a.toml", "imports = [\"b.toml\", \"a.toml\"]"),
            ("/c/b.toml", "imports = [\"/c/./a.toml\", \"b.toml\"]"),
        ]);
        assert_eq!(paths(&files, "/c/a.toml"), ["/c/a.toml", "/c/b.toml"]);
        let files = Files::of(&[("/c/a.toml", "imports = [\"gone.toml\"]")]);
        let e = load(&files, "/c/a.toml", true).unwrap_err();
        assert!(e.contains("/c/gone.toml"), "{e}");
        let files = Files::of(&[
            ("/c/a.toml", "imports = [\"b.toml\"]"),
            ("/c/b.toml", "x = ["),
        ]);
        let e = load(&files, "/c/a.toml", true).unwrap_err();
        assert!(e.contains("/c/b.toml does not parse"), "{e}");
        let files = Files::of(&[("/c/a.toml", "imports = [\"[*.toml\"]")]);
        assert!(
            load(&files, "/c/a.toml", true)
                .unwrap_err()
                .contains("pattern")
        );
    }

    #[test]
    fn host_root_reads_node_paths_under_the_root() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc/containerd/conf.d")).unwrap();
        std::fs::write(
            root.path().join("etc/containerd/config.toml"),
            "imports = [\"/etc/containerd/conf.d/*.toml\"]",
        )
        .unwrap();
        std::fs::write(root.path().join("etc/containerd/conf.d/a.toml"), "").unwrap();
        let files = HostRoot(root.path());
        assert_eq!(
            paths(&files, "/etc/containerd/config.toml"),
            [
                "/etc/containerd/config.toml",
                "/etc/containerd/conf.d/a.toml"
            ]
        );
    }
}

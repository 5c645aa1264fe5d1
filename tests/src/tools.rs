//! Go-built test tools (crictl, kubectl, helm, ...) installed by
//! `scripts/install-go-tools.sh` into `${REGMIRROR_TOOLS:-$HOME/.cache/regmirror}/bin`.

use std::path::PathBuf;

/// The tools cache's bin directory.
pub fn tools_bin_dir() -> PathBuf {
    let root = std::env::var_os("REGMIRROR_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/regmirror")
        });
    root.join("bin")
}

/// Path of a built tool; panics with the command that installs it when missing.
pub fn tool(name: &str) -> PathBuf {
    let p = tools_bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/install-go-tools.sh (make test does)",
        p.display()
    );
    p
}

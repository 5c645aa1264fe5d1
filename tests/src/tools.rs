//! Go-built test tools (crictl, kubectl, helm, ...) installed by
//! `scripts/install-go-tools.sh` into the tools cache (see
//! [`crate::controlplane::tools_root`]).

use std::path::PathBuf;

/// Path of a built tool; panics with the command that installs it when missing.
pub fn tool(name: &str) -> PathBuf {
    let p = crate::controlplane::tools_root().join("bin").join(name);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/install-go-tools.sh (make test does)",
        p.display()
    );
    p
}

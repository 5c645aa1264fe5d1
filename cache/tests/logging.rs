//! Text logs written to a pipe or file (a pod's log, a redirect) carry no
//! colour codes; only a terminal gets them.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BINARY: &str = env!("CARGO_BIN_EXE_regmirror-cache");

#[test]
fn text_logs_to_a_pipe_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(BINARY)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "text",
            "--storage",
        ])
        .arg(dir.path().join("data"))
        .args(["--upstream", "docker.io=http://127.0.0.1:9"])
        // The test harness sets NO_COLOR for the processes it starts; a pod
        // does not.
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut lines = Vec::new();
    let served = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            break false;
        };
        let done = line.contains("regmirror-cache serving");
        lines.push(line);
        if done {
            break true;
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(served, "no serving line: {lines:?}");
    assert!(
        lines.iter().all(|l| !l.contains('\u{1b}')),
        "colour codes in a piped log: {lines:?}"
    );
}

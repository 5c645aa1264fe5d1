//! Starting the binary: without CA certificates (`SSL_CERT_FILE` and
//! `SSL_CERT_DIR` pointing at nothing, which rustls-native-certs then reads
//! alone, as on a minimal image without a CA bundle), and logging to a pipe.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BINARY: &str = env!("CARGO_BIN_EXE_regmirror-cache");

/// The cache binary with `args`, its output piped, and no CA certificates.
fn start_without_ca_certificates(dir: &Path, args: &[&str]) -> Child {
    let empty_file = dir.join("empty.pem");
    std::fs::write(&empty_file, "").unwrap();
    let empty_dir = dir.join("certs");
    std::fs::create_dir_all(&empty_dir).unwrap();
    Command::new(BINARY)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--storage",
        ])
        .arg(dir.join("data"))
        .args(args)
        .env("SSL_CERT_FILE", &empty_file)
        .env("SSL_CERT_DIR", &empty_dir)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The lines `out` gives, as they come, read on a thread of their own.
fn output_lines(out: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    rx
}

/// Kills the child when the test ends, however it ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn https_upstreams_without_ca_certificates_fail_saying_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Reaped(start_without_ca_certificates(
        dir.path(),
        &[
            "--upstream",
            "ghcr.io",
            "--upstream",
            "registry.local:5000=http://127.0.0.1:9",
        ],
    ));
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "still running without CA certificates"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut stderr = String::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        stderr.contains("upstream ghcr.io is unavailable: no CA certificates found")
            && stderr.contains("install ca-certificates")
            && stderr.contains("SSL_CERT_FILE")
            && !stderr.contains("registry.local"),
        "{stderr}"
    );
}

#[test]
fn plain_http_upstreams_start_without_ca_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Reaped(start_without_ca_certificates(
        dir.path(),
        &["--upstream", "docker.io=http://127.0.0.1:9"],
    ));
    // The log's lines until it says where it serves.
    let rx = output_lines(child.0.stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut warned, mut listen) = (false, None);
    while listen.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no serving line; exited: {:?}", child.0.try_wait()));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        let message = v["fields"]["message"].as_str().unwrap_or("");
        warned |= message.starts_with("no CA certificates found; every upstream is plain http");
        if message == "regmirror-cache serving" {
            listen = v["fields"]["listen"].as_str().map(str::to_owned);
        }
    }
    assert!(warned, "the missing certificates are logged");
    // And it answers.
    let mut conn = std::net::TcpStream::connect(listen.unwrap()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
}

/// Text logs written to a pipe or file (a pod's log, a redirect) carry no
/// colour codes; only a terminal gets them.
#[test]
fn text_logs_to_a_pipe_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Reaped(
        Command::new(BINARY)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "text",
                "--storage",
            ])
            .arg(dir.path().join("data"))
            .args(["--upstream", "docker.io=http://127.0.0.1:9"])
            // The test harness sets NO_COLOR for the processes it starts; a
            // pod does not.
            .env_remove("NO_COLOR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let rx = output_lines(child.0.stdout.take().unwrap());
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
    assert!(served, "no serving line: {lines:?}");
    assert!(
        lines.iter().all(|l| !l.contains('\u{1b}')),
        "colour codes in a piped log: {lines:?}"
    );
}

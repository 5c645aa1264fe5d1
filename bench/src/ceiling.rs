//! Reference ceiling for warm blob GETs: a minimal HTTP/1.1 server that answers every
//! request with one file through `sendfile(2)` (no hashing, no copies to user space).
//! A second mode copies the file through a 32 KiB buffer with `read(2)`/`write(2)`
//! instead, as a Go server's `io.Copy` does (distribution's): on loopback, where the
//! receiver copies the bytes out of the sender's buffers, the two cost a client
//! differently, and the external clients are measured against both (issue 20).
//!
//! It runs as its own process (this binary, re-executed with [`SERVE_ENV`] set) so
//! it is measured and placed exactly like the systems: CPU is utime + stime of the
//! whole process from `/proc`, and `BENCH_PIN` pins it with them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

/// Set to the file to serve, this binary runs as the reference server.
pub const SERVE_ENV: &str = "REGMIRROR_BENCH_CEILING";
/// Set (to anything) with [`SERVE_ENV`], the reference server copies instead of
/// using `sendfile`.
pub const COPY_ENV: &str = "REGMIRROR_BENCH_CEILING_COPY";

/// Buffer of the copying reference: Go's `io.Copy` default.
const COPY_BUFFER: usize = 32 << 10;

/// The reference server process; killed on drop.
#[derive(Debug)]
pub struct Ceiling {
    child: Child,
    addr: String,
}

impl Ceiling {
    /// Starts `bench_bin` (`regmirror-bench`) as the reference server for
    /// `file` on `127.0.0.1:0`, sending with `sendfile(2)`.
    pub fn start(bench_bin: &Path, file: &Path) -> Result<Self> {
        Self::start_mode(bench_bin, file, false)
    }

    /// As [`Ceiling::start`], but sending by copying through a user-space buffer.
    pub fn start_copying(bench_bin: &Path, file: &Path) -> Result<Self> {
        Self::start_mode(bench_bin, file, true)
    }

    fn start_mode(bench_bin: &Path, file: &Path, copy: bool) -> Result<Self> {
        let mut command = Command::new(bench_bin);
        if copy {
            command.env(COPY_ENV, "1");
        }
        let mut child = command
            .env(SERVE_ENV, file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start {} as the reference server", bench_bin.display()))?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("reference server stdout")?;
        BufReader::new(stdout).read_line(&mut line)?;
        let addr = line.trim().to_owned();
        if addr.is_empty() {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the reference server exited before printing its address");
        }
        let ceiling = Self { child, addr };
        crate::pin::server_if_wanted(ceiling.pid())?;
        Ok(ceiling)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds the server process has spent so far.
    pub fn cpu_seconds(&self) -> Result<f64> {
        crate::procfs::cpu_seconds(self.pid())
    }

    pub fn url(&self) -> String {
        format!("http://{}/blob", self.addr)
    }

    /// `IP:PORT`, for clients that build registry URLs themselves.
    pub fn host(&self) -> String {
        self.addr.clone()
    }
}

impl Drop for Ceiling {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The reference server's main: prints its address, serves `file` from a thread
/// per connection (copying it if `copy`, else with `sendfile`), and exits when its
/// stdin closes (the bench is gone).
pub fn serve_forever(file: &Path, copy: bool) -> Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("{}", listener.local_addr()?);
    std::io::stdout().flush()?;
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let file = file.to_owned();
        std::thread::spawn(move || serve(conn, &file, copy));
    }
    Ok(())
}

fn serve(mut conn: TcpStream, path: &Path, copy: bool) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        // Read one request head.
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
            if !looks_like_http(&buf) {
                // A TLS ClientHello (crane tries https first): answer in plain HTTP as
                // the registries do, so the client falls back to http at once (a bare
                // close reads as a transient EOF, which crane retries after a pause).
                conn.write_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")?;
                return Ok(());
            }
        }
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
        let ping = is_registry_ping(&buf[..end]);
        buf.drain(..end);
        if ping {
            // Registry clients (crane) check `/v2/` before fetching.
            conn.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
            )?;
            continue;
        }
        let mut file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n\r\n"
        )?;
        conn.flush()?;
        if copy {
            // A loop of our own: `std::io::copy` from a file to a socket uses
            // `sendfile`/`splice` on Linux, which is what this mode is not.
            let mut buf = vec![0u8; COPY_BUFFER];
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                conn.write_all(&buf[..n])?;
            }
            continue;
        }
        let mut off = 0u64;
        while off < len {
            let want = usize::try_from((len - off).min(1 << 30)).unwrap_or(1 << 30);
            let n = rustix::fs::sendfile(&conn, &file, Some(&mut off), want)?;
            if n == 0 {
                break;
            }
        }
    }
}

/// Whether the bytes so far can start an HTTP/1 request (a method is upper-case
/// ASCII; a TLS record starts with 0x16).
fn looks_like_http(head: &[u8]) -> bool {
    head.first().is_none_or(u8::is_ascii_uppercase)
}

/// Whether a request head asks for the registry API root, `GET /v2/`.
fn is_registry_ping(head: &[u8]) -> bool {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    matches!(
        (parts.next(), parts.next()),
        (Some(b"GET"), Some(b"/v2/" | b"/v2"))
    )
}

#[cfg(test)]
mod tests {
    use super::{is_registry_ping, looks_like_http};

    #[test]
    fn tls_is_not_http() {
        assert!(looks_like_http(b"GET / HTTP/1.1"));
        assert!(looks_like_http(b""));
        assert!(!looks_like_http(&[0x16, 0x03, 0x01, 0x02, 0x00]));
    }

    #[test]
    fn only_the_api_root_is_a_ping() {
        assert!(is_registry_ping(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(is_registry_ping(b"GET /v2 HTTP/1.1\r\n\r\n"));
        assert!(!is_registry_ping(
            b"GET /v2/r/blobs/sha256:00 HTTP/1.1\r\n\r\n"
        ));
        assert!(!is_registry_ping(b"GET /blob HTTP/1.1\r\n\r\n"));
        assert!(!is_registry_ping(b"HEAD /v2/ HTTP/1.1\r\n\r\n"));
    }
}

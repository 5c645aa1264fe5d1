//! Reference ceiling for warm blob GETs: a minimal HTTP/1.1 server that answers every
//! request with one file through `sendfile(2)` (no hashing, no copies to user space).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::Result;

/// The server; stops accepting on drop.
#[derive(Debug)]
pub struct Ceiling {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// CPU nanoseconds spent by the threads serving connections, counted
    /// after each response: the floor of what serving costs on this machine.
    cpu_ns: Arc<AtomicU64>,
}

impl Ceiling {
    /// Serves `file` on `127.0.0.1:0` from a thread per connection.
    pub fn start(file: &Path) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let file = file.to_owned();
        let flag = stop.clone();
        let cpu_ns = Arc::new(AtomicU64::new(0));
        let spent = cpu_ns.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let file = file.clone();
                let spent = spent.clone();
                std::thread::spawn(move || {
                    if crate::pin::wanted() {
                        // Measured like the systems: on their CPU.
                        let _ = crate::pin::pin_current_thread_to_server();
                    }
                    let _ = serve(conn, &file, &spent);
                });
            }
        });
        Ok(Self { addr, stop, cpu_ns })
    }

    /// CPU seconds spent serving so far (responses already finished).
    pub fn cpu_seconds(&self) -> f64 {
        self.cpu_ns.load(Ordering::Relaxed) as f64 / 1e9
    }

    pub fn url(&self) -> String {
        format!("http://{}/blob", self.addr)
    }
}

impl Drop for Ceiling {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

fn serve(mut conn: TcpStream, path: &PathBuf, spent: &AtomicU64) -> std::io::Result<()> {
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
        }
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
        buf.drain(..end);
        let cpu0 = thread_cpu_ns();
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n\r\n"
        )?;
        conn.flush()?;
        let mut off = 0u64;
        while off < len {
            let want = usize::try_from((len - off).min(1 << 30)).unwrap_or(1 << 30);
            let n = rustix::fs::sendfile(&conn, &file, Some(&mut off), want)?;
            if n == 0 {
                break;
            }
        }
        spent.fetch_add(thread_cpu_ns().saturating_sub(cpu0), Ordering::Relaxed);
    }
}

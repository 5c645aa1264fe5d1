//! `FaultGate`: a TCP relay in front of an upstream that can act out an
//! outage (down, silent, an error status) for whoever talks through it, while
//! clients that go to the upstream directly see it as it is.
//!
//! Any upstream, the real registry included, can then fail the way the
//! issue's outages describe without being stopped: the cache is configured
//! with the gate's URL, the tests' direct requests use the upstream's own.
//! Every change of mode ends the connections open through the gate, so a
//! pooled keep-alive connection cannot carry requests past an outage. The
//! gate's port lies below the kernel's ephemeral port range, so while it is
//! down no outgoing connection or `bind(:0)` elsewhere can take it.
//!
//! Without an outage the gate can also throttle what the upstream sends
//! ([`FaultGate::throttle`]), so a fill stays in flight for seconds, as on a
//! WAN link.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::util::wait_until;

/// What the gate does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    /// No outage: bytes are relayed both ways, untouched.
    None,
    /// Nothing listens on the gate's port: connections are refused.
    Down,
    /// Connections are accepted and requests read, but never answered.
    Silent,
    /// Every request is answered with this status (and, for 429,
    /// `Retry-After: 60`) and an OCI error body, then the connection closes.
    Status(u16),
}

/// The gate's mode, numbered so that [`FaultGate::set`] can wait until the
/// relay task has applied it.
#[derive(Debug, Clone, Copy)]
struct Mode {
    outage: Outage,
    generation: u64,
}

/// A relay on `127.0.0.1:<port>` to one upstream address; stops on drop.
#[derive(Debug)]
pub struct FaultGate {
    addr: SocketAddr,
    mode: watch::Sender<Mode>,
    applied: Arc<AtomicU64>,
    /// Bytes per second relayed from the upstream per connection; 0: no limit.
    rate: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl FaultGate {
    /// Starts relaying `127.0.0.1:<free port>` to `target`, with no outage.
    pub async fn start(target: SocketAddr) -> Result<Self> {
        let listener = bind_below_ephemeral().await?;
        let addr = listener.local_addr()?;
        let (mode, rx) = watch::channel(Mode {
            outage: Outage::None,
            generation: 0,
        });
        let applied = Arc::new(AtomicU64::new(0));
        let rate = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(serve(
            listener,
            addr,
            target,
            rx,
            Arc::clone(&applied),
            Arc::clone(&rate),
        ));
        Ok(Self {
            addr,
            mode,
            applied,
            rate,
            task,
        })
    }

    /// `http://127.0.0.1:PORT`, the URL to give the cache for the upstream.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Switches to `outage`, ending every connection open through the gate;
    /// returns once new connections get the new behaviour (for
    /// [`Outage::Down`]: once the port is closed). Errors after 5 s.
    pub async fn set(&self, outage: Outage) -> Result<()> {
        let mut generation = 0;
        self.mode.send_modify(|m| {
            m.generation += 1;
            m.outage = outage;
            generation = m.generation;
        });
        wait_until(Duration::from_secs(5), || async {
            self.applied.load(Ordering::Acquire) >= generation
        })
        .await
        .with_context(|| format!("fault gate {} did not switch to {outage:?}", self.addr))
    }

    /// Relays at most `bytes_per_sec` from the upstream on each connection
    /// (`None`: as fast as it comes), from now on, open connections
    /// included; requests are relayed to the upstream unthrottled.
    pub fn throttle(&self, bytes_per_sec: Option<u64>) {
        let rate = bytes_per_sec.map_or(0, |r| r.max(1));
        self.rate.store(rate, Ordering::Release);
    }
}

impl Drop for FaultGate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The gate's accept loop: binds and unbinds its port as the mode asks and
/// hands each connection to [`connection`].
async fn serve(
    listener: TcpListener,
    addr: SocketAddr,
    target: SocketAddr,
    mut rx: watch::Receiver<Mode>,
    applied: Arc<AtomicU64>,
    rate: Arc<AtomicU64>,
) {
    let mut listener = Some(listener);
    loop {
        let mode = *rx.borrow_and_update();
        if mode.outage == Outage::Down {
            listener = None;
        } else if listener.is_none() {
            listener = rebind(addr).await;
            if listener.is_none() {
                // Still taken: [`FaultGate::set`] times out saying so.
                continue;
            }
        }
        applied.store(mode.generation, Ordering::Release);
        let accepted = match &listener {
            Some(l) => tokio::select! {
                a = l.accept() => a.ok(),
                c = rx.changed() => { if c.is_err() { return; } None }
            },
            None => {
                if rx.changed().await.is_err() {
                    return;
                }
                None
            }
        };
        if let Some((conn, _)) = accepted {
            tokio::spawn(connection(
                conn,
                target,
                mode.outage,
                rx.clone(),
                Arc::clone(&rate),
            ));
        }
    }
}

/// A listener on 127.0.0.1 at a free port below the ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`, 32768 when unreadable).
async fn bind_below_ephemeral() -> Result<TcpListener> {
    let lowest_ephemeral: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let below = lowest_ephemeral / 2..lowest_ephemeral;
    for _ in 0..100 {
        let port = rand::random_range(below.clone());
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)).await {
            return Ok(l);
        }
    }
    bail!("no free port in {below:?} for a fault gate")
}

/// Binds `addr` again after an outage; `None` if it stays taken for 5 s.
async fn rebind(addr: SocketAddr) -> Option<TcpListener> {
    for _ in 0..100 {
        if let Ok(l) = TcpListener::bind(addr).await {
            return Some(l);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// One client connection in `outage` mode, until it ends or the mode changes.
async fn connection(
    mut client: TcpStream,
    target: SocketAddr,
    outage: Outage,
    mut rx: watch::Receiver<Mode>,
    rate: Arc<AtomicU64>,
) {
    let work = async {
        match outage {
            Outage::None => {
                if let Ok(upstream) = TcpStream::connect(target).await {
                    let (mut client_rd, mut client_wr) = client.split();
                    let (mut upstream_rd, mut upstream_wr) = upstream.into_split();
                    let requests = async {
                        let _ = tokio::io::copy(&mut client_rd, &mut upstream_wr).await;
                        let _ = upstream_wr.shutdown().await;
                    };
                    let responses = async {
                        let _ = throttled_copy(&mut upstream_rd, &mut client_wr, &rate).await;
                        let _ = client_wr.shutdown().await;
                    };
                    tokio::join!(requests, responses);
                }
            }
            Outage::Silent => {
                let mut sink = [0u8; 4096];
                while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
            }
            Outage::Status(code) => {
                if read_request_head(&mut client).await.is_ok() {
                    let _ = client.write_all(status_response(code).as_bytes()).await;
                    let _ = client.shutdown().await;
                }
            }
            // Connections accepted just before the port closed.
            Outage::Down => {}
        }
    };
    tokio::select! {
        () = work => {}
        _ = rx.changed() => {}
    }
}

/// Copies `from` to `to` until EOF, at most `rate` bytes per second (read
/// anew for every chunk; 0: no limit), in chunks of a twentieth of a second.
async fn throttled_copy(
    from: &mut (impl AsyncReadExt + Unpin),
    to: &mut (impl AsyncWriteExt + Unpin),
    rate: &AtomicU64,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    // Pace since the rate was last set: (start, bytes since, rate).
    let mut pace = (tokio::time::Instant::now(), 0u64, 0u64);
    loop {
        let limit = rate.load(Ordering::Acquire);
        if limit != pace.2 {
            pace = (tokio::time::Instant::now(), 0, limit);
        }
        let chunk = if limit == 0 {
            buf.len()
        } else {
            (limit / 20).clamp(1, buf.len() as u64) as usize
        };
        let n = from.read(&mut buf[..chunk]).await?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
        if limit != 0 {
            pace.1 += n as u64;
            let due = pace.0 + Duration::from_secs_f64(pace.1 as f64 / limit as f64);
            tokio::time::sleep_until(due).await;
        }
    }
}

/// Reads up to the end of a request's header block (bodies are not expected:
/// the cache only sends GET and HEAD).
async fn read_request_head(conn: &mut TcpStream) -> Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            bail!("connection closed before the request head ended");
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > 256 << 10 {
            bail!("request head too large");
        }
    }
    Ok(())
}

/// A complete HTTP/1.1 response with `code` and an OCI error body, closing
/// the connection.
fn status_response(code: u16) -> String {
    let body = format!(
        r#"{{"errors":[{{"code":"UNAVAILABLE","message":"fault gate answers {code}","detail":null}}]}}"#
    );
    let retry = if code == 429 {
        "Retry-After: 60\r\n"
    } else {
        ""
    };
    format!(
        "HTTP/1.1 {code} Fault\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{retry}Connection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RequestLog;

    #[test]
    fn status_responses_are_complete() {
        let r = status_response(429);
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 429 "));
        assert!(head.contains("Retry-After: 60"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert!(!status_response(500).contains("Retry-After"));
    }

    #[tokio::test]
    async fn acts_out_each_outage_and_recovers() {
        let upstream = crate::FakeUpstream::start().await.unwrap();
        let gate = FaultGate::start(upstream.addr()).await.unwrap();
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_millis(500))
            .build()
            .unwrap();
        let url = format!("{}/v2/", gate.url());
        let get = || client.get(&url).send();
        assert_eq!(get().await.unwrap().status(), 200);
        for code in [500, 429] {
            gate.set(Outage::Status(code)).await.unwrap();
            let r = get().await.unwrap();
            assert_eq!(r.status(), code);
            assert_eq!(r.headers().contains_key("retry-after"), code == 429);
        }
        gate.set(Outage::Down).await.unwrap();
        assert!(get().await.unwrap_err().is_connect());
        gate.set(Outage::Silent).await.unwrap();
        assert!(get().await.unwrap_err().is_timeout());
        gate.set(Outage::None).await.unwrap();
        assert_eq!(get().await.unwrap().status(), 200);
        assert_eq!(upstream.count("GET", "/v2/"), 2, "outages never reach it");
    }

    #[tokio::test]
    async fn throttles_what_the_upstream_sends() {
        let upstream = crate::FakeUpstream::start().await.unwrap();
        let image =
            crate::seed::build_image(&crate::seed::ImageSpec::oci(&[400_000]).gzip_level(0))
                .unwrap();
        upstream.add_image("library/app", Some("v1"), &image);
        let gate = FaultGate::start(upstream.addr()).await.unwrap();
        let layer = &image.layers[0];
        let url = format!("{}/v2/library/app/blobs/{}", gate.url(), layer.digest);
        let client = crate::util::http_client();
        let timed_get = || async {
            let started = std::time::Instant::now();
            let body = client
                .get(&url)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            assert_eq!(body.len(), layer.bytes.len());
            started.elapsed()
        };
        gate.throttle(Some(400_000));
        let took = timed_get().await;
        assert!(took >= Duration::from_millis(900), "throttled: {took:?}");
        gate.throttle(None);
        let took = timed_get().await;
        assert!(took < Duration::from_millis(500), "unthrottled: {took:?}");
    }
}

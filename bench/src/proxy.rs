//! A TCP proxy on loopback in front of the upstream: adds latency or injects faults
//! (refused, silent, slow, reset) at the TCP level, so both caches see the same upstream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// What the proxy does. Changing the mode closes every connection already open, so
/// pooled upstream connections meet the new mode too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Relay; the upstream's bytes are delivered `delay` late and a new connection
    /// waits `delay` before it is relayed (one extra round trip's worth).
    Pass { delay: Duration },
    /// The listener is closed: connects are refused.
    Refuse,
    /// Connections are accepted, requests read and never answered.
    Silent,
    /// Relay, the upstream's bytes (headers included) trickle at this rate.
    Slow { bytes_per_sec: u64 },
    /// Read the request, then reset the connection (RST, no response).
    Reset,
}

/// The proxy; stops on drop.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    mode: Arc<watch::Sender<Mode>>,
    task: JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on `127.0.0.1:0`, relays to `upstream`.
    pub async fn start(upstream: SocketAddr, mode: Mode) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = watch::channel(mode);
        let task = tokio::spawn(accept_loop(listener, upstream, rx));
        Ok(Self {
            addr,
            mode: Arc::new(tx),
            task,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, mut mode: watch::Receiver<Mode>) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
                // Close every open connection: the fault applies to pooled ones too.
                conns.abort_all();
                if *mode.borrow() == Mode::Refuse {
                    drop(listener);
                    // Stay alive (holding nothing) until dropped.
                    std::future::pending::<()>().await;
                    return;
                }
                continue;
            }
        };
        let Ok((client, _)) = accepted else { continue };
        let _ = client.set_nodelay(true);
        let m = *mode.borrow();
        conns.spawn(handle(client, upstream, m));
        // Reap finished connection tasks.
        while conns.try_join_next().is_some() {}
    }
}

async fn handle(mut client: TcpStream, upstream: SocketAddr, mode: Mode) {
    match mode {
        Mode::Refuse => {}
        Mode::Silent => {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = client.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        }
        Mode::Reset => {
            let mut buf = vec![0u8; 16 * 1024];
            let _ = client.read(&mut buf).await;
            let _ = client.set_zero_linger();
            drop(client);
        }
        Mode::Pass { delay } => {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if let Ok(up) = TcpStream::connect(upstream).await {
                let _ = up.set_nodelay(true);
                relay(client, up, Pace::Delay(delay)).await;
            }
        }
        Mode::Slow { bytes_per_sec } => {
            if let Ok(up) = TcpStream::connect(upstream).await {
                let _ = up.set_nodelay(true);
                relay(client, up, Pace::Rate(bytes_per_sec)).await;
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Pace {
    Delay(Duration),
    Rate(u64),
}

async fn relay(client: TcpStream, up: TcpStream, pace: Pace) {
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = up.into_split();
    let to_up = async {
        let _ = tokio::io::copy(&mut cr, &mut uw).await;
        let _ = uw.shutdown().await;
    };
    let to_client = async {
        match pace {
            Pace::Delay(d) if d.is_zero() => {
                let _ = tokio::io::copy(&mut ur, &mut cw).await;
            }
            Pace::Delay(d) => {
                // Reader stamps chunks, writer delivers each `d` after it was read.
                let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(256);
                let reader = async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = ur.read(&mut buf).await {
                        if n == 0
                            || tx
                                .send((Instant::now() + d, buf[..n].to_vec()))
                                .await
                                .is_err()
                        {
                            break;
                        }
                    }
                };
                let writer = async {
                    while let Some((due, chunk)) = rx.recv().await {
                        tokio::time::sleep_until(due).await;
                        if cw.write_all(&chunk).await.is_err() {
                            break;
                        }
                    }
                };
                tokio::join!(reader, writer);
            }
            Pace::Rate(bps) => {
                // 20 slices a second.
                let slice = usize::try_from((bps / 20).max(1)).unwrap_or(1);
                let mut buf = vec![0u8; slice];
                while let Ok(n) = ur.read(&mut buf).await {
                    if n == 0 || cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        let _ = cw.shutdown().await;
    };
    tokio::join!(to_up, to_client);
}

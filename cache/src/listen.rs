//! The HTTP listener: the listening socket (dual-stack for `[::]`), connection
//! limits that protect the cache from hostile or broken clients, and a
//! graceful shutdown with a deadline.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpSocket};
use tower::ServiceExt;

use crate::zerocopy::ZeroCopyStream;
use tokio::sync::Semaphore;

/// Request line plus headers; registry requests need a few KiB at most.
/// Larger ones are answered `431` before any routing.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// A client must send its whole header block within this (slowloris).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight responses may run on after a shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(25);

/// Default bound on open client connections; past it, new connections wait
/// in the kernel's accept queue instead of costing memory.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;

/// Accept-queue length. `TcpListener::bind` uses 128: a burst of more concurrent
/// connects (nodes pulling at once, a client opening many connections) overflows
/// it, and the kernel drops the extra SYNs, costing each of those clients a 1 s
/// SYN retransmit. Linux caps this at `net.core.somaxconn` (4096 by default).
const LISTEN_BACKLOG: u32 = 4096;

/// A listening socket on `addr`. An IPv6 address is bound with `IPV6_V6ONLY`
/// off, so `[::]:PORT` also accepts IPv4 (as `::ffff:a.b.c.d`) whatever the
/// host's `net.ipv6.bindv6only` says: the operator renders `listen = "[::]:PORT"`
/// and nodes reach the cache over either family. On a host without IPv6
/// (the kernel refuses the IPv6 socket or the bind), `[::]:PORT` falls back to
/// `0.0.0.0:PORT` with a warning; other addresses fail as they are.
///
/// # Errors
/// The socket's: the port in use, no permission, an address not on this host.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    match bind_exactly(addr) {
        Err(e)
            if addr.ip().is_unspecified()
                && addr.is_ipv6()
                && !matches!(
                    e.kind(),
                    std::io::ErrorKind::AddrInUse | std::io::ErrorKind::PermissionDenied
                ) =>
        {
            let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port()));
            tracing::warn!(%addr, error = %e, fallback = %v4, "no IPv6 on this host: listening on IPv4 only");
            bind_exactly(v4)
        }
        r => r,
    }
}

fn bind_exactly(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        let s = TcpSocket::new_v6()?;
        rustix::net::sockopt::set_ipv6_v6only(&s, false)?;
        s
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and
/// waits up to `grace` for open connections to finish. At most `max_connections`
/// are open at once.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
    max_connections: usize,
) {
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        // Body buffers must reach the socket uncopied: see `zerocopy`.
        .writev(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let (stream, queue) = ZeroCopyStream::new(stream);
        let service = TowerToHyperService::new(app.clone().map_request(
            move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(queue.clone());
                req
            },
        ));
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(grace) => {
            tracing::warn!(?grace, "connections still open after the shutdown grace period");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Accepts one connection on `listener` after a connect to `to`, and
    /// returns the peer address the listener saw.
    async fn round_trip(listener: &TcpListener, to: SocketAddr) -> SocketAddr {
        let (mut client, accepted) = tokio::join!(
            async { tokio::net::TcpStream::connect(to).await.unwrap() },
            async { listener.accept().await.unwrap() }
        );
        let (mut server, peer) = accepted;
        client.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        server.read_exact(&mut b).await.unwrap();
        peer
    }

    #[tokio::test]
    async fn the_ipv6_wildcard_answers_ipv4_and_ipv6() {
        let listener = bind("[::]:0".parse().unwrap()).unwrap();
        let local = listener.local_addr().unwrap();
        let port = local.port();
        let v4 = round_trip(&listener, SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await;
        assert_eq!(v4.ip().to_canonical(), Ipv4Addr::LOCALHOST);
        if local.is_ipv6() {
            // Explicitly off, not left to net.ipv6.bindv6only.
            assert!(!rustix::net::sockopt::ipv6_v6only(&listener).unwrap());
            // ::1 exists where the kernel has IPv6 (the wildcard bound as IPv6).
            let v6 = round_trip(
                &listener,
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
            )
            .await;
            assert_eq!(v6.ip(), std::net::Ipv6Addr::LOCALHOST);
        }
    }

    #[tokio::test]
    async fn other_addresses_bind_as_given() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        assert!(listener.local_addr().unwrap().is_ipv4());
        let taken = listener.local_addr().unwrap();
        let e = bind(taken).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
    }
}

//! The metrics HTTP server (hyper, HTTP/1.1): `GET /metrics` (Prometheus text format),
//! `GET /healthz` (200 while the process runs), `GET /readyz` (200 once the program is
//! attached and the config applied, else 503).

use std::{
    collections::HashMap,
    convert::Infallible,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, header, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::debug;

use super::{CONTENT_TYPE, Metrics};

/// A slow or idle client cannot hold a connection open longer than this without sending
/// a request head (trickled byte by byte or not).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once; more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 512;
/// Connections from one peer address at once: one client holding its share open (a
/// slowloris) leaves the rest for the scraper.
pub const MAX_CONNECTIONS_PER_PEER: usize = 32;

/// Counts open connections, overall and per peer address.
#[derive(Default)]
struct Connections {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// One admitted connection; gives its place back when dropped.
struct Admitted {
    connections: Arc<Mutex<Connections>>,
    peer: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut c = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        c.total -= 1;
        if let Some(n) = c.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                c.per_peer.remove(&self.peer);
            }
        }
    }
}

fn admit(connections: &Arc<Mutex<Connections>>, peer: IpAddr) -> Option<Admitted> {
    let mut c = connections.lock().unwrap_or_else(|p| p.into_inner());
    let mine = c.per_peer.get(&peer).copied().unwrap_or(0);
    if c.total >= MAX_CONNECTIONS || mine >= MAX_CONNECTIONS_PER_PEER {
        return None;
    }
    c.total += 1;
    *c.per_peer.entry(peer).or_default() += 1;
    Some(Admitted {
        connections: Arc::clone(connections),
        peer,
    })
}

/// The running server; stops when dropped.
pub struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    /// Binds `addr` (port 0 = any free port) and serves `metrics` on it from a task of the
    /// current tokio runtime.
    pub async fn start(addr: SocketAddr, metrics: Arc<Metrics>) -> io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(accept(listener, metrics));
        Ok(Self { addr, task })
    }

    /// The address it listens on (the bound port when started with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, metrics: Arc<Metrics>) {
    let connections = Arc::new(Mutex::new(Connections::default()));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                debug!(error = %e, "metrics: accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(admitted) = admit(&connections, peer.ip()) else {
            debug!(%peer, "metrics: too many connections, closed");
            drop(stream);
            continue;
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let _admitted = admitted;
            let service = service_fn(move |request| {
                let metrics = Arc::clone(&metrics);
                async move {
                    // Encoding reads every per-CPU counter map (~15 ms at 64 x 100): off the
                    // runtime's two workers, which the health probes need on time.
                    let response = if request.uri().path() == "/metrics" {
                        let method_ok =
                            request.method() == Method::GET || request.method() == Method::HEAD;
                        if method_ok {
                            let encoded = tokio::task::spawn_blocking(move || metrics.encode())
                                .await
                                .unwrap_or_default();
                            metrics_response(encoded)
                        } else {
                            respond(&request, &metrics)
                        }
                    } else {
                        respond(&request, &metrics)
                    };
                    Ok::<_, Infallible>(response)
                }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                debug!(error = %e, "metrics: connection");
            }
        });
    }
}

fn metrics_response(encoded: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = text(StatusCode::OK, encoded);
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(CONTENT_TYPE),
    );
    response
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn respond(request: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "GET or HEAD only\n");
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/metrics" => metrics_response(metrics.encode()),
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if metrics.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the program is not attached, or no config applied, or the last apply failed in the kernel\n",
        ),
        "/" => text(StatusCode::OK, "mlb: /metrics /healthz /readyz\n"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /readyz\n",
        ),
    }
}

//! The metrics endpoint a ferrovol process serves with `--metrics-listen ADDR`, over HTTP/1.1
//! (hyper):
//! - `GET /metrics`: every series of its registry, in the OpenMetrics text format (which
//!   Prometheus scrapes as is);
//! - `GET /healthz`: 200 while the process answers at all;
//! - `GET /readyz`: 200 once the process says it is ready (the server: its data dir is open and it
//!   accepts connections), 503 before.
//!
//! Scrapes are rare and small, so the endpoint is bounded rather than fast: at most
//! `CONNECTIONS_MAX` connections at once (more are closed at accept), a request's headers within
//! `HEADER_TIMEOUT`, a whole connection within `CONNECTION_TIMEOUT`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
pub use prometheus_client;
use prometheus_client::registry::Registry;

/// Connections served at once; more are closed at accept.
pub const CONNECTIONS_MAX: usize = 64;
/// A request's headers must arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection is closed after this, whatever it is doing.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// Exponential histogram buckets for service and end-to-end latencies: 10 us to about 10 s.
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(1e-5, 2.0, 21)
}

/// What an endpoint serves: a registry (filled at startup, read at each scrape), readiness, and
/// what to refresh before a scrape (gauges read from the process's state, such as store capacity).
pub struct Endpoint {
    registry: Registry,
    ready: Arc<AtomicBool>,
    refresh: Box<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint").field("ready", &self.ready.load(Ordering::Relaxed)).finish_non_exhaustive()
    }
}

impl Endpoint {
    pub fn new(
        registry: Registry,
        ready: Arc<AtomicBool>,
        refresh: impl Fn() + Send + Sync + 'static,
    ) -> Self {
        Self { registry, ready, refresh: Box::new(refresh) }
    }

    /// The text of `/metrics` now.
    pub fn scrape(&self) -> String {
        (self.refresh)();
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    fn respond(&self, req: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let reply = |status: StatusCode, content_type: &'static str, body: String| {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = status;
            r.headers_mut()
                .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
            r
        };
        if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n".into());
        }
        match req.uri().path() {
            "/metrics" => reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.scrape(),
            ),
            "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            "/readyz" if self.ready.load(Ordering::Acquire) => {
                reply(StatusCode::OK, "text/plain", "ready\n".into())
            }
            "/readyz" => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n".into()),
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "try /metrics, /healthz or /readyz\n".into()),
        }
    }
}

/// Serves `endpoint` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, endpoint: Arc<Endpoint>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics endpoint: too many connections; closing the new one");
            continue;
        };
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let endpoint = endpoint.clone();
                async move { Ok::<_, Infallible>(endpoint.respond(&req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // A connection past its time is dropped (closed) like one that ended.
            if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                tracing::debug!(%peer, error = %e, "metrics endpoint: connection failed");
            }
        });
    }
}

/// Binds `addr` and serves `endpoint` on it in a task of the current runtime; the bound address
/// (for port 0) and the task.
pub async fn start(
    addr: &str,
    endpoint: Arc<Endpoint>,
) -> std::io::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("metrics endpoint: cannot listen on {addr}: {e}"))
    })?;
    let bound = listener.local_addr()?;
    Ok((bound, tokio::spawn(serve(listener, endpoint))))
}

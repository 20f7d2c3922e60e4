//! The metrics endpoint a ferrovol process serves with `--metrics-listen ADDR`, over HTTP/1.1
//! (hyper):
//! - `GET /metrics`: every series of its registry, in the OpenMetrics text format (which
//!   Prometheus scrapes as is);
//! - `GET /healthz`: 200 while the process answers at all;
//! - `GET /readyz`: 200 once the process says it is ready (the server: its data dir is open and it
//!   accepts connections), 503 before.
//!
//! Scrapes are rare and small, so the endpoint is bounded rather than fast: at most
//! `CONNECTIONS_MAX` connections at once (more are closed at accept), one request per connection
//! (no keep-alive), its headers within `HEADER_TIMEOUT`, the whole connection within
//! `CONNECTION_TIMEOUT`. A scrape runs on the blocking pool, one at a time: the refresh may take
//! locks of the process's state, and the runtime it is served from may be the process's only one.

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
    /// One scrape at a time (a refresh between another's refresh and encode would show it half).
    scraping: std::sync::Mutex<()>,
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
        Self { registry, ready, refresh: Box::new(refresh), scraping: std::sync::Mutex::new(()) }
    }

    /// The text of `/metrics` now; an error when a series cannot be encoded.
    pub fn scrape(&self) -> Result<String, std::fmt::Error> {
        let _one = self.scraping.lock().unwrap_or_else(|p| p.into_inner());
        (self.refresh)();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    async fn respond(self: Arc<Self>, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
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
            "/metrics" => {
                let me = self.clone();
                match tokio::task::spawn_blocking(move || me.scrape()).await {
                    Ok(Ok(text)) => reply(
                        StatusCode::OK,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        text,
                    ),
                    Ok(Err(_)) | Err(_) => {
                        tracing::warn!("metrics endpoint: a series could not be encoded");
                        reply(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "text/plain",
                            "cannot encode the metrics\n".into(),
                        )
                    }
                }
            }
            "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            "/readyz" if self.ready.load(Ordering::Acquire) => {
                reply(StatusCode::OK, "text/plain", "ready\n".into())
            }
            "/readyz" => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n".into()),
            _ => reply(StatusCode::NOT_FOUND, "text/plain", "try /metrics, /healthz or /readyz\n".into()),
        }
    }
}

/// Serves `endpoint` on `listener` (see `start` for a handle that stops it).
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
                async move { Ok::<_, Infallible>(endpoint.respond(req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
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

/// The serving task of `start`: stopped when dropped.
#[derive(Debug)]
pub struct Serving(tokio::task::JoinHandle<()>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Binds `addr` and serves `endpoint` on it in a task of the current runtime; the bound address
/// (for port 0) and the task, which stops when dropped.
pub async fn start(addr: &str, endpoint: Arc<Endpoint>) -> std::io::Result<(std::net::SocketAddr, Serving)> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("metrics endpoint: cannot listen on {addr}: {e}"))
    })?;
    let bound = listener.local_addr()?;
    Ok((bound, Serving(tokio::spawn(serve(listener, endpoint)))))
}

//! Accepting connections, and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{info, warn, Instrument};

use crate::connection;
use crate::store::Store;

/// Connections served at once; more are accepted and closed at once with a log line.
pub const CONNECTIONS_MAX: usize = 1024;
/// How long shutdown waits for in-flight requests before closing connections anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Shared secret clients must present in HELLO; `None` accepts any client (loopback use).
    pub token: Option<String>,
    pub handshake_timeout: Duration,
    /// How long a connection polls for its next request before sleeping (0 = never poll).
    pub poll: Duration,
}

impl ServerConfig {
    pub fn new(data_dir: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        Self { data_dir: data_dir.into(), listen, token: None,
            handshake_timeout: Duration::from_secs(10),
            poll: Duration::from_micros(50),
        }
    }
}

/// What every connection shares.
#[derive(Debug)]
pub struct Context {
    pub store: Arc<Store>,
    pub token: Option<String>,
    pub handshake_timeout: Duration,
    pub poll: Duration,
}

#[derive(Debug)]
pub struct Server {
    ctx: Arc<Context>,
    listener: TcpListener,
}

impl Server {
    /// Opens the data dir and binds the listening socket.
    pub async fn bind(config: ServerConfig) -> anyhow::Result<Self> {
        let dir = config.data_dir.clone();
        let store = tokio::task::spawn_blocking(move || Store::open(&dir))
            .await
            .context("opening the data dir")?
            .with_context(|| format!("cannot use data dir {}", config.data_dir.display()))?;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let ctx = Arc::new(Context {
            store: Arc::new(store),
            token: config.token.filter(|t| !t.is_empty()),
            handshake_timeout: config.handshake_timeout,
            poll: config.poll,
        });
        Ok(Self { ctx, listener })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn store(&self) -> Arc<Store> {
        self.ctx.store.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting, lets connections answer what they have
    /// in flight (up to [`SHUTDOWN_GRACE`]), flushes every volume and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let limit = Arc::new(Semaphore::new(CONNECTIONS_MAX));
        let mut conns = JoinSet::new();
        let mut next_id: u64 = 0;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                accepted = self.listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let Ok(permit) = limit.clone().try_acquire_owned() else {
                        warn!(%peer, limit = CONNECTIONS_MAX, "too many connections; closing the new one");
                        continue;
                    };
                    next_id += 1;
                    let span = tracing::info_span!("conn", id = next_id, %peer);
                    let ctx = self.ctx.clone();
                    let stop = stop_rx.clone();
                    conns.spawn(
                        async move {
                            connection::serve(stream, ctx, stop).await;
                            drop(permit);
                        }
                        .instrument(span),
                    );
                }
            }
        }
        info!(connections = conns.len(), "shutting down: no new connections, finishing in-flight requests");
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!("connections did not finish in time; closing them");
            conns.abort_all();
        }
        let store = self.ctx.store.clone();
        tokio::task::spawn_blocking(move || store.flush_all()).await??;
        info!("all volumes flushed; bye");
        Ok(())
    }
}

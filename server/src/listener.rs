//! Accepting connections, and graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn, Instrument};

use crate::connection;
use crate::store::Store;

/// Connections served at once; more are accepted and closed at once with a log line.
pub const CONNECTIONS_MAX: usize = 1024;
/// Connections from one IP address at once.
pub const CONNECTIONS_PER_PEER_MAX: usize = 256;
/// Connections that have not completed HELLO yet, at once. When a new connection would go over
/// any cap, the oldest connection still in its handshake (of that peer, for the per-peer cap) is
/// closed to make room: a flood of idle or half-sent handshakes cannot lock real clients out,
/// since a real client completes its handshake in a round trip and is never the oldest for long.
pub const HANDSHAKES_MAX: usize = 128;
/// How long shutdown waits for in-flight requests before closing connections anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Refusals logged per second at most (failed handshakes, connections over a cap, slow or idle
/// peers cut): a flood of bad clients must not flood the log too.
pub const REFUSAL_LOGS_PER_S: u32 = 10;

/// Runs `log` (a `warn!` of a refusal) unless `REFUSAL_LOGS_PER_S` refusals were already logged in
/// this second; those not logged are counted, and the count is logged with the next second's first.
pub(crate) fn refusal(log: impl FnOnce()) {
    static STATE: std::sync::Mutex<(u64, u32, u64)> = std::sync::Mutex::new((0, 0, 0));
    let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut st = STATE.lock().unwrap_or_else(|p| p.into_inner());
    if st.0 != now_s {
        if st.2 > 0 {
            warn!(suppressed = st.2, "more refusals were not logged (rate limit)");
        }
        *st = (now_s, 0, 0);
    }
    if st.1 < REFUSAL_LOGS_PER_S {
        st.1 += 1;
        drop(st);
        log();
    } else {
        st.2 += 1;
    }
}

/// Who may connect, and as whom (see PROTOCOL.md, "Identity"). With neither token the server is
/// open: any client may claim any node id and every session is admin (loopback and tests only).
#[derive(Clone, Default)]
pub struct Auth {
    /// The admin credential: may act for any node (the CSI controller, `ferrovol up`'s own client).
    pub admin_token: Option<String>,
    /// Lets a node that is not enrolled yet enroll: it then gets a credential of its own, which
    /// it must present from then on (the join token alone no longer admits it).
    pub join_token: Option<String>,
}

impl Auth {
    /// No credential configured: identity is claimed, not proven.
    pub fn is_open(&self) -> bool {
        self.admin_token.is_none() && self.join_token.is_none()
    }
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secrets themselves.
        f.debug_struct("Auth")
            .field("admin_token", &self.admin_token.is_some())
            .field("join_token", &self.join_token.is_some())
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub auth: Auth,
    /// TLS on the port (`None`: plaintext). With it, plaintext clients are refused with a clear
    /// error.
    pub tls: Option<Arc<ferrovol_proto::tls::ServerConfig>>,
    pub handshake_timeout: Duration,
    /// After HELLO: a frame must arrive whole within this once its first byte did (slow senders
    /// are cut).
    pub frame_timeout: Duration,
    /// After HELLO: a connection with nothing in flight that sends nothing for this long is closed
    /// (clients send a PING every few seconds while idle).
    pub idle_timeout: Duration,
    /// How long a connection polls for its next request before sleeping (0 = never poll).
    pub poll: Duration,
    /// Connection threads (default: the number of CPUs).
    pub workers: usize,
    /// Pace of the background copies of snapshots and clones (bytes/s; 0 = as fast as the disk
    /// goes), so that they do not starve the volumes' own I/O.
    pub copy_bytes_per_s: u64,
}

impl ServerConfig {
    pub fn new(data_dir: impl Into<PathBuf>, listen: SocketAddr) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen,
            auth: Auth::default(),
            tls: None,
            handshake_timeout: Duration::from_secs(10),
            frame_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            poll: Duration::from_micros(300),
            workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
            copy_bytes_per_s: 0,
        }
    }
}

/// Admission: the connection caps (total, per peer, in handshake) and the queue of connections still
/// in their handshake, oldest first, each with the `Notify` that evicts it.
#[derive(Debug, Default)]
pub struct Admission {
    state: std::sync::Mutex<AdmissionState>,
}

#[derive(Debug, Default)]
struct AdmissionState {
    total: usize,
    per_peer: std::collections::HashMap<std::net::IpAddr, usize>,
    handshaking: std::collections::VecDeque<(u64, std::net::IpAddr, Arc<tokio::sync::Notify>)>,
}

/// A connection's place under the caps; released on drop.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    id: u64,
    peer: std::net::IpAddr,
    /// Notified when the connection is evicted during its handshake.
    pub evict: Arc<tokio::sync::Notify>,
}

impl Admission {
    fn lock(&self) -> std::sync::MutexGuard<'_, AdmissionState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits connection `id` from `peer`, evicting the oldest handshake if a cap is reached; `None`
    /// (refuse it) when every connection in the way has authenticated.
    pub fn admit(self: &Arc<Self>, id: u64, peer: std::net::IpAddr) -> Option<Ticket> {
        let mut st = self.lock();
        let over_peer = st.per_peer.get(&peer).copied().unwrap_or(0) >= CONNECTIONS_PER_PEER_MAX;
        if over_peer || st.total >= CONNECTIONS_MAX || st.handshaking.len() >= HANDSHAKES_MAX {
            let victim = if over_peer {
                st.handshaking.iter().position(|(_, p, _)| *p == peer)
            } else {
                (!st.handshaking.is_empty()).then_some(0)
            };
            let Some((_, old_peer, evict)) = victim.and_then(|v| st.handshaking.remove(v)) else {
                crate::metrics::metrics().refused("over_capacity");
                return None;
            };
            crate::metrics::metrics().refused("evicted_in_handshake");
            // Its count drops when it has gone; until then the caps are over by one.
            evict.notify_one();
            drop(st);
            refusal(
                || warn!(%peer, evicted_peer = %old_peer, "connection caps reached; closed the oldest handshake"),
            );
            st = self.lock();
        }
        st.total += 1;
        *st.per_peer.entry(peer).or_insert(0) += 1;
        let evict = Arc::new(tokio::sync::Notify::new());
        st.handshaking.push_back((id, peer, evict.clone()));
        crate::metrics::metrics().connections.inc();
        Some(Ticket { admission: self.clone(), id, peer, evict })
    }
}

impl Ticket {
    /// The handshake succeeded: the connection can no longer be evicted.
    pub fn authenticated(&self) {
        let mut st = self.admission.lock();
        st.handshaking.retain(|(id, _, _)| *id != self.id);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        crate::metrics::metrics().connections.dec();
        let mut st = self.admission.lock();
        st.handshaking.retain(|(id, _, _)| *id != self.id);
        st.total = st.total.saturating_sub(1);
        if let Some(n) = st.per_peer.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.per_peer.remove(&self.peer);
            }
        }
    }
}

/// The connections of client sessions, by (session, slot): a HELLO for a slot that has a live
/// connection retires that connection (see `Hello::slot`).
#[derive(Debug, Default)]
pub struct Slots {
    map: std::sync::Mutex<std::collections::HashMap<(u64, u16), std::sync::Weak<SlotFence>>>,
}

/// One slot's current epoch. Writes hold it shared across their check and their pwrite; a new
/// HELLO for the slot takes it exclusively to move it on.
#[derive(Debug, Default)]
pub struct SlotFence {
    epoch: std::sync::RwLock<u64>,
}

impl Slots {
    /// Claims `(session, slot)` for a new connection: returns the slot's fence and the epoch this
    /// connection writes under. Any older connection of the slot is retired by this.
    pub fn claim(&self, session: u64, slot: u16) -> (Arc<SlotFence>, u64) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(fence) = map.get(&(session, slot)).and_then(std::sync::Weak::upgrade) {
            drop(map);
            let mut epoch = fence.epoch.write().unwrap_or_else(|p| p.into_inner());
            *epoch += 1;
            let mine = *epoch;
            drop(epoch);
            return (fence, mine);
        }
        if map.len() >= 2 * CONNECTIONS_MAX {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let fence = Arc::new(SlotFence::default());
        map.insert((session, slot), Arc::downgrade(&fence));
        (fence, 0)
    }
}

impl SlotFence {
    /// Runs `write` if `epoch` is still the slot's, holding the slot shared until it is done.
    pub fn current<T>(&self, epoch: u64, write: impl FnOnce() -> T) -> Option<T> {
        let now = self.epoch.read().unwrap_or_else(|p| p.into_inner());
        (*now == epoch).then(write)
    }
}

/// What every connection shares.
pub struct Context {
    pub store: Arc<Store>,
    pub auth: Auth,
    pub tls: Option<ferrovol_proto::tls::TlsAcceptor>,
    pub slots: Slots,
    pub handshake_timeout: Duration,
    pub frame_timeout: Duration,
    pub idle_timeout: Duration,
    pub poll: Duration,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("auth", &self.auth)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub struct Server {
    ctx: Arc<Context>,
    listener: TcpListener,
    workers: usize,
}

/// A new connection handed to a worker thread.
struct Job {
    stream: std::net::TcpStream,
    span: tracing::Span,
    ctx: Arc<Context>,
    stop: watch::Receiver<bool>,
    ticket: Ticket,
}

/// The connection threads. Dropped without a graceful shutdown (the `run` future was dropped: a test
/// killing the server, a panic), they cut every connection at once, like a crash, and are joined.
struct Workers {
    senders: Vec<tokio::sync::mpsc::UnboundedSender<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.senders.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One connection thread: serves the connections it is handed until the sender is dropped. On a
/// graceful shutdown (`stop` is true) the connections get the grace period to finish; otherwise they
/// are cut at once.
async fn worker(mut rx: tokio::sync::mpsc::UnboundedReceiver<Job>, stop: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            job = rx.recv() => {
                let Some(job) = job else { break };
                let Job { stream, span, ctx, stop, ticket } = job;
                match tokio::net::TcpStream::from_std(stream) {
                    Ok(stream) => {
                        conns.spawn(
                            async move {
                                connection::serve(stream, ctx, stop, &ticket).await;
                                drop(ticket);
                            }
                            .instrument(span),
                        );
                    }
                    Err(e) => warn!(error = %e, "cannot register the connection"),
                }
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    if !*stop.borrow() {
        conns.abort_all();
        while conns.join_next().await.is_some() {}
        return;
    }
    let drained = tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!("connections did not finish in time; closing them");
        conns.abort_all();
    }
}

impl Server {
    /// Opens the data dir and binds the listening socket.
    pub async fn bind(config: ServerConfig) -> anyhow::Result<Self> {
        let nofile = crate::files::raise_fd_limit();
        tracing::debug!(nofile, "open file limit");
        let dir = config.data_dir.clone();
        let store = tokio::task::spawn_blocking(move || Store::open(&dir))
            .await
            .context("opening the data dir")?
            .with_context(|| format!("cannot use data dir {}", config.data_dir.display()))?;
        store.set_copy_rate(config.copy_bytes_per_s);
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let ctx = Arc::new(Context {
            store: Arc::new(store),
            tls: config.tls.map(ferrovol_proto::tls::TlsAcceptor::from),
            slots: Slots::default(),
            auth: Auth {
                admin_token: config.auth.admin_token.filter(|t| !t.is_empty()),
                join_token: config.auth.join_token.filter(|t| !t.is_empty()),
            },
            handshake_timeout: config.handshake_timeout,
            frame_timeout: config.frame_timeout,
            idle_timeout: config.idle_timeout,
            poll: config.poll,
        });
        Ok(Self { ctx, listener, workers: config.workers })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn store(&self) -> Arc<Store> {
        self.ctx.store.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting, lets connections answer what they have
    /// in flight (up to [`SHUTDOWN_GRACE`]), flushes every volume and returns.
    ///
    /// Threads: connections are spread round-robin over `workers` threads, each running its own
    /// single-threaded runtime, so a connection's tasks never hop between threads (a cross-thread
    /// wakeup costs tens of microseconds on a VM, more than a whole 4 KiB request). The caller's
    /// runtime only accepts.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let admission = Arc::new(Admission::default());
        let worker_count = self.workers.max(1);
        let mut senders = Vec::with_capacity(worker_count);
        let mut threads = Vec::with_capacity(worker_count);
        for i in 0..worker_count {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let stop = stop_rx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ferrovol-conn-{i}"))
                .spawn(move || rt.block_on(worker(rx, stop)))?;
            senders.push(tx);
            threads.push(thread);
        }
        let mut workers = Workers { senders, threads };
        let mut next_id: u64 = 0;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = self.listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            refusal(|| warn!(error = %e, "accept failed"));
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let Some(ticket) = admission.admit(next_id + 1, peer.ip()) else {
                        refusal(|| warn!(%peer, total = CONNECTIONS_MAX, per_peer = CONNECTIONS_PER_PEER_MAX,
                            "too many connections; closing the new one"));
                        continue;
                    };
                    let stream = match stream.into_std() {
                        Ok(s) => s,
                        Err(e) => {
                            warn!(%peer, error = %e, "cannot hand the connection to a worker");
                            continue;
                        }
                    };
                    next_id += 1;
                    let span = tracing::info_span!("conn", id = next_id, %peer);
                    let job = Job { stream, span, ctx: self.ctx.clone(), stop: stop_rx.clone(), ticket };
                    let w = usize::try_from(next_id).unwrap_or(0) % worker_count;
                    if workers.senders[w].send(job).is_err() {
                        warn!(%peer, "connection worker is gone");
                    }
                }
            }
        }
        info!("shutting down: no new connections, finishing in-flight requests");
        let _ = stop_tx.send(true);
        workers.senders.clear();
        let threads = std::mem::take(&mut workers.threads);
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        });
        let _ = joined.await;
        let store = self.ctx.store.clone();
        // Block volumes are made durable first: an fs volume's unmount (which syncs its
        // filesystem) may take long, or hang on a sick disk, and must not hold that off.
        tokio::task::spawn_blocking(move || {
            let flushed = store.flush_all();
            store.unmount_all();
            flushed
        })
        .await??;
        info!("all volumes flushed; bye");
        Ok(())
    }
}

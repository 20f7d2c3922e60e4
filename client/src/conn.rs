//! One protocol connection with transparent reconnect.
//!
//! A caller registers its request in the shared pending map (which gives it a request id) and writes the
//! frame itself: frames go through a queue, and whichever caller holds the write half writes everything
//! queued in one vectored write (flat combining), so there is no hop through another task on the hot
//! path and concurrent callers still share syscalls. A reader task owns the read half, matches replies to
//! pending calls by request id (replies may come in any order) and completes them. A supervisor task
//! watches the connection and handles deadlines and reconnects.
//!
//! When the connection breaks, the supervisor reconnects with exponential backoff, repeats the handshake,
//! re-OPENs the volumes that were open (handles are per connection) and re-sends every pending data
//! request in its original order: block reads and writes are idempotent. Control requests that were
//! already sent fail with `ConnectionLost` (they may have happened). Every call has a deadline
//! (`io_timeout` after it was submitted, reconnects included) after which its caller gets an error:
//! nothing waits forever.

use std::collections::HashMap;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferrovol_proto::codec::{split_response, Hello};
use ferrovol_proto::fs::Notice;
use ferrovol_proto::io::{poll_for, read_polling, write_all_vectored, Spin};
use ferrovol_proto::io::{ReadHalf, Stream, WriteHalf};
use ferrovol_proto::limits::{PROTOCOL_VERSION, PROTOCOL_VERSION_MIN};
use ferrovol_proto::opcode::FEATURES_ALL;
use ferrovol_proto::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::credential::Credentials;
use crate::error::{ClientError, Result};
use crate::ConnectOptions;

/// Frames gathered into one vectored write.
const WRITE_BATCH_MAX: usize = 64;
const READ_CHUNK: usize = 256 << 10;
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How often deadlines are checked.
const TICK: Duration = Duration::from_millis(100);
/// A connection the server has said nothing on for this long gets a PING (idle heartbeat, and the
/// probe of a connection whose replies stopped: the server answers PING at once, even while a long
/// FLUSH runs).
const PING_AFTER: Duration = Duration::from_secs(2);
/// A connection with calls outstanding (a PING at least) and nothing from the server for this long
/// is dead (a silent partition, a vanished host): reconnect and re-send, instead of waiting out
/// TCP's retransmission backoff.
const SILENCE_MAX: Duration = Duration::from_secs(5);
/// One connect attempt while reconnecting: short, so the first SYN after a partition heals comes
/// soon (a fresh attempt sends one at once).
const RECONNECT_ATTEMPT_MAX: Duration = Duration::from_secs(2);
/// The kernel gives up on a connection whose sent data stays unacknowledged this long
/// (TCP_USER_TIMEOUT), so a write into a dead path fails instead of retrying for ~15 minutes.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);
const _: () = assert!(PING_AFTER.as_millis() < SILENCE_MAX.as_millis());

/// Which connection of which client session: the same on every reconnect of that connection (see
/// `Hello::slot`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SessionSlot {
    pub(crate) id: u64,
    pub(crate) slot: u16,
}

/// A volume as known to one connection: the caller's id for it, stable across reconnects.
pub(crate) type LocalVol = u32;

#[derive(Debug, Clone)]
pub(crate) enum DataOp {
    Read { offset: u64, len: u32 },
    Write { offset: u64, data: Bytes, fua: bool },
    Flush,
    Trim { offset: u64, len: u32 },
    WriteZeroes { offset: u64, len: u32, fua: bool },
}

#[derive(Debug, Clone)]
pub(crate) enum Op {
    /// Not re-sent after a reconnect once it has been sent.
    Control(Request),
    Open {
        vol: LocalVol,
        name: VolumeName,
        read_only: bool,
        /// The writer attachment generation (read-write), kept for the re-OPEN after a reconnect.
        generation: u64,
    },
    Close {
        vol: LocalVol,
    },
    Data {
        vol: LocalVol,
        op: DataOp,
    },
    /// A file operation on an fs volume: re-sent after a reconnect like block I/O (see
    /// `ferrovol_proto::fs`).
    Fs {
        vol: LocalVol,
        node: u64,
        creds: ferrovol_proto::fs::Creds,
        op: ferrovol_proto::fs::FsOp,
    },
}

impl Op {
    fn opcode(&self) -> Opcode {
        match self {
            Op::Control(r) => r.opcode(),
            Op::Open { .. } => Opcode::Open,
            Op::Close { .. } => Opcode::Close,
            Op::Data { op, .. } => match op {
                DataOp::Read { .. } => Opcode::Read,
                DataOp::Write { .. } => Opcode::Write,
                DataOp::Flush => Opcode::Flush,
                DataOp::Trim { .. } => Opcode::Trim,
                DataOp::WriteZeroes { .. } => Opcode::WriteZeroes,
            },
            Op::Fs { op, .. } => op.opcode(),
        }
    }
}

pub(crate) struct Call {
    op: Op,
    reply: Done,
    deadline: Instant,
}

/// Who gets a call's result: a task awaiting it, or a function the reader runs as soon as the
/// reply is parsed (a FUSE request answered without waking any other thread).
pub(crate) enum Done {
    Wait(oneshot::Sender<Result<Reply>>),
    Then(Box<dyn FnOnce(Result<Reply>) + Send>),
}

impl Done {
    /// Hands over the result. A `Then` runs here: never call this with a lock held that the
    /// function could need (it answers the kernel and returns).
    fn send(self, r: Result<Reply>) -> std::result::Result<(), ()> {
        match self {
            Done::Wait(tx) => tx.send(r).map_err(|_| ()),
            Done::Then(f) => {
                f(r);
                Ok(())
            }
        }
    }
}

struct Pending {
    call: Call,
    sent: bool,
}

#[derive(Debug)]
struct VolEntry {
    name: VolumeName,
    read_only: bool,
    generation: u64,
    handle: Option<VolumeHandle>,
    /// Why the last re-OPEN failed (the server's status and message), for the errors of calls on
    /// this volume: FENCED after a takeover, NOT_FOUND...
    reopen_error: Option<ErrorReply>,
    /// fs volumes: where FS_NOTIFY notices go (see `Notices`).
    notices: Option<NoticeSink>,
}

/// Frames of notices queued for the applier before they are replaced by one `Notice::All`.
const NOTICE_FRAMES_QUEUED: usize = 1024;

/// A queue of notices: the sending end for the connections' readers, and the receiving end.
pub(crate) fn notice_queue() -> (NoticeSink, Notices) {
    let (tx, rx) = std::sync::mpsc::sync_channel(NOTICE_FRAMES_QUEUED);
    let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
    (NoticeSink { tx, lost: lost.clone() }, Notices { rx, lost })
}

#[derive(Debug, Clone)]
pub(crate) struct NoticeSink {
    tx: std::sync::mpsc::SyncSender<Vec<Notice>>,
    lost: Arc<std::sync::atomic::AtomicBool>,
}

impl NoticeSink {
    /// Never blocks (the reader calls it): a full queue becomes one `Notice::All` later.
    fn push(&self, notices: Vec<Notice>) {
        if let Err(std::sync::mpsc::TrySendError::Full(_)) = self.tx.try_send(notices) {
            self.lost.store(true, Ordering::Release);
        }
    }
}

/// The FS_NOTIFY notices of one fs volume, as the server sends them: changes other clients made
/// to what this one may cache. After a reconnect (notices may have been missed) and when the
/// queue overflowed, a `Notice::All` says to drop everything.
#[derive(Debug)]
pub struct Notices {
    rx: std::sync::mpsc::Receiver<Vec<Notice>>,
    lost: Arc<std::sync::atomic::AtomicBool>,
}

impl Notices {
    /// The next notices; `None` once the volume is closed.
    pub fn recv(&self) -> Option<Vec<Notice>> {
        if self.lost.swap(false, Ordering::AcqRel) {
            return Some(vec![Notice::All]);
        }
        self.rx.recv().ok()
    }
}

/// Everything about the connection that callers, the reader and the supervisor share.
#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    volumes: HashMap<LocalVol, VolEntry>,
    next_id: u64,
    /// A connection is up and its volumes are open: frames may be written.
    connected: bool,
    /// Incremented at every new connection; frames encoded for an older one are never written.
    generation: u64,
}

/// The write half with the connection generation it belongs to (None while disconnected).
type WriteSlot = Option<(u64, WriteHalf)>;

struct Shared {
    state: Mutex<State>,
    /// Frames waiting for a writer, tagged with their connection generation.
    queue: Mutex<Vec<(u64, RequestFrame)>>,
    wr: tokio::sync::Mutex<WriteSlot>,
    /// Signalled by a writer that hit an error, with the generation of the connection that failed in
    /// `broken_generation` (a late signal about an old connection must not tear down a new one).
    broken: Notify,
    broken_generation: AtomicU64,
    /// Signalled after a call is sent, so a reader asleep in a plain read (it had nothing to wait
    /// for) goes back to polling: the reply then costs no wakeup of its thread.
    sent: Notify,
    /// The reader is asleep with nothing awaited, registered for `sent`.
    reader_idle: std::sync::atomic::AtomicBool,
    /// When the server last sent anything (ms since `epoch`): the heartbeat's clock.
    heard_ms: AtomicU64,
    epoch: std::time::Instant,
    /// Reconnects that succeeded (for `ferrovol status`).
    reconnects: AtomicU64,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Vec<(u64, RequestFrame)>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Something arrived from the server.
    fn heard(&self) {
        self.heard_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// How long the server has been silent.
    fn silent_for(&self) -> Duration {
        Duration::from_millis(self.now_ms().saturating_sub(self.heard_ms.load(Ordering::Relaxed)))
    }

    /// Queues frames and writes everything queued if no one else is writing (flat combining): the
    /// holder of the write half drains the queue until it is empty, then re-checks after letting go,
    /// so no frame is left behind.
    async fn submit(&self, frames: impl IntoIterator<Item = (u64, RequestFrame)>) {
        self.queue().extend(frames);
        loop {
            let Ok(mut slot) = self.wr.try_lock() else { return };
            self.drain(&mut slot).await;
            drop(slot);
            if self.queue().is_empty() {
                return;
            }
        }
    }

    async fn drain(&self, slot: &mut WriteSlot) {
        loop {
            let batch: Vec<(u64, RequestFrame)> = {
                let mut q = self.queue();
                let n = q.len().min(WRITE_BATCH_MAX);
                q.drain(..n).collect()
            };
            if batch.is_empty() {
                return;
            }
            let Some((generation, w)) = slot.as_mut() else {
                // Disconnected: the supervisor re-sends every pending request after reconnecting.
                continue;
            };
            let gen = *generation;
            let mut slices: Vec<IoSlice<'_>> =
                batch.iter().filter(|(g, _)| *g == gen).flat_map(|(_, f)| f.io_slices()).collect();
            // The writer is whichever caller got here; if its future is dropped mid-write (a caller
            // giving up), the stream may hold half a frame and the rest of the batch is unsent. The
            // guard then breaks the connection, so the reconnect re-sends every pending request instead
            // of leaving them to time out.
            let mut guard = BreakOnDrop { shared: self, generation: gen, armed: true };
            let result = write_all_vectored(w, &mut slices).await;
            guard.armed = false;
            if let Err(e) = result {
                debug!(error = %e, "write failed");
                *slot = None;
                self.mark_broken(gen);
            }
        }
    }
}

impl Shared {
    fn mark_broken(&self, generation: u64) {
        self.broken_generation.store(generation, Ordering::Release);
        self.broken.notify_one();
    }
}

/// Hands results over once the state lock is let go (a `Done::Then` answers the kernel).
fn answer(results: Vec<(Done, Result<Reply>)>) {
    for (done, r) in results {
        let _ = done.send(r);
    }
}

/// Marks the connection broken if dropped while armed (see `Shared::drain`).
struct BreakOnDrop<'a> {
    shared: &'a Shared,
    generation: u64,
    armed: bool,
}

impl Drop for BreakOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.mark_broken(self.generation);
        }
    }
}

/// The wire request for a call, with the volume's current handle.
fn to_request(st: &State, op: &Op) -> std::result::Result<Request, ClientError> {
    let handle = |vol: &LocalVol| -> std::result::Result<VolumeHandle, ClientError> {
        match st.volumes.get(vol) {
            Some(VolEntry { handle: Some(h), .. }) => Ok(*h),
            Some(VolEntry { reopen_error: Some(e), name, .. }) => Err(ClientError::Server {
                op: Opcode::Open,
                status: e.status,
                message: format!("volume {name} could not be re-opened after a reconnect: {}", e.message),
            }),
            _ => Err(ClientError::InvalidArgument("volume is not open".into())),
        }
    };
    Ok(match op {
        Op::Control(r) => r.clone(),
        Op::Open { name, read_only, generation, .. } => {
            Request::Open { name: name.clone(), read_only: *read_only, generation: *generation }
        }
        Op::Close { vol } => Request::Close { handle: handle(vol)? },
        Op::Data { vol, op } => {
            let handle = handle(vol)?;
            match op.clone() {
                DataOp::Read { offset, len } => Request::Read { handle, offset, len },
                DataOp::Write { offset, data, fua } => Request::Write { handle, offset, data, fua },
                DataOp::Flush => Request::Flush { handle },
                DataOp::Trim { offset, len } => Request::Trim { handle, offset, len },
                DataOp::WriteZeroes { offset, len, fua } => Request::WriteZeroes { handle, offset, len, fua },
            }
        }
        Op::Fs { vol, node, creds, op } => {
            Request::Fs { handle: handle(vol)?, node: *node, creds: creds.clone(), op: op.clone() }
        }
    })
}

/// The caller's side of a connection. The supervisor stops when the last handle is dropped.
#[derive(Clone)]
pub(crate) struct ConnHandle {
    shared: Arc<Shared>,
    next_vol: Arc<AtomicU32>,
    io_timeout: Duration,
    _alive: Arc<oneshot::Sender<()>>,
}

impl std::fmt::Debug for ConnHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnHandle").field("io_timeout", &self.io_timeout).finish()
    }
}

impl ConnHandle {
    pub(crate) fn new_local_vol(&self) -> LocalVol {
        self.next_vol.fetch_add(1, Ordering::Relaxed)
    }

    /// Requests registered and not yet answered.
    pub(crate) fn in_flight(&self) -> usize {
        self.shared.state().pending.len()
    }

    /// Where the FS_NOTIFY notices of `vol` go from now on.
    pub(crate) fn set_notices(&self, vol: LocalVol, sink: &NoticeSink) {
        if let Some(v) = self.shared.state().volumes.get_mut(&vol) {
            v.notices = Some(sink.clone());
        }
    }

    /// Reconnects that succeeded so far.
    pub(crate) fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    /// Registers the call; returns its frame if it can be written now.
    fn register(&self, op: Op, reply: Done) -> Option<(u64, RequestFrame)> {
        let mut st = self.shared.state();
        if let Op::Open { vol, name, read_only, generation } = &op {
            st.volumes.insert(
                *vol,
                VolEntry {
                    name: name.clone(),
                    read_only: *read_only,
                    generation: *generation,
                    handle: None,
                    reopen_error: None,
                    notices: None,
                },
            );
        }
        let id = st.next_id.max(1);
        st.next_id = id + 1;
        let request = if st.connected {
            match to_request(&st, &op) {
                Ok(req) => Some((st.generation, req)),
                Err(e) => {
                    drop(st);
                    let _ = reply.send(Err(e));
                    return None;
                }
            }
        } else {
            None
        };
        let call = Call { op, reply, deadline: Instant::now() + self.io_timeout };
        st.pending.insert(id, Pending { call, sent: request.is_some() });
        drop(st);
        // Encoded (the payload's CRC: up to 4 MiB) outside the lock, which the reader takes for
        // every reply. A reconnect meanwhile moves the generation on, and `drain` drops a frame of
        // an older one; the reconnect re-sends the call from `pending`.
        request.map(|(generation, req)| (generation, req.encode(RequestId(id))))
    }

    pub(crate) async fn call(&self, op: Op) -> Result<Reply> {
        let (reply, rx) = oneshot::channel();
        self.send(op, Done::Wait(reply)).await;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Registers `op` and writes it (or leaves it to the writer at work); `reply` gets the result.
    async fn send(&self, op: Op, reply: Done) {
        if let Some(frame) = self.register(op, reply) {
            self.shared.submit([frame]).await;
            // Wakes the reader only if it is asleep with nothing awaited (no permit is stored, so a
            // busy reader never takes a stale one); a deep queue pays one atomic load per call.
            if self.shared.reader_idle.load(Ordering::Acquire) {
                self.shared.sent.notify_waiters();
            }
        }
    }

    /// Starts `op` from a thread outside the runtime (a FUSE thread) and returns once it is
    /// written: `then` runs on the reader when the reply comes. The write is done on this thread
    /// (it seldom waits: only for room in the socket buffer), so the request reaches the server
    /// without waking a runtime thread first: on this VM a wakeup costs as much as the whole
    /// round trip of a small request.
    pub(crate) fn start(
        &self,
        rt: &tokio::runtime::Handle,
        op: Op,
        then: Box<dyn FnOnce(Result<Reply>) + Send>,
    ) {
        rt.block_on(self.send(op, Done::Then(then)));
    }

    /// Fire-and-forget (used by `Drop`): the frame is written by the next writer, or re-sent after a
    /// reconnect.
    pub(crate) fn try_call(&self, op: Op) {
        let (reply, _rx) = oneshot::channel();
        if let Some(frame) = self.register(op, Done::Wait(reply)) {
            let shared = self.shared.clone();
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(async move { shared.submit([frame]).await });
                }
                Err(_) => shared.queue().push(frame),
            }
        }
    }
}

pub(crate) struct Established {
    stream: Stream,
    pub(crate) hello: HelloReply,
}

impl std::fmt::Debug for Established {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Established").field("hello", &self.hello).finish()
    }
}

/// Sends one request and waits for its reply on a connection that has no reader task yet.
async fn round_trip(
    stream: &mut Stream,
    buf: &mut BytesMut,
    id: RequestId,
    req: &Request,
) -> Result<Response> {
    let frame = req.encode(id);
    let mut slices: Vec<IoSlice<'_>> = frame.io_slices().collect();
    write_all_vectored(stream, &mut slices)
        .await
        .map_err(|e| ClientError::Protocol(format!("write: {e}")))?;
    loop {
        match split_response(buf) {
            Ok(Some(raw)) => {
                let resp = Response::parse(raw).map_err(|e| ClientError::Protocol(e.to_string()))?;
                if resp.request_id != id {
                    return Err(ClientError::Protocol(format!(
                        "unexpected reply to request {}",
                        resp.request_id
                    )));
                }
                return Ok(resp);
            }
            Ok(None) => {}
            Err(e) => return Err(ClientError::Protocol(e.to_string())),
        }
        buf.reserve(4096);
        let n = stream.read_buf(buf).await.map_err(|e| ClientError::Protocol(format!("read: {e}")))?;
        if n == 0 {
            return Err(ClientError::Protocol("server closed the connection".into()));
        }
    }
}

fn server_error(op: Opcode, e: ErrorReply) -> ClientError {
    if e.status == Status::Errno {
        return ClientError::Errno { op, errno: e.errno, message: e.message };
    }
    ClientError::Server { op, status: e.status, message: e.message }
}

/// Connects and completes the handshake as client session `session`, presenting this node's
/// credential (or `opts.token` while it has none) and keeping a credential the server issues.
pub(crate) async fn establish(
    addr: SocketAddr,
    opts: &ConnectOptions,
    session: SessionSlot,
    creds: &Credentials,
) -> Result<Established> {
    let first = creds.token(&opts.token);
    match establish_once(addr, opts, session, creds, &first).await {
        Err(e @ ClientError::Server { status: Status::AuthFailed, .. }) => {
            // One more try, when there is something else to present: a credential another process
            // of this node saved meanwhile (two enrolling at once), or the join token when the
            // saved credential was refused (an admin reset the node so that it enrolls again).
            let fresh = creds.reread(&opts.token);
            let retry = if fresh != first {
                fresh
            } else if first != opts.token && !opts.token.is_empty() {
                opts.token.clone()
            } else {
                return Err(e);
            };
            establish_once(addr, opts, session, creds, &retry).await
        }
        r => r,
    }
}

async fn establish_once(
    addr: SocketAddr,
    opts: &ConnectOptions,
    session: SessionSlot,
    creds: &Credentials,
    token: &str,
) -> Result<Established> {
    let connect = TcpStream::connect(addr);
    let stream = match tokio::time::timeout(opts.connect_timeout, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(ClientError::Connect { addr: addr.to_string(), reason: e.to_string() }),
        Err(_) => {
            return Err(ClientError::Connect {
                addr: addr.to_string(),
                reason: format!("no answer within {:?}", opts.connect_timeout),
            })
        }
    };
    let _ = stream.set_nodelay(true);
    {
        // Room for a whole max-size frame each way (see the server's `enlarge_buffers`).
        let sock = socket2::SockRef::from(&stream);
        let _ = sock.set_recv_buffer_size(4 << 20);
        let _ = sock.set_send_buffer_size(4 << 20);
        // A server whose host vanished (no RST) breaks the connection, so the reconnect logic runs.
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(30))
            .with_interval(Duration::from_secs(10));
        let _ = sock.set_tcp_keepalive(&keepalive);
        if let Err(e) = ferrovol_proto::io::set_tcp_user_timeout(&stream, TCP_USER_TIMEOUT) {
            debug!(error = %e, "TCP_USER_TIMEOUT not set");
        }
    }
    let hello = Request::Hello(Hello {
        version_min: PROTOCOL_VERSION_MIN,
        version_max: PROTOCOL_VERSION,
        features: FEATURES_ALL,
        session: session.id,
        slot: session.slot,
        node_id: opts.node_id.clone(),
        token: token.to_owned(),
    });
    let mut stream = match &opts.tls {
        None => Stream::Plain(stream),
        Some(tls) => {
            let connector = ferrovol_proto::tls::TlsConnector::from(tls.config.clone());
            let handshake = connector.connect(tls.server_name.clone(), stream);
            match tokio::time::timeout(opts.connect_timeout, handshake).await {
                Ok(Ok(s)) => Stream::Tls(Box::new(s.into())),
                Ok(Err(e)) => {
                    return Err(ClientError::Connect {
                        addr: addr.to_string(),
                        reason: format!(
                        "TLS handshake failed: {e} (does the server speak TLS, with a certificate for {:?} \
                             signed by the CA given?)",
                        tls.server_name
                    ),
                    })
                }
                Err(_) => {
                    return Err(ClientError::Connect {
                        addr: addr.to_string(),
                        reason: format!("no TLS handshake within {:?}", opts.connect_timeout),
                    })
                }
            }
        }
    };
    let mut buf = BytesMut::with_capacity(4096);
    let resp =
        tokio::time::timeout(opts.connect_timeout, round_trip(&mut stream, &mut buf, RequestId(0), &hello))
            .await
            .map_err(|_| ClientError::Connect {
                addr: addr.to_string(),
                reason: format!("no handshake reply within {:?}", opts.connect_timeout),
            })??;
    match resp.result {
        Ok(Reply::Hello(h)) => {
            if h.session_flags & ferrovol_proto::opcode::SESSION_ENROLLED != 0 {
                info!(server = %addr, node = %opts.node_id, "enrolled: this node has its own credential now");
                creds.enrolled(&h.credential)?;
            }
            Ok(Established { stream, hello: h })
        }
        Ok(other) => Err(ClientError::Protocol(format!("unexpected handshake reply {other:?}"))),
        Err(e) => Err(server_error(Opcode::Hello, e)),
    }
}

/// Starts the supervisor for an established connection of client session `session`.
pub(crate) fn spawn(
    addr: SocketAddr,
    opts: ConnectOptions,
    session: SessionSlot,
    creds: Arc<Credentials>,
    first: Established,
) -> ConnHandle {
    let shared = Arc::new(Shared {
        state: Mutex::new(State { next_id: 1, ..Default::default() }),
        queue: Mutex::new(Vec::new()),
        wr: tokio::sync::Mutex::new(None),
        broken: Notify::new(),
        sent: Notify::new(),
        reader_idle: std::sync::atomic::AtomicBool::new(false),
        broken_generation: AtomicU64::new(0),
        heard_ms: AtomicU64::new(0),
        reconnects: AtomicU64::new(0),
        epoch: std::time::Instant::now(),
    });
    let (alive, closed) = oneshot::channel();
    let io_timeout = opts.io_timeout;
    tokio::spawn(supervise(Supervisor { addr, opts, session, creds, shared: shared.clone() }, first, closed));
    ConnHandle { shared, next_vol: Arc::new(AtomicU32::new(1)), io_timeout, _alive: Arc::new(alive) }
}

struct Supervisor {
    addr: SocketAddr,
    opts: ConnectOptions,
    /// The client session id, the same on every connection and reconnect (see `Hello::session`).
    session: SessionSlot,
    creds: Arc<Credentials>,
    shared: Arc<Shared>,
}

async fn supervise(sup: Supervisor, first: Established, mut closed: oneshot::Receiver<()>) {
    let mut conn = first;
    loop {
        let (rd, wr) = conn.stream.into_split();
        let mut reader = tokio::spawn(read_loop(rd, sup.shared.clone(), sup.opts.poll));
        sup.shared.heard();
        let generation = sup.go_live(wr).await;
        let mut ticker = tokio::time::interval(TICK);
        let mut pinged = Instant::now();
        let reason = loop {
            tokio::select! {
                _ = &mut closed => {
                    reader.abort();
                    return;
                }
                r = &mut reader => break r.unwrap_or_else(|e| format!("reader task failed: {e}")),
                _ = sup.shared.broken.notified() => {
                    if sup.shared.broken_generation.load(Ordering::Acquire) == generation {
                        reader.abort();
                        break "write failed".to_owned();
                    }
                }
                _ = ticker.tick() => {
                    sup.expire(None);
                    let silent = sup.shared.silent_for();
                    if silent >= SILENCE_MAX && sup.shared.state().pending.values().any(|p| p.sent) {
                        reader.abort();
                        break format!("no reply from the server for {silent:.1?}");
                    }
                    if silent >= PING_AFTER && pinged.elapsed() >= PING_AFTER {
                        pinged = Instant::now();
                        sup.ping();
                    }
                }
            }
        };
        warn!(server = %sup.addr, %reason, "connection lost; reconnecting");
        sup.after_disconnect().await;
        match sup.reconnect(&mut closed, reason).await {
            Some(est) => conn = est,
            None => return,
        }
    }
}

impl Supervisor {
    /// Sends a PING nobody waits for: its reply (or the lack of one) is what the heartbeat watches.
    /// The write runs on its own task: a socket whose send buffer is full (a dead path) must not
    /// stall the supervisor, whose silence check is what gives up on that path.
    fn ping(&self) {
        let (reply, _rx) = oneshot::channel();
        let frame = {
            let mut st = self.shared.state();
            if !st.connected {
                return;
            }
            let id = st.next_id.max(1);
            st.next_id = id + 1;
            let frame = (st.generation, Request::Ping.encode(RequestId(id)));
            let call = Call {
                op: Op::Control(Request::Ping),
                reply: Done::Wait(reply),
                deadline: Instant::now() + self.opts.io_timeout,
            };
            st.pending.insert(id, Pending { call, sent: true });
            frame
        };
        let shared = self.shared.clone();
        tokio::spawn(async move { shared.submit([frame]).await });
    }

    /// Installs a fresh write half, then re-sends every pending request in its original order, before
    /// any caller can write on the new connection.
    async fn go_live(&self, wr: WriteHalf) -> u64 {
        let mut slot = self.shared.wr.lock().await;
        let mut failed = vec![];
        let (generation, resend) = {
            let mut st = self.shared.state();
            st.generation += 1;
            st.connected = true;
            let generation = st.generation;
            if generation > 1 {
                // Notices sent while disconnected are lost: whoever caches drops everything.
                for v in st.volumes.values() {
                    if let Some(sink) = &v.notices {
                        sink.push(vec![Notice::All]);
                    }
                }
            }
            let mut ids: Vec<u64> = st.pending.keys().copied().collect();
            ids.sort_unstable();
            let mut out = vec![];
            for id in ids {
                let req = match st.pending.get(&id) {
                    Some(p) => to_request(&st, &p.call.op),
                    None => continue,
                };
                match req {
                    Ok(req) => {
                        if let Some(p) = st.pending.get_mut(&id) {
                            p.sent = true;
                        }
                        out.push((generation, req.encode(RequestId(id))));
                    }
                    Err(e) => {
                        if let Some(p) = st.pending.remove(&id) {
                            failed.push((p.call.reply, Err(e)));
                        }
                    }
                }
            }
            (generation, out)
        };
        answer(failed);
        // On the first connection these are requests queued before it went live: nothing is re-sent.
        if !resend.is_empty() && generation > 1 {
            info!(server = %self.addr, requests = resend.len(), "re-sending requests after reconnect");
        }
        *slot = Some((generation, wr));
        // Re-sent frames go first: they are older than anything queued for this generation.
        self.shared.queue().splice(0..0, resend);
        self.shared.drain(&mut slot).await;
        drop(slot);
        if !self.shared.queue().is_empty() {
            self.shared.submit([]).await;
        }
        generation
    }

    /// Fails calls whose deadline passed. `down` = (since, last error) while disconnected.
    fn expire(&self, down: Option<(Instant, &str)>) {
        let now = Instant::now();
        let mut failed = vec![];
        let mut st = self.shared.state();
        let expired: Vec<u64> =
            st.pending.iter().filter(|(_, p)| p.call.deadline <= now).map(|(id, _)| *id).collect();
        for id in expired {
            let Some(p) = st.pending.remove(&id) else { continue };
            let op = p.call.op.opcode();
            let err = match down {
                Some((since, last)) => ClientError::Unavailable {
                    addr: self.addr.to_string(),
                    waited: now - since,
                    last: last.to_owned(),
                },
                None => ClientError::TimedOut { op, timeout: self.opts.io_timeout },
            };
            debug!(request = id, %op, error = %err, "request expired");
            failed.push((p.call.reply, Err(err)));
        }
        drop(st);
        answer(failed);
    }

    /// After a disconnect: sent control requests fail (they may have happened); a pending CLOSE is done
    /// (the handle died with the connection); everything else waits to be re-sent.
    async fn after_disconnect(&self) {
        *self.shared.wr.lock().await = None;
        let mut done = vec![];
        let mut st = self.shared.state();
        st.connected = false;
        let ids: Vec<u64> = st.pending.keys().copied().collect();
        for id in ids {
            let Some(p) = st.pending.get_mut(&id) else { continue };
            match &p.call.op {
                Op::Control(r) if p.sent => {
                    let op = r.opcode();
                    if let Some(p) = st.pending.remove(&id) {
                        done.push((p.call.reply, Err(ClientError::ConnectionLost { op })));
                    }
                }
                // A file operation that must not happen twice, and may have happened once.
                Op::Fs { op, .. } if p.sent && !op.idempotent() => {
                    let op = op.opcode();
                    if let Some(p) = st.pending.remove(&id) {
                        done.push((p.call.reply, Err(ClientError::ConnectionLost { op })));
                    }
                }
                Op::Close { vol } => {
                    let vol = *vol;
                    st.volumes.remove(&vol);
                    if let Some(p) = st.pending.remove(&id) {
                        done.push((p.call.reply, Ok(Reply::Done)));
                    }
                }
                _ => p.sent = false,
            }
        }
        for v in st.volumes.values_mut() {
            v.handle = None;
        }
        drop(st);
        answer(done);
    }

    /// Reconnects with backoff. Returns `None` when every caller is gone.
    async fn reconnect(&self, closed: &mut oneshot::Receiver<()>, mut last: String) -> Option<Established> {
        let since = Instant::now();
        let mut backoff = BACKOFF_MIN;
        loop {
            self.expire(Some((since, &last)));
            let mut attempt = self.opts.clone();
            attempt.connect_timeout = attempt.connect_timeout.min(RECONNECT_ATTEMPT_MAX);
            match establish(self.addr, &attempt, self.session, &self.creds).await {
                Ok(mut est) => match self.reopen(&mut est).await {
                    Ok(()) => {
                        self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
                        info!(server = %self.addr, down_for = ?since.elapsed(), "reconnected");
                        return Some(est);
                    }
                    Err(e) => last = e.to_string(),
                },
                Err(e) => last = e.to_string(),
            }
            debug!(server = %self.addr, error = %last, ?backoff, "reconnect failed");
            let wake = Instant::now() + backoff;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => break,
                    _ = &mut *closed => return None,
                    _ = tokio::time::sleep(TICK) => self.expire(Some((since, &last))),
                }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Re-OPENs every volume that was open, on the new connection (before its reader starts).
    /// Volumes whose own OPEN is still pending are skipped: that OPEN is re-sent as it is, and
    /// opening them here too would leave a second handle open on the server.
    async fn reopen(&self, est: &mut Established) -> Result<()> {
        let vols: Vec<(LocalVol, Request)> = {
            let st = self.shared.state();
            let opening: std::collections::HashSet<LocalVol> = st
                .pending
                .values()
                .filter_map(|p| match &p.call.op {
                    Op::Open { vol, .. } => Some(*vol),
                    _ => None,
                })
                .collect();
            st.volumes
                .iter()
                .filter(|(k, _)| !opening.contains(k))
                .map(|(k, v)| {
                    (
                        *k,
                        Request::Open {
                            name: v.name.clone(),
                            read_only: v.read_only,
                            generation: v.generation,
                        },
                    )
                })
                .collect()
        };
        let mut buf = BytesMut::with_capacity(4096);
        for (i, (vol, req)) in vols.into_iter().enumerate() {
            // Ids of the handshake phase are never matched against pending calls.
            let id = RequestId(u64::MAX - i as u64);
            let Request::Open { name, .. } = &req else { continue };
            let name = name.clone();
            let resp = tokio::time::timeout(
                self.opts.connect_timeout,
                round_trip(&mut est.stream, &mut buf, id, &req),
            )
            .await
            .map_err(|_| ClientError::Protocol("no reply to OPEN".into()))??;
            let mut st = self.shared.state();
            let Some(entry) = st.volumes.get_mut(&vol) else { continue };
            match resp.result {
                Ok(Reply::Opened { handle, .. }) => {
                    entry.handle = Some(handle);
                    entry.reopen_error = None;
                }
                Ok(other) => return Err(ClientError::Protocol(format!("unexpected OPEN reply {other:?}"))),
                Err(e) => {
                    // The volume is gone or refused: calls on it fail with this reason; others go on.
                    warn!(volume = %name, error = %e, "volume could not be re-opened");
                    entry.reopen_error = Some(e);
                }
            }
        }
        Ok(())
    }
}

/// With nothing awaited: sleeps until data comes (`Some`) or a call is sent (`None`), so the reader
/// can poll for that call's reply instead of sleeping through it. `read_buf` is cancel safe: losing
/// the race reads nothing.
async fn read_or_sent(
    rd: &mut ReadHalf,
    buf: &mut BytesMut,
    shared: &Shared,
) -> Option<std::io::Result<usize>> {
    let sent = shared.sent.notified();
    tokio::pin!(sent);
    // Registered before the flag is raised, so no call can slip between the two.
    sent.as_mut().enable();
    shared.reader_idle.store(true, Ordering::Release);
    let r = tokio::select! {
        r = rd.read_buf(buf) => Some(r),
        () = &mut sent => None,
    };
    shared.reader_idle.store(false, Ordering::Release);
    r
}

/// Reads replies and completes pending calls until the connection fails; returns why.
async fn read_loop(mut rd: ReadHalf, shared: Arc<Shared>, poll: Duration) -> String {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    // Between calls (none pending) it polls only while calls follow each other closely.
    let mut idle = Spin::new(poll);
    loop {
        loop {
            let raw = match split_response(&mut buf) {
                Ok(Some(raw)) => raw,
                Ok(None) => break,
                Err(e) => return format!("unreadable reply: {e}"),
            };
            let id = raw.header.request_id;
            let opcode = raw.header.opcode;
            let parsed = Response::parse(raw);
            let mut st = shared.state();
            if id.0 == 0 && opcode == Opcode::FsNotify as u8 {
                match parsed {
                    Ok(Response { result: Ok(Reply::Notify(n)), .. }) => {
                        let sink = st.volumes.values().find(|v| v.handle == Some(n.handle));
                        if let Some(sink) = sink.and_then(|v| v.notices.as_ref()) {
                            sink.push(n.notices);
                        }
                        continue;
                    }
                    other => return format!("malformed FS_NOTIFY: {other:?}"),
                }
            }
            let Some(p) = st.pending.remove(&id.0) else {
                if id.0 != 0 && id.0 < st.next_id {
                    // A call that expired (its caller got an error) or a heartbeat of an old
                    // generation: the answer came late, which is no reason to drop the connection.
                    debug!(request = %id, opcode, "reply to a call that is no longer waiting; dropped");
                    continue;
                }
                return format!("reply to unknown request {id} (opcode {opcode:#04x})");
            };
            let op = p.call.op.opcode();
            if matches!(&parsed, Ok(resp) if matches!(&resp.result, Err(e) if e.status == Status::Replaced)) {
                // The server took a newer HELLO of our session and slot (a stale reconnect of an
                // earlier process of this session) as the live connection: reconnect, which
                // retires that one, and send this call again with the rest.
                let Pending { call, .. } = p;
                st.pending.insert(id.0, Pending { call, sent: false });
                return format!("request {id} ({op}) was refused: this connection was replaced by another of the same session");
            }
            let result = match parsed {
                Ok(resp) => match resp.result {
                    Ok(reply) => {
                        if let (Op::Open { vol, .. }, Reply::Opened { handle, .. }) = (&p.call.op, &reply) {
                            if let Some(v) = st.volumes.get_mut(vol) {
                                v.handle = Some(*handle);
                            }
                        }
                        if let Op::Close { vol } = &p.call.op {
                            st.volumes.remove(vol);
                        }
                        Ok(reply)
                    }
                    Err(e) => {
                        if let Op::Open { vol, .. } = &p.call.op {
                            st.volumes.remove(vol);
                        }
                        Err(server_error(op, e))
                    }
                },
                Err(e) if e.checksum => {
                    warn!(request = %id, %op, error = %e, "reply failed its checksum");
                    Err(ClientError::Checksum { op })
                }
                Err(e) => {
                    warn!(request = %id, %op, error = %e, "malformed reply");
                    Err(ClientError::Protocol(format!("malformed reply to {op}: {}", e.message)))
                }
            };
            drop(st);
            let _ = p.call.reply.send(result);
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        // Poll while replies are awaited, and between calls that come close together (a FUSE file
        // at queue depth 1): an idle session costs no CPU.
        let waiting = !shared.state().pending.is_empty();
        let r = if waiting {
            read_polling(&mut rd, &mut buf, poll).await
        } else if poll.is_zero() {
            // Nothing to switch to when a call is sent: a plain read, and a sender wakes nobody
            // (a wakeup from a FUSE thread would cost a runtime thread's).
            rd.read_buf(&mut buf).await
        } else {
            let start = std::time::Instant::now();
            let r = match poll_for(&mut rd, &mut buf, idle.window()).await {
                Some(r) => Some(r),
                None => read_or_sent(&mut rd, &mut buf, &shared).await,
            };
            idle.observe(start.elapsed());
            // A call was sent: poll for its reply.
            let Some(r) = r else { continue };
            r
        };
        match r {
            Ok(0) => return "server closed the connection".into(),
            Ok(_) => shared.heard(),
            Err(e) => return format!("read failed: {e}"),
        }
    }
}

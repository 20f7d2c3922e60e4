//! One protocol connection with transparent reconnect.
//!
//! A supervisor task owns the socket's write half and a reader task owns the read half. Callers send
//! [`Call`]s through a bounded channel (their backpressure); the supervisor gives each a request id,
//! records it in the shared pending map, and writes batches of frames with vectored writes. The reader
//! matches replies to pending calls by request id (replies may come in any order) and completes them.
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
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferrovol_proto::codec::{split_response, Hello};
use ferrovol_proto::limits::{PROTOCOL_VERSION, PROTOCOL_VERSION_MIN};
use ferrovol_proto::opcode::FEATURES_ALL;
use ferrovol_proto::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::error::{ClientError, Result};
use crate::ConnectOptions;

/// Calls queued per connection before callers wait.
const CALL_QUEUE_MAX: usize = 1024;
/// Frames gathered into one vectored write.
const WRITE_BATCH_MAX: usize = 64;
const READ_CHUNK: usize = 256 << 10;
const BACKOFF_MIN: Duration = Duration::from_millis(20);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How often deadlines are checked.
const TICK: Duration = Duration::from_millis(100);

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
    },
    Close {
        vol: LocalVol,
    },
    Data {
        vol: LocalVol,
        op: DataOp,
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
        }
    }
}

pub(crate) struct Call {
    op: Op,
    reply: oneshot::Sender<Result<Reply>>,
    deadline: Instant,
}

struct Pending {
    call: Call,
    sent: bool,
}

#[derive(Debug)]
struct VolEntry {
    name: VolumeName,
    read_only: bool,
    handle: Option<VolumeHandle>,
    /// Why the last re-OPEN failed, for the errors of calls on this volume.
    reopen_error: Option<String>,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<HashMap<u64, Pending>>,
    volumes: Mutex<HashMap<LocalVol, VolEntry>>,
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn volumes(&self) -> std::sync::MutexGuard<'_, HashMap<LocalVol, VolEntry>> {
        self.volumes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The caller's side of a connection.
#[derive(Clone, Debug)]
pub(crate) struct ConnHandle {
    tx: mpsc::Sender<Call>,
    next_vol: Arc<AtomicU32>,
    io_timeout: Duration,
}

impl ConnHandle {
    pub(crate) fn new_local_vol(&self) -> LocalVol {
        self.next_vol.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) async fn call(&self, op: Op) -> Result<Reply> {
        let (reply, rx) = oneshot::channel();
        let deadline = Instant::now() + self.io_timeout;
        self.tx.send(Call { op, reply, deadline }).await.map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Fire-and-forget (used by `Drop`).
    pub(crate) fn try_call(&self, op: Op) {
        let (reply, _rx) = oneshot::channel();
        let _ = self.tx.try_send(Call { op, reply, deadline: Instant::now() + self.io_timeout });
    }
}

pub(crate) struct Established {
    stream: TcpStream,
    pub(crate) hello: HelloReply,
}

impl std::fmt::Debug for Established {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Established").field("hello", &self.hello).finish()
    }
}

/// Sends one request and waits for its reply on a connection that has no reader task yet.
async fn round_trip(
    stream: &mut TcpStream,
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
    ClientError::Server { op, status: e.status, message: e.message }
}

/// Connects and completes the handshake.
pub(crate) async fn establish(addr: SocketAddr, opts: &ConnectOptions) -> Result<Established> {
    let connect = TcpStream::connect(addr);
    let mut stream = match tokio::time::timeout(opts.connect_timeout, connect).await {
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
    let hello = Request::Hello(Hello {
        version_min: PROTOCOL_VERSION_MIN,
        version_max: PROTOCOL_VERSION,
        features: FEATURES_ALL,
        node_id: opts.node_id.clone(),
        token: opts.token.clone(),
    });
    let mut buf = BytesMut::with_capacity(4096);
    let resp =
        tokio::time::timeout(opts.connect_timeout, round_trip(&mut stream, &mut buf, RequestId(0), &hello))
            .await
            .map_err(|_| ClientError::Connect {
                addr: addr.to_string(),
                reason: format!("no handshake reply within {:?}", opts.connect_timeout),
            })??;
    match resp.result {
        Ok(Reply::Hello(h)) => Ok(Established { stream, hello: h }),
        Ok(other) => Err(ClientError::Protocol(format!("unexpected handshake reply {other:?}"))),
        Err(e) => Err(server_error(Opcode::Hello, e)),
    }
}

/// Starts the supervisor for an established connection.
pub(crate) fn spawn(addr: SocketAddr, opts: ConnectOptions, first: Established) -> ConnHandle {
    let (tx, rx) = mpsc::channel(CALL_QUEUE_MAX);
    let io_timeout = opts.io_timeout;
    tokio::spawn(supervise(addr, opts, first, rx));
    ConnHandle { tx, next_vol: Arc::new(AtomicU32::new(1)), io_timeout }
}

struct Supervisor {
    addr: SocketAddr,
    opts: ConnectOptions,
    shared: Arc<Shared>,
    next_id: u64,
}

async fn supervise(addr: SocketAddr, opts: ConnectOptions, first: Established, mut rx: mpsc::Receiver<Call>) {
    let mut sup = Supervisor { addr, opts, shared: Arc::new(Shared::default()), next_id: 1 };
    let mut conn = Some(first);
    loop {
        let Some(est) = conn.take() else { return };
        let (rd, mut wr) = est.stream.into_split();
        let reader = tokio::spawn(read_loop(rd, sup.shared.clone()));
        let outcome = sup.serve(&mut wr, reader, &mut rx).await;
        match outcome {
            Served::Closed => return,
            Served::Broken(reason) => {
                warn!(server = %sup.addr, %reason, "connection lost; reconnecting");
                sup.after_disconnect();
                match sup.reconnect(&mut rx, reason).await {
                    Some(est) => conn = Some(est),
                    None => return,
                }
            }
        }
    }
}

enum Served {
    /// Every caller is gone.
    Closed,
    Broken(String),
}

impl Supervisor {
    fn id(&mut self) -> RequestId {
        let id = RequestId(self.next_id);
        self.next_id += 1;
        id
    }

    /// The wire request for a call, with the volume's current handle.
    fn to_request(&self, op: &Op) -> std::result::Result<Request, ClientError> {
        let handle = |vol: &LocalVol| -> std::result::Result<VolumeHandle, ClientError> {
            let vols = self.shared.volumes();
            match vols.get(vol) {
                Some(VolEntry { handle: Some(h), .. }) => Ok(*h),
                Some(VolEntry { reopen_error: Some(e), name, .. }) => Err(ClientError::Protocol(format!(
                    "volume {name} could not be re-opened after a reconnect: {e}"
                ))),
                _ => Err(ClientError::InvalidArgument("volume is not open".into())),
            }
        };
        Ok(match op {
            Op::Control(r) => r.clone(),
            Op::Open { name, read_only, .. } => Request::Open { name: name.clone(), read_only: *read_only },
            Op::Close { vol } => Request::Close { handle: handle(vol)? },
            Op::Data { vol, op } => {
                let handle = handle(vol)?;
                match op.clone() {
                    DataOp::Read { offset, len } => Request::Read { handle, offset, len },
                    DataOp::Write { offset, data, fua } => Request::Write { handle, offset, data, fua },
                    DataOp::Flush => Request::Flush { handle },
                    DataOp::Trim { offset, len } => Request::Trim { handle, offset, len },
                    DataOp::WriteZeroes { offset, len, fua } => {
                        Request::WriteZeroes { handle, offset, len, fua }
                    }
                }
            }
        })
    }

    /// Registers calls as pending and returns their frames. Calls that cannot be encoded fail at once.
    fn admit(&mut self, calls: Vec<Call>, send: bool) -> Vec<RequestFrame> {
        let mut frames = Vec::with_capacity(calls.len());
        for call in calls {
            if let Op::Open { vol, name, read_only } = &call.op {
                self.shared.volumes().insert(
                    *vol,
                    VolEntry { name: name.clone(), read_only: *read_only, handle: None, reopen_error: None },
                );
            }
            let id = self.id();
            if send {
                match self.to_request(&call.op) {
                    Ok(req) => frames.push(req.encode(id)),
                    Err(e) => {
                        let _ = call.reply.send(Err(e));
                        continue;
                    }
                }
            }
            self.shared.pending().insert(id.0, Pending { call, sent: send });
        }
        frames
    }

    async fn serve(
        &mut self,
        wr: &mut OwnedWriteHalf,
        mut reader: JoinHandle<String>,
        rx: &mut mpsc::Receiver<Call>,
    ) -> Served {
        // First re-send what was pending across the reconnect, in the original order.
        let resend: Vec<(u64, Request)> = {
            let mut pending = self.shared.pending();
            let mut ids: Vec<u64> = pending.keys().copied().collect();
            ids.sort_unstable();
            let mut out = vec![];
            for id in ids {
                let Some(p) = pending.get_mut(&id) else { continue };
                match self.to_request(&p.call.op) {
                    Ok(req) => {
                        p.sent = true;
                        out.push((id, req));
                    }
                    Err(e) => {
                        if let Some(p) = pending.remove(&id) {
                            let _ = p.call.reply.send(Err(e));
                        }
                    }
                }
            }
            out
        };
        if !resend.is_empty() {
            info!(server = %self.addr, requests = resend.len(), "re-sending requests after reconnect");
            let frames: Vec<RequestFrame> = resend.iter().map(|(id, r)| r.encode(RequestId(*id))).collect();
            if let Err(e) = write_frames(wr, &frames).await {
                reader.abort();
                return Served::Broken(format!("write failed: {e}"));
            }
        }
        let mut ticker = tokio::time::interval(TICK);
        let mut calls: Vec<Call> = Vec::with_capacity(WRITE_BATCH_MAX);
        loop {
            tokio::select! {
                n = rx.recv_many(&mut calls, WRITE_BATCH_MAX) => {
                    if n == 0 {
                        reader.abort();
                        return Served::Closed;
                    }
                    let batch = std::mem::take(&mut calls);
                    let frames = self.admit(batch, true);
                    if let Err(e) = write_frames(wr, &frames).await {
                        reader.abort();
                        return Served::Broken(format!("write failed: {e}"));
                    }
                }
                r = &mut reader => {
                    return Served::Broken(r.unwrap_or_else(|e| format!("reader task failed: {e}")));
                }
                _ = ticker.tick() => self.expire(None),
            }
        }
    }

    /// Fails calls whose deadline passed. `down` = (since, last error) while disconnected.
    fn expire(&self, down: Option<(Instant, &str)>) {
        let now = Instant::now();
        let mut pending = self.shared.pending();
        let expired: Vec<u64> =
            pending.iter().filter(|(_, p)| p.call.deadline <= now).map(|(id, _)| *id).collect();
        for id in expired {
            let Some(p) = pending.remove(&id) else { continue };
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
            let _ = p.call.reply.send(Err(err));
        }
    }

    /// After a disconnect: sent control requests fail (they may have happened); a pending CLOSE is done
    /// (the handle died with the connection); everything else waits to be re-sent.
    fn after_disconnect(&self) {
        let mut pending = self.shared.pending();
        let ids: Vec<u64> = pending.keys().copied().collect();
        for id in ids {
            let Some(p) = pending.get_mut(&id) else { continue };
            match &p.call.op {
                Op::Control(r) if p.sent => {
                    let op = r.opcode();
                    if let Some(p) = pending.remove(&id) {
                        let _ = p.call.reply.send(Err(ClientError::ConnectionLost { op }));
                    }
                }
                Op::Close { vol } => {
                    let vol = *vol;
                    self.shared.volumes().remove(&vol);
                    if let Some(p) = pending.remove(&id) {
                        let _ = p.call.reply.send(Ok(Reply::Done));
                    }
                }
                _ => p.sent = false,
            }
        }
        for v in self.shared.volumes().values_mut() {
            v.handle = None;
        }
    }

    /// Reconnects with backoff, queueing new calls meanwhile. Returns `None` when every caller is gone.
    async fn reconnect(&mut self, rx: &mut mpsc::Receiver<Call>, mut last: String) -> Option<Established> {
        let since = Instant::now();
        let mut backoff = BACKOFF_MIN;
        loop {
            self.expire(Some((since, &last)));
            match establish(self.addr, &self.opts).await {
                Ok(mut est) => match self.reopen(&mut est).await {
                    Ok(()) => {
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
                let mut calls = Vec::new();
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => break,
                    n = rx.recv_many(&mut calls, WRITE_BATCH_MAX) => {
                        if n == 0 {
                            return None;
                        }
                        self.admit(calls, false);
                    }
                    _ = tokio::time::sleep(TICK) => self.expire(Some((since, &last))),
                }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Re-OPENs every volume that was open, on the new connection (before its reader starts).
    async fn reopen(&mut self, est: &mut Established) -> Result<()> {
        let vols: Vec<(LocalVol, VolumeName, bool)> =
            self.shared.volumes().iter().map(|(k, v)| (*k, v.name.clone(), v.read_only)).collect();
        let mut buf = BytesMut::with_capacity(4096);
        for (vol, name, read_only) in vols {
            let id = self.id();
            let req = Request::Open { name: name.clone(), read_only };
            let resp = tokio::time::timeout(
                self.opts.connect_timeout,
                round_trip(&mut est.stream, &mut buf, id, &req),
            )
            .await
            .map_err(|_| ClientError::Protocol("no reply to OPEN".into()))??;
            let mut vols = self.shared.volumes();
            let Some(entry) = vols.get_mut(&vol) else { continue };
            match resp.result {
                Ok(Reply::Opened { handle, .. }) => {
                    entry.handle = Some(handle);
                    entry.reopen_error = None;
                }
                Ok(other) => return Err(ClientError::Protocol(format!("unexpected OPEN reply {other:?}"))),
                Err(e) => {
                    // The volume is gone or refused: calls on it fail with this reason; others go on.
                    warn!(volume = %name, error = %e, "volume could not be re-opened");
                    entry.reopen_error = Some(e.to_string());
                }
            }
        }
        Ok(())
    }
}

async fn write_frames(wr: &mut OwnedWriteHalf, frames: &[RequestFrame]) -> std::io::Result<()> {
    if frames.is_empty() {
        return Ok(());
    }
    let mut slices: Vec<IoSlice<'_>> = frames.iter().flat_map(|f| f.io_slices()).collect();
    write_all_vectored(wr, &mut slices).await
}

async fn write_all_vectored<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    mut slices: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    while !slices.is_empty() {
        let n = w.write_vectored(slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// Reads replies and completes pending calls until the connection fails; returns why.
async fn read_loop(mut rd: OwnedReadHalf, shared: Arc<Shared>) -> String {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
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
            let Some(p) = shared.pending().remove(&id.0) else {
                return format!("reply to unknown request {id} (opcode {opcode:#04x})");
            };
            let op = p.call.op.opcode();
            let result = match parsed {
                Ok(resp) => match resp.result {
                    Ok(reply) => {
                        if let (Op::Open { vol, .. }, Reply::Opened { handle, .. }) = (&p.call.op, &reply) {
                            if let Some(v) = shared.volumes().get_mut(vol) {
                                v.handle = Some(*handle);
                            }
                        }
                        if let Op::Close { vol } = &p.call.op {
                            shared.volumes().remove(vol);
                        }
                        Ok(reply)
                    }
                    Err(e) => {
                        if let Op::Open { vol, .. } = &p.call.op {
                            shared.volumes().remove(vol);
                        }
                        Err(server_error(op, e))
                    }
                },
                Err(e) => {
                    debug!(error = %e, "bad reply payload");
                    Err(ClientError::Checksum { op })
                }
            };
            let _ = p.call.reply.send(result);
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) => return "server closed the connection".into(),
            Ok(_) => {}
            Err(e) => return format!("read failed: {e}"),
        }
    }
}

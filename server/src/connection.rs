//! One client connection: a read loop that splits frames off the socket buffer, handles them in arrival
//! order and writes their replies itself, batched into one vectored write per read (no hop through
//! another task on the hot path). Replies that complete later (FLUSH, FUA) are written by their own
//! task; the write half sits behind an async mutex, and replies may go out in any order.
//!
//! Flow control: before a request is handled the read loop takes permits for it from two per-connection
//! semaphores (requests in flight, bytes in flight); the permits travel with the reply and are released
//! once it is written. A client that exceeds the limits is simply not read from until replies drain: TCP
//! backpressure, no error, no unbounded queue.

use std::io::IoSlice;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ferrovol_proto::codec::{split_request_within, FrameError};
use ferrovol_proto::io::{write_all_vectored, Spin};
use ferrovol_proto::io::{Stream, WriteHalf};
use ferrovol_proto::limits::{
    HELLO_PAYLOAD_LEN_MAX, IN_FLIGHT_BYTES_MAX, IN_FLIGHT_REQUESTS_MAX, PAYLOAD_LEN_MAX,
};
use ferrovol_proto::{Reply, Request, RequestId, Response, ResponseFrame, Status};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{watch, Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::handler::{Outcome, Session};
use crate::listener::{Context, Ticket, SHUTDOWN_GRACE};

/// Socket read size: large enough that a 1 MiB WRITE arrives in a few reads.
const READ_CHUNK: usize = 256 << 10;
/// Replies gathered into one vectored write.
const WRITE_BATCH_MAX: usize = 64;
/// A reply with at least this much payload is written without waiting for the rest of the batch.
const WRITE_NOW_BYTES: usize = 128 << 10;

type Permits = Option<(OwnedSemaphorePermit, Option<OwnedSemaphorePermit>)>;

/// A reply on its way out, holding the request's in-flight permits until it is written.
struct Outgoing {
    frame: ResponseFrame,
    _permits: Permits,
}

type Writer = Arc<Mutex<WriteHalf>>;

async fn write_batch(wr: &Writer, batch: &mut Vec<Outgoing>) -> std::io::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let result = {
        let mut w = wr.lock().await;
        let mut slices: Vec<IoSlice<'_>> = batch.iter().flat_map(|o| o.frame.io_slices()).collect();
        write_all_vectored(&mut *w, &mut slices).await
    };
    batch.clear(); // releases the permits
    result
}

/// Read buffer before HELLO: a whole HELLO fits; nothing more is allocated for an unknown peer.
const HANDSHAKE_BUFFER: usize = 4096;
const _: () =
    assert!(HANDSHAKE_BUFFER >= ferrovol_proto::REQUEST_HEADER_LEN + HELLO_PAYLOAD_LEN_MAX as usize);

/// Wraps a new connection in TLS when the server has it: a TLS handshake within the handshake
/// deadline, or, for a peer that speaks plaintext to a server that requires TLS, one plaintext
/// error frame saying so. `None`: closed.
async fn secure(
    stream: TcpStream,
    ctx: &Context,
    deadline: tokio::time::Instant,
    ticket: &Ticket,
) -> Option<Stream> {
    let Some(acceptor) = &ctx.tls else { return Some(Stream::Plain(stream)) };
    tokio::select! {
        s = secure_tls(stream, acceptor, deadline) => s,
        () = ticket.evict.notified() => {
            debug!("evicted during the TLS handshake to make room for a new connection");
            None
        }
    }
}

async fn secure_tls(
    stream: TcpStream,
    acceptor: &ferrovol_proto::tls::TlsAcceptor,
    deadline: tokio::time::Instant,
) -> Option<Stream> {
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut first)).await;
    match peeked {
        Ok(Ok(1)) if first[0] == ferrovol_proto::tls::TLS_HANDSHAKE_RECORD => {}
        Ok(Ok(1)) => {
            crate::metrics::metrics().refused("plaintext_on_tls");
            crate::listener::refusal(|| warn!("plaintext client on a server that requires TLS; closing"));
            let resp = Response::error(
                RequestId(0),
                0,
                Status::BadRequest,
                "this server requires TLS: connect with a CA (--tls-ca) to use it",
            );
            let mut s = stream;
            let _ =
                tokio::time::timeout(Duration::from_secs(1), s.write_all(&resp.encode().to_bytes())).await;
            return None;
        }
        _ => return None,
    }
    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(Stream::Tls(Box::new(tls.into()))),
        Ok(Err(e)) => {
            crate::metrics::metrics().refused("tls_failed");
            crate::listener::refusal(|| warn!(error = %e, "TLS handshake failed; closing"));
            None
        }
        Err(_) => {
            crate::metrics::metrics().refused("handshake_timeout");
            crate::listener::refusal(|| warn!("no TLS handshake within the handshake timeout; closing"));
            None
        }
    }
}

pub async fn serve(stream: TcpStream, ctx: Arc<Context>, mut stop: watch::Receiver<bool>, ticket: &Ticket) {
    let _ = stream.set_nodelay(true);
    set_keepalive(&stream);
    let handshake_deadline = tokio::time::Instant::now() + ctx.handshake_timeout;
    let fd = std::os::unix::io::AsRawFd::as_raw_fd(&stream);
    let Some(stream) = secure(stream, &ctx, handshake_deadline, ticket).await else { return };
    let (mut rd, wr) = stream.into_split();
    let wr: Writer = Arc::new(Mutex::new(wr));
    let mut later = JoinSet::new();
    let mut batch: Vec<Outgoing> = Vec::with_capacity(WRITE_BATCH_MAX);
    let requests = Arc::new(Semaphore::new(IN_FLIGHT_REQUESTS_MAX as usize));
    let bytes = Arc::new(Semaphore::new(IN_FLIGHT_BYTES_MAX as usize));
    let mut session = Session::default();
    let mut buf = BytesMut::with_capacity(HANDSHAKE_BUFFER);
    // Since when a frame has been partly received (slow-sender cut-off), and when the peer last
    // sent anything (idle cut-off), both after HELLO.
    let mut partial_since: Option<tokio::time::Instant> = None;
    let mut last_heard = tokio::time::Instant::now();
    let mut spin = Spin::new(ctx.poll);
    // Delivers FS_NOTIFY frames once the session has any to send.
    let mut notifier: Option<tokio::task::JoinHandle<()>> = None;
    // Dropped when this connection is done: reply writes left to tasks (see `worker_reply`) stop.
    let (open, _) = watch::channel(());
    debug!("connection accepted");

    'conn: loop {
        // Handle every complete frame already buffered, in arrival order.
        let mut progressed = false;
        loop {
            let limit = if session.is_ready() { PAYLOAD_LEN_MAX } else { HELLO_PAYLOAD_LEN_MAX };
            let raw = match split_request_within(&mut buf, limit) {
                Ok(Some(raw)) => raw,
                Ok(None) => break,
                Err(e) => {
                    crate::listener::refusal(
                        || warn!(error = %e, "unreadable frame; closing the connection"),
                    );
                    let (id, op) = match &e {
                        FrameError::PayloadTooLarge { request_id, opcode, .. } => (*request_id, *opcode),
                        _ => (RequestId(0), 0),
                    };
                    let resp = Response::error(id, op, e.status(), e.to_string());
                    batch.push(Outgoing { frame: resp.encode(), _permits: None });
                    break 'conn;
                }
            };
            // Take the in-flight permits first: this is where a too-eager client waits. Replies held in
            // `batch` hold permits too, so send them before waiting.
            let reads = [ferrovol_proto::Opcode::Read as u8, ferrovol_proto::Opcode::FsRead as u8];
            let cost = if reads.contains(&raw.header.opcode) {
                raw.header.length.min(IN_FLIGHT_BYTES_MAX)
            } else {
                raw.header.payload_len
            };
            // A PING is answered at once, even while the in-flight budget is used up (a long FLUSH
            // holding permits): it is how a client tells a slow server from a dead connection.
            let ping = raw.header.opcode == ferrovol_proto::Opcode::Ping as u8 && session.is_ready();
            let permits = match if ping { Some(None) } else { take_permits(&requests, &bytes, cost) } {
                Some(p) => p,
                None => {
                    if write_batch(&wr, &mut batch).await.is_err() {
                        break 'conn;
                    }
                    let Ok(r) = requests.clone().acquire_owned().await else { break 'conn };
                    let b = if cost > 0 {
                        match bytes.clone().acquire_many_owned(cost).await {
                            Ok(p) => Some(p),
                            Err(_) => break 'conn,
                        }
                    } else {
                        None
                    };
                    Some((r, b))
                }
            };
            progressed = true;
            let was_ready = session.is_ready();
            let (raw_id, raw_op) = (raw.header.request_id, raw.header.opcode);
            let mut meter = None;
            let outcome = match Request::parse(raw) {
                Ok((id, req)) => {
                    meter = session.meter(&req).map(|(m, written)| Meter {
                        m,
                        op: raw_op,
                        written,
                        started: Instant::now(),
                    });
                    session.handle(&ctx, id, req)
                }
                Err(e) => {
                    debug!(error = %e, "request refused");
                    let resp = Response::error(e.request_id, e.opcode, e.status, e.message);
                    if session.is_ready() {
                        Outcome::Reply(resp)
                    } else {
                        Outcome::ReplyAndClose(resp)
                    }
                }
            };
            if let Some((outbox, rx)) = session.take_notices() {
                notifier = Some(tokio::spawn(deliver_notices(rx, outbox, wr.clone())));
            }
            if session.is_ready() && !was_ready {
                // Authenticated: no longer evictable, and now worth big socket buffers.
                ticket.authenticated();
                // SAFETY: `fd` is the socket that `rd` and `wr` own; both live until this function
                // returns, so the descriptor stays open while it is borrowed here.
                enlarge_buffers(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) });
            }
            match outcome {
                Outcome::Reply(resp) => {
                    if let Some(m) = &meter {
                        m.record(&resp);
                    }
                    let frame = resp.encode();
                    // A large reply goes out at once, so the client starts receiving it while the next
                    // ones are prepared; small replies are gathered into one write.
                    let large = frame.payload.len() >= WRITE_NOW_BYTES;
                    batch.push(Outgoing { frame, _permits: permits });
                    if (large || batch.len() >= WRITE_BATCH_MAX)
                        && write_batch(&wr, &mut batch).await.is_err()
                    {
                        break 'conn;
                    }
                }
                Outcome::ReplyAndClose(resp) => {
                    if resp.result.as_ref().err().map(|e| e.status) == Some(Status::AuthFailed) {
                        info!("closing connection after failed authentication");
                    }
                    batch.push(Outgoing { frame: resp.encode(), _permits: permits });
                    break 'conn;
                }
                Outcome::Later(fut) => {
                    let wr = wr.clone();
                    later.spawn(async move {
                        let resp = fut.await;
                        if let Some(m) = &meter {
                            m.record(&resp);
                        }
                        let mut one = vec![Outgoing { frame: resp.encode(), _permits: permits }];
                        let _ = write_batch(&wr, &mut one).await;
                    });
                }
                Outcome::Blocking(job) => {
                    // The worker writes the reply; the permits go with it, so the end of the
                    // connection, which waits for every permit, waits for this reply too.
                    let (w, rt, closed) = (wr.clone(), tokio::runtime::Handle::current(), open.subscribe());
                    let unsubmitted = meter.clone();
                    let started = crate::files::submit(move || {
                        let resp = job();
                        if let Some(m) = &meter {
                            m.record(&resp);
                        }
                        let frame = resp.encode();
                        worker_reply(&rt, w, Outgoing { frame, _permits: permits }, closed);
                    });
                    if !started {
                        let resp = Response::error(raw_id, raw_op, Status::Internal, "no file worker thread");
                        if let Some(m) = &unsubmitted {
                            m.record(&resp);
                        }
                        batch.push(Outgoing { frame: resp.encode(), _permits: None });
                    }
                }
            }
        }
        if write_batch(&wr, &mut batch).await.is_err() {
            break 'conn;
        }
        // Reap finished background replies so the set stays small.
        while later.try_join_next().is_some() {}
        let handshaking = !session.is_ready();
        if handshaking {
            if buf.capacity() - buf.len() < 512 {
                buf.reserve(HANDSHAKE_BUFFER);
            }
        } else if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        let now = tokio::time::Instant::now();
        // The frame now at the front started arriving no earlier than the last one completed.
        partial_since = match partial_since {
            _ if buf.is_empty() => None,
            Some(t) if !progressed => Some(t),
            _ => Some(now),
        };
        let frame_deadline = partial_since.map_or(now + ctx.frame_timeout, |t| t + ctx.frame_timeout);
        let idle = !handshaking
            && buf.is_empty()
            && later.is_empty()
            && requests.available_permits() == IN_FLIGHT_REQUESTS_MAX as usize;
        let read = tokio::select! {
            r = spin.read(&mut rd, &mut buf) => r,
            _ = stop.wait_for(|s| *s) => {
                debug!("server shutting down; no more requests read from this connection");
                break 'conn;
            }
            _ = tokio::time::sleep_until(handshake_deadline), if handshaking => {
                crate::metrics::metrics().refused("handshake_timeout");
                crate::listener::refusal(|| warn!("no HELLO within the handshake timeout; closing"));
                break 'conn;
            }
            () = ticket.evict.notified(), if handshaking => {
                debug!("evicted during the handshake to make room for a new connection");
                break 'conn;
            }
            _ = tokio::time::sleep_until(frame_deadline), if !handshaking && partial_since.is_some() => {
                crate::listener::refusal(|| warn!(bytes = buf.len(), timeout = ?ctx.frame_timeout,
                    "a frame was not completed in time (slow sender); closing"));
                break 'conn;
            }
            _ = tokio::time::sleep_until(last_heard + ctx.idle_timeout), if idle => {
                crate::metrics::metrics().refused("idle_timeout");
                crate::listener::refusal(|| warn!(timeout = ?ctx.idle_timeout, "idle connection; closing"));
                break 'conn;
            }
        };
        last_heard = tokio::time::Instant::now();
        match read {
            Ok(0) => {
                if !buf.is_empty() {
                    crate::listener::refusal(|| {
                        warn!(bytes = buf.len(), "connection closed in the middle of a frame")
                    });
                }
                break;
            }
            Ok(_) => {}
            Err(e) => {
                debug!(error = %e, "read failed");
                break;
            }
        }
    }
    // Answer what was handled, and let background replies (flushes in progress) finish, within the grace.
    let finish = async {
        let _ = write_batch(&wr, &mut batch).await;
        while later.join_next().await.is_some() {}
        // Replies file workers still owe (each holds a request permit until written).
        let _ = requests.acquire_many(IN_FLIGHT_REQUESTS_MAX).await;
        let mut w = wr.lock().await;
        let _ = tokio::time::timeout(Duration::from_secs(1), w.shutdown()).await;
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, finish).await.is_err() {
        warn!("replies not written within the grace period; dropping the connection");
    }
    drop(open);
    if let Some(n) = notifier {
        n.abort();
    }
    drop(session);
    debug!("connection closed");
}

/// Writes a file worker's reply. On the worker itself when the socket takes it at once (the usual
/// case: no thread is woken); otherwise (writer busy, socket full) the write goes on as a task of
/// the runtime, so a peer that stops reading holds no worker (they serve every client), and that
/// task ends with the connection (`closed`).
fn worker_reply(rt: &tokio::runtime::Handle, wr: Writer, out: Outgoing, mut closed: watch::Receiver<()>) {
    use std::future::Future;
    let mut write = Box::pin(async move {
        let mut one = vec![out];
        tokio::select! {
            _ = write_batch(&wr, &mut one) => {}
            _ = closed.changed() => {}
        }
    });
    let _entered = rt.enter();
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    if write.as_mut().poll(&mut cx).is_pending() {
        // A spawned task polls at once, so whatever became ready since is not missed.
        rt.spawn(write);
    }
}

async fn deliver_notices(rx: crate::notify::Queue, outbox: Arc<crate::notify::Outbox>, wr: Writer) {
    crate::notify::deliver(rx, outbox, move |frames| {
        let wr = wr.clone();
        Box::pin(async move {
            let mut batch: Vec<Outgoing> = frames
                .into_iter()
                .map(|n| Outgoing {
                    frame: Response::ok(
                        RequestId(0),
                        ferrovol_proto::Opcode::FsNotify,
                        ferrovol_proto::Reply::Notify(n),
                    )
                    .encode(),
                    _permits: None,
                })
                .collect();
            write_batch(&wr, &mut batch).await.is_ok()
        })
    })
    .await;
}

/// Socket buffers big enough for a whole max-size frame, so a 1 MiB WRITE or READ reply crosses in one
/// go instead of in window-sized pieces with a wakeup each (the kernel caps these at net.core.*mem_max).
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// Socket buffers for whole max-size frames: only for authenticated peers (kernel memory).
fn enlarge_buffers(fd: std::os::fd::BorrowedFd<'_>) {
    let sock = socket2::SockRef::from(&fd);
    let _ = sock.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
    let _ = sock.set_send_buffer_size(SOCKET_BUFFER_BYTES);
}

/// Replies unacknowledged this long fail the socket (TCP_USER_TIMEOUT): a client whose host is gone
/// stops holding a connection (and its in-flight budget) after this, not after ~15 minutes.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

fn set_keepalive(stream: &TcpStream) {
    let _ = ferrovol_proto::io::set_tcp_user_timeout(stream, TCP_USER_TIMEOUT);
    let sock = socket2::SockRef::from(stream);
    // A peer whose host vanished (no RST) is noticed within about a minute instead of never.
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10));
    let _ = sock.set_tcp_keepalive(&keepalive);
}

fn take_permits(requests: &Arc<Semaphore>, bytes: &Arc<Semaphore>, cost: u32) -> Option<Permits> {
    let r = requests.clone().try_acquire_owned().ok()?;
    let b = if cost > 0 { Some(bytes.clone().try_acquire_many_owned(cost).ok()?) } else { None };
    Some(Some((r, b)))
}

/// A request on an open volume, to count in its series once answered (`metrics`).
#[derive(Clone)]
struct Meter {
    m: Arc<crate::metrics::VolumeMeter>,
    op: u8,
    written: u64,
    started: Instant,
}

impl Meter {
    fn record(&self, resp: &Response) {
        use ferrovol_proto::fs::FsReply;
        const READ: u8 = ferrovol_proto::Opcode::Read as u8;
        const FS_READ: u8 = ferrovol_proto::Opcode::FsRead as u8;
        let (status, read) = match &resp.result {
            Ok(Reply::Data(d)) if self.op == READ => (None, d.len() as u64),
            // READLINK and the xattr replies are Data too, but not file content.
            Ok(Reply::Fs(FsReply::Data(d))) if self.op == FS_READ => (None, d.len() as u64),
            // A small file's bytes with its open.
            Ok(Reply::Fs(FsReply::Opened { data, .. })) => (None, data.len() as u64),
            Ok(_) => (None, 0),
            Err(e) => (Some(e.status), 0),
        };
        let written = if status.is_none() { self.written } else { 0 };
        self.m.record(self.op, status, self.started.elapsed(), read, written);
    }
}

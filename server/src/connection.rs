//! One client connection: a read loop that splits frames off the socket buffer and handles them in
//! arrival order, and a write task that sends replies (possibly out of order) with vectored writes.
//!
//! Flow control: before a request is handled the read loop takes permits for it from two per-connection
//! semaphores (requests in flight, bytes in flight); the permits travel with the reply and are released
//! once it is written. A client that exceeds the limits is simply not read from until replies drain: TCP
//! backpressure, no error, no unbounded queue.

use std::io::IoSlice;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use ferrovol_proto::codec::{split_request, FrameError};
use ferrovol_proto::limits::{IN_FLIGHT_BYTES_MAX, IN_FLIGHT_REQUESTS_MAX};
use ferrovol_proto::{Request, RequestId, Response, ResponseFrame, Status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use crate::handler::{Outcome, Session};
use crate::listener::{Context, SHUTDOWN_GRACE};

/// Socket read size: large enough that a 1 MiB WRITE arrives in a few reads.
const READ_CHUNK: usize = 256 << 10;
/// Replies gathered into one vectored write.
const WRITE_BATCH_MAX: usize = 64;

/// A reply on its way out, holding the request's in-flight permits until it is written.
struct Outgoing {
    frame: ResponseFrame,
    _permits: Option<(OwnedSemaphorePermit, Option<OwnedSemaphorePermit>)>,
}

pub async fn serve(stream: TcpStream, ctx: Arc<Context>, mut stop: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
    let (mut rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let writer = tokio::spawn(write_loop(wr, rx));
    let requests = Arc::new(Semaphore::new(IN_FLIGHT_REQUESTS_MAX as usize));
    let bytes = Arc::new(Semaphore::new(IN_FLIGHT_BYTES_MAX as usize));
    let mut session = Session::default();
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let handshake_deadline = tokio::time::Instant::now() + ctx.handshake_timeout;
    debug!("connection accepted");

    'conn: loop {
        // Handle every complete frame already buffered, in arrival order.
        loop {
            let raw = match split_request(&mut buf) {
                Ok(Some(raw)) => raw,
                Ok(None) => break,
                Err(e) => {
                    warn!(error = %e, "unreadable frame; closing the connection");
                    let (id, op) = match &e {
                        FrameError::PayloadTooLarge { request_id, opcode, .. } => (*request_id, *opcode),
                        _ => (RequestId(0), 0),
                    };
                    let resp = Response::error(id, op, e.status(), e.to_string());
                    let _ = tx.send(Outgoing { frame: resp.encode(), _permits: None });
                    break 'conn;
                }
            };
            // Take the in-flight permits first: this is where a too-eager client waits.
            let cost = if raw.header.opcode == ferrovol_proto::Opcode::Read as u8 {
                raw.header.length.min(IN_FLIGHT_BYTES_MAX)
            } else {
                raw.header.payload_len
            };
            let Ok(req_permit) = requests.clone().acquire_owned().await else { break 'conn };
            let byte_permit = if cost > 0 {
                match bytes.clone().acquire_many_owned(cost).await {
                    Ok(p) => Some(p),
                    Err(_) => break 'conn,
                }
            } else {
                None
            };
            let permits = Some((req_permit, byte_permit));
            let outcome = match Request::parse(raw) {
                Ok((id, req)) => session.handle(&ctx, id, req).await,
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
            match outcome {
                Outcome::Reply(resp) => {
                    if tx.send(Outgoing { frame: resp.encode(), _permits: permits }).is_err() {
                        break 'conn;
                    }
                }
                Outcome::ReplyAndClose(resp) => {
                    if resp.result.as_ref().err().map(|e| e.status) == Some(Status::AuthFailed) {
                        info!("closing connection after failed authentication");
                    }
                    let _ = tx.send(Outgoing { frame: resp.encode(), _permits: permits });
                    break 'conn;
                }
                Outcome::Later(fut) => {
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let resp = fut.await;
                        let _ = tx.send(Outgoing { frame: resp.encode(), _permits: permits });
                    });
                }
            }
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        let handshaking = !session.is_ready();
        let read = tokio::select! {
            r = rd.read_buf(&mut buf) => r,
            _ = stop.wait_for(|s| *s) => {
                debug!("server shutting down; no more requests read from this connection");
                break 'conn;
            }
            _ = tokio::time::sleep_until(handshake_deadline), if handshaking => {
                warn!("no HELLO within the handshake timeout; closing");
                break 'conn;
            }
        };
        match read {
            Ok(0) => {
                if !buf.is_empty() {
                    warn!(bytes = buf.len(), "connection closed in the middle of a frame");
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
    // Replies still to come (flushes in progress) hold clones of `tx`; the writer ends once they are sent.
    drop(tx);
    match tokio::time::timeout(SHUTDOWN_GRACE, writer).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => debug!(error = %e, "write failed"),
        Ok(Err(e)) => warn!(error = %e, "writer task failed"),
        Err(_) => warn!("replies not written within the grace period; dropping the connection"),
    }
    drop(session);
    debug!("connection closed");
}

async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) -> std::io::Result<()> {
    let mut batch: Vec<Outgoing> = Vec::with_capacity(WRITE_BATCH_MAX);
    while rx.recv_many(&mut batch, WRITE_BATCH_MAX).await > 0 {
        let mut slices: Vec<IoSlice<'_>> = batch.iter().flat_map(|o| o.frame.io_slices()).collect();
        write_all_vectored(&mut wr, &mut slices).await?;
        batch.clear();
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
    Ok(())
}

/// Writes every slice, resuming after partial writes: header and payload leave in one syscall when the
/// socket has room, and the payload is never copied into a staging buffer.
pub async fn write_all_vectored<W: AsyncWriteExt + Unpin>(
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

//! Socket helpers shared by the server's connections and the client's reader (feature `io`): the one
//! place that decides when a thread polls its socket instead of sleeping, and the vectored write that
//! sends a header and its payload without copying them together.

use std::io::IoSlice;
use std::time::{Duration, Instant};

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// A TLS connection over TCP (either side).
pub type TlsStream = tokio_rustls::TlsStream<TcpStream>;

/// A connection, plain or TLS.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

/// The read half of a [`Stream`]. A plain one can be polled without sleeping (`try_read`); a TLS
/// one is read normally (its records must be decrypted as a whole).
#[derive(Debug)]
pub enum ReadHalf {
    Plain(OwnedReadHalf),
    Tls(tokio::io::ReadHalf<TlsStream>),
}

/// The write half of a [`Stream`].
#[derive(Debug)]
pub enum WriteHalf {
    Plain(OwnedWriteHalf),
    Tls(tokio::io::WriteHalf<TlsStream>),
}

impl Stream {
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Plain(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            Stream::Tls(s) => {
                let (r, w) = tokio::io::split(*s);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
        }
    }

    /// The TCP socket underneath (for socket options).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }
}

impl ReadHalf {
    pub async fn read_buf(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        use tokio::io::AsyncReadExt;
        match self {
            ReadHalf::Plain(r) => r.read_buf(buf).await,
            ReadHalf::Tls(r) => r.read_buf(buf).await,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

macro_rules! delegate_write {
    ($t:ty, $($variant:ident),+) => {
        impl AsyncWrite for $t {
            fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $(Self::$variant(s) => Pin::new(s).poll_write(cx, b),)+
                }
            }
            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                b: &[IoSlice<'_>],
            ) -> Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $(Self::$variant(s) => Pin::new(s).poll_write_vectored(cx, b),)+
                }
            }
            fn is_write_vectored(&self) -> bool {
                match self {
                    $(Self::$variant(s) => s.is_write_vectored(),)+
                }
            }
            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $(Self::$variant(s) => Pin::new(s).poll_flush(cx),)+
                }
            }
            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $(Self::$variant(s) => Pin::new(s).poll_shutdown(cx),)+
                }
            }
        }
    };
}

delegate_write!(WriteHalf, Plain, Tls);

delegate_write!(Stream, Plain, Tls);

/// When a reader polls its socket before its thread sleeps.
///
/// A sleeping thread costs a wakeup when the next frame comes, measured at ~100 us on this VM: more
/// than a whole 4 KiB round trip. A chain of dependent requests (a filesystem journal commit: write,
/// flush, write, flush; or fio at queue depth 1) pays it at every step, on both ends. So a reader
/// whose recent frames came less than `max` apart polls for up to `max`. One whose frames come
/// further apart (idle, or lightly used) does not poll at all, and costs no CPU.
#[derive(Debug)]
pub struct Spin {
    max: Duration,
    /// Moving average of the wait for the next frame, in ns. Each sample is capped at 2 x `max`, so
    /// one long idle period is forgotten after a few quick frames.
    avg_wait_ns: u64,
}

impl Spin {
    pub fn new(max: Duration) -> Self {
        // Start idle: a new reader polls once its frames prove to come close together.
        let max_ns = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        Self { max, avg_wait_ns: max_ns.saturating_mul(2) }
    }

    /// How long the next read should poll: `max` while frames come close together, else zero.
    pub fn window(&self) -> Duration {
        if u128::from(self.avg_wait_ns) < self.max.as_nanos() {
            self.max
        } else {
            Duration::ZERO
        }
    }

    /// Records how long a read waited for its frame.
    pub fn observe(&mut self, waited: Duration) {
        let cap = self.max.as_nanos().saturating_mul(2);
        let sample = u64::try_from(waited.as_nanos().min(cap)).unwrap_or(u64::MAX);
        self.avg_wait_ns = self.avg_wait_ns - self.avg_wait_ns / 4 + sample / 4;
    }

    /// Reads the next bytes, polling first when recent frames came close together.
    pub async fn read(&mut self, rd: &mut ReadHalf, buf: &mut BytesMut) -> std::io::Result<usize> {
        let start = Instant::now();
        let r = read_polling(rd, buf, self.window()).await;
        self.observe(start.elapsed());
        r
    }
}

/// Reads into `buf`. First polls for up to `spin` without sleeping, then waits normally.
///
/// Between two polls the thread yields twice: to the other tasks of its runtime (`yield_now`), and to
/// any other thread that is ready to run on its CPU (`sched_yield`). The second matters on a small
/// machine: the thread that will produce the awaited frame (fio, a FUSE thread, the peer) often
/// waits for this very CPU, and a poller that kept it would delay the frame it polls for. With it,
/// polling on both ends took 4 KiB random I/O at queue depth 1 through the FUSE file from ~20K to
/// ~30K IOPS on 2 vCPUs; without it, client-side polling lost 20% there.
pub async fn read_polling(rd: &mut ReadHalf, buf: &mut BytesMut, spin: Duration) -> std::io::Result<usize> {
    match poll_for(rd, buf, spin).await {
        Some(r) => r,
        None => rd.read_buf(buf).await,
    }
}

/// The polling half of [`read_polling`]: reads into `buf` if data comes within `spin`, else `None`
/// (for a caller that then waits for data *or* something else). A TLS stream is not polled.
pub async fn poll_for(
    rd: &mut ReadHalf,
    buf: &mut BytesMut,
    spin: Duration,
) -> Option<std::io::Result<usize>> {
    let ReadHalf::Plain(rd) = rd else { return None };
    if spin.is_zero() {
        return None;
    }
    let start = Instant::now();
    loop {
        match rd.try_read_buf(buf) {
            Ok(n) => return Some(Ok(n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Some(Err(e)),
        }
        if start.elapsed() >= spin {
            return None;
        }
        std::thread::yield_now();
        tokio::task::yield_now().await;
    }
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

/// TCP_USER_TIMEOUT: how long sent data may stay unacknowledged before the kernel fails the socket.
pub fn set_tcp_user_timeout(
    stream: &impl std::os::unix::io::AsRawFd,
    limit: Duration,
) -> std::io::Result<()> {
    let ms = libc::c_uint::try_from(limit.as_millis()).unwrap_or(libc::c_uint::MAX);
    // SAFETY: setsockopt on a valid socket fd, with a pointer to a c_uint and its size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&ms as *const libc::c_uint).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::c_uint>()).unwrap_or(4),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_only_while_frames_come_close_together() {
        let max = Duration::from_micros(300);
        let mut s = Spin::new(max);
        assert_eq!(s.window(), Duration::ZERO, "a new reader does not poll");
        for _ in 0..4 {
            s.observe(Duration::from_micros(120));
        }
        assert_eq!(s.window(), max, "frames ~120 us apart: poll");
        // A long idle period is capped, so it switches polling off after a few, not forever.
        for _ in 0..4 {
            s.observe(Duration::from_secs(10));
        }
        assert_eq!(s.window(), Duration::ZERO, "idle: no polling");
        for _ in 0..6 {
            s.observe(Duration::from_micros(50));
        }
        assert_eq!(s.window(), max, "busy again after a few quick frames");
        assert_eq!(Spin::new(Duration::ZERO).window(), Duration::ZERO);
    }

    #[tokio::test]
    async fn polling_read_returns_data_that_arrives_during_the_poll_and_after_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (mut rd, _w) = Stream::Plain(client.unwrap()).into_split();
        let (mut peer, _) = server.unwrap();
        let mut buf = BytesMut::new();
        let writer = tokio::spawn(async move {
            peer.write_all(b"first").await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            peer.write_all(b"second").await.unwrap();
            peer
        });
        // Polls long enough to see "first", then the 50 ms gap outlasts a 1 ms poll and it sleeps.
        let mut got = 0;
        while got < 5 {
            got += read_polling(&mut rd, &mut buf, Duration::from_secs(1)).await.unwrap();
        }
        while got < 11 {
            got += read_polling(&mut rd, &mut buf, Duration::from_millis(1)).await.unwrap();
        }
        assert_eq!(&buf[..], b"firstsecond");
        drop(writer.await.unwrap());
        assert_eq!(read_polling(&mut rd, &mut buf, Duration::from_millis(1)).await.unwrap(), 0, "EOF");
    }
}

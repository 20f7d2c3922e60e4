//! A tiny blocking protocol client for wire tests: it speaks raw frames, so tests can also send broken
//! ones.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // tests: a panic is a failure
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::BytesMut;
use ferrovol_proto::codec::{split_response, Hello};
use ferrovol_proto::*;

pub struct RawClient {
    pub stream: TcpStream,
    buf: BytesMut,
    next_id: u64,
    /// The node id of the HELLO (empty before it).
    pub node: String,
}

impl RawClient {
    pub fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream.set_nodelay(true).unwrap();
        Self { stream, buf: BytesMut::new(), next_id: 1, node: String::new() }
    }

    pub fn hello(addr: SocketAddr, node: &str, token: &str) -> Self {
        let mut c = Self::connect(addr);
        let r = c.call(hello_request(node, token));
        assert!(r.result.is_ok(), "handshake failed: {r:?}");
        c.node = node.to_owned();
        c
    }

    pub fn send_bytes(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(b)
    }

    pub fn send(&mut self, req: &Request) -> RequestId {
        let id = RequestId(self.next_id);
        self.next_id += 1;
        self.send_bytes(&req.encode(id).to_bytes()).expect("send");
        id
    }

    /// The next response, or None on EOF / connection reset.
    pub fn recv(&mut self) -> Option<Response> {
        loop {
            if let Some(raw) = split_response(&mut self.buf).expect("response framing") {
                return Some(Response::parse(raw).expect("response payload"));
            }
            let mut tmp = vec![0u8; 1 << 16];
            match self.stream.read(&mut tmp) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
    }

    pub fn call(&mut self, req: Request) -> Response {
        let id = self.send(&req);
        let r = self.recv().expect("connection closed");
        assert_eq!(r.request_id, id);
        r
    }

    /// True when the server closed the connection (EOF) within the read timeout.
    pub fn is_closed(&mut self) -> bool {
        let mut tmp = [0u8; 4096];
        loop {
            match self.stream.read(&mut tmp) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

pub fn name(s: &str) -> VolumeName {
    VolumeName::try_from(s).unwrap()
}

pub fn status(r: &Response) -> Status {
    match &r.result {
        Ok(_) => Status::Ok,
        Err(e) => e.status,
    }
}

/// A HELLO as the client library sends it (a random client session).
pub fn hello_request(node: &str, token: &str) -> Request {
    hello_as(node, token, rand_session(), 0)
}

/// A HELLO for connection `slot` of client session `session`.
pub fn hello_as(node: &str, token: &str, session: u64, slot: u16) -> Request {
    Request::Hello(Hello {
        version_min: ferrovol_proto::limits::PROTOCOL_VERSION_MIN,
        version_max: ferrovol_proto::limits::PROTOCOL_VERSION,
        features: 7,
        session,
        slot,
        node_id: NodeId::try_from(node).unwrap(),
        token: token.into(),
    })
}

fn rand_session() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id().into());
    h.finish() | 1
}

/// ATTACH_SET for the client's own node: the generation, or the refusal.
pub fn attach(c: &mut RawClient, vol: &str, force: bool) -> Result<u64, ferrovol_proto::ErrorReply> {
    let node = NodeId::try_from(c.node.as_str()).unwrap();
    match c.call(Request::AttachSet { name: name(vol), node, force }).result {
        Ok(Reply::Attached { generation }) => Ok(generation),
        Ok(other) => panic!("{other:?}"),
        Err(e) => Err(e),
    }
}

/// Takes the writer attachment for the client's node, then opens read-write under it.
pub fn open(c: &mut RawClient, vol: &str) -> VolumeHandle {
    let generation = attach(c, vol, false).expect("writer attachment");
    match c.call(Request::Open { name: name(vol), read_only: false, generation }).result {
        Ok(Reply::Opened { handle, .. }) => handle,
        other => panic!("open failed: {other:?}"),
    }
}

/// The real `ferrovol-server` binary on `dir`, listening on `listen`; returns once it listens.
pub fn spawn_server(dir: &Path, listen: &str) -> (Child, SocketAddr) {
    spawn_server_with(dir, listen, &[])
}

/// With extra command-line arguments.
pub fn spawn_server_with(dir: &Path, listen: &str, extra: &[&std::ffi::OsStr]) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrovol-server"))
        .args(["--data", dir.to_str().unwrap(), "--listen", listen])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn ferrovol-server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected: {line:?}"));
    (child, addr.parse().unwrap())
}

/// Deterministic pseudo-random bytes (xorshift) for data checks.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

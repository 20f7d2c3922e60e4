//! Hostile and broken input against a real server on 127.0.0.1: every case gets an error status or a
//! closed connection, the server stays up, and another client's I/O goes on throughout.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // tests: a panic is a failure

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use ferrovol_proto::*;
use ferrovol_server::{Server, ServerConfig};

fn start(token: Option<&str>) -> (SocketAddr, tempfile::TempDir, std::thread::JoinHandle<()>) {
    start_auth(ferrovol_server::Auth { admin_token: token.map(str::to_owned), join_token: None })
}

fn start_auth(auth: ferrovol_server::Auth) -> (SocketAddr, tempfile::TempDir, std::thread::JoinHandle<()>) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap());
    config.auth = auth;
    config.handshake_timeout = Duration::from_secs(2);
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let server = Server::bind(config).await.unwrap();
            tx.send(server.local_addr().unwrap()).unwrap();
            server.run(std::future::pending()).await.unwrap();
        });
    });
    (rx.recv().unwrap(), dir, t)
}

/// A well-behaved client doing checked I/O; call `round` between hostile cases.
struct Bystander {
    c: RawClient,
    h: VolumeHandle,
    n: u64,
}

impl Bystander {
    fn new(addr: SocketAddr) -> Self {
        let mut c = RawClient::hello(addr, "bystander", "sesame");
        let r = c.call(Request::VolumeCreate {
            kind: ferrovol_proto::codec::VOLUME_KIND_BLOCK,
            name: name("calm"),
            size: 1 << 20,
            labels: Labels::new(),
            source: None,
        });
        assert_eq!(status(&r), Status::Ok);
        let h = open(&mut c, "calm");
        Self { c, h, n: 0 }
    }
    fn round(&mut self) {
        self.n += 1;
        let data = Bytes::from(vec![(self.n % 251) as u8; 4096]);
        let off = (self.n % 256) * 4096;
        let r = self.c.call(Request::Write { handle: self.h, offset: off, data: data.clone(), fua: false });
        assert_eq!(status(&r), Status::Ok, "bystander write #{}", self.n);
        let r = self.c.call(Request::Read { handle: self.h, offset: off, len: 4096 });
        assert_eq!(r.result, Ok(Reply::Data(data)), "bystander read #{}", self.n);
    }
}

#[test]
fn hostile_input_never_hurts_others() {
    let (addr, _dir, _t) = start(Some("sesame"));
    let mut by = Bystander::new(addr);
    by.round();

    // Wrong token: AuthFailed, then closed.
    let mut c = RawClient::connect(addr);
    let r = c.call(hello_request("mallory", "guess"));
    assert_eq!(status(&r), Status::AuthFailed);
    assert!(c.is_closed());
    by.round();

    // Any request before HELLO: NotReady, then closed.
    let mut c = RawClient::connect(addr);
    let r = c.call(Request::VolumeList { start_after: None, max_entries: 10 });
    assert_eq!(status(&r), Status::NotReady);
    assert!(c.is_closed());
    by.round();

    // Random garbage: an error reply (request id 0) and a closed connection.
    let mut c = RawClient::connect(addr);
    c.send_bytes(&[0x5a; 200]).unwrap();
    let r = c.recv().expect("an error reply before closing");
    assert_eq!((r.request_id, status(&r)), (RequestId(0), Status::BadRequest));
    assert!(c.is_closed());
    by.round();

    // An oversized length: TooLarge for that request id, closed, nothing allocated for it.
    let mut c = RawClient::hello(addr, "big", "sesame");
    let h = header::RequestHeader {
        version: ferrovol_proto::limits::PROTOCOL_VERSION,
        opcode: Opcode::Write as u8,
        request_id: RequestId(77),
        payload_len: u32::MAX,
        length: u32::MAX,
        ..Default::default()
    };
    c.send_bytes(&h.encode()).unwrap();
    let r = c.recv().unwrap();
    assert_eq!((r.request_id, status(&r)), (RequestId(77), Status::TooLarge));
    assert!(c.is_closed());
    by.round();

    // A bad payload CRC: Checksum for that request, and the connection stays usable.
    let mut c = RawClient::hello(addr, "crc", "sesame");
    let r = c.call(Request::VolumeCreate {
        kind: ferrovol_proto::codec::VOLUME_KIND_BLOCK,
        name: name("scratch"),
        size: 1 << 20,
        labels: Labels::new(),
        source: None,
    });
    assert_eq!(status(&r), Status::Ok);
    let hd = open(&mut c, "scratch");
    let mut frame = Request::Write { handle: hd, offset: 0, data: Bytes::from_static(b"abcd"), fua: false }
        .encode(RequestId(5))
        .to_bytes()
        .to_vec();
    *frame.last_mut().unwrap() ^= 1;
    c.send_bytes(&frame).unwrap();
    let r = c.recv().unwrap();
    assert_eq!((r.request_id, status(&r)), (RequestId(5), Status::Checksum));
    let r = c.call(Request::Read { handle: hd, offset: 0, len: 4 });
    assert_eq!(status(&r), Status::Ok, "connection still usable after a checksum error");
    by.round();

    // Hostile names, unknown handles, out-of-range I/O, unknown opcodes: errors, connection stays.
    // VOLUME_CREATE payload: size u64, kind u8, name str8 = "../x".
    let payload = [&(1u64 << 20).to_le_bytes()[..], &[0u8], &[4u8], b"../x"].concat();
    let hdr = header::RequestHeader {
        version: ferrovol_proto::limits::PROTOCOL_VERSION,
        opcode: Opcode::VolumeCreate as u8,
        request_id: RequestId(9),
        payload_len: payload.len() as u32,
        payload_crc: crc32fast::hash(&payload),
        ..Default::default()
    };
    let mut bytes = hdr.encode().to_vec();
    bytes.extend_from_slice(&payload);
    c.send_bytes(&bytes).unwrap();
    let r = c.recv().unwrap();
    assert_eq!((r.request_id, status(&r)), (RequestId(9), Status::InvalidName));
    let r = c.call(Request::Read { handle: VolumeHandle(999), offset: 0, len: 1 });
    assert_eq!(status(&r), Status::BadHandle);
    let r = c.call(Request::Read { handle: hd, offset: u64::MAX - 1, len: 4096 });
    assert_eq!(status(&r), Status::OutOfRange);
    let r = c.call(Request::Write {
        handle: hd,
        offset: (1 << 20) - 2,
        data: Bytes::from_static(b"xyz"),
        fua: false,
    });
    assert_eq!(status(&r), Status::OutOfRange);
    let r = c.call(Request::VolumeStat { name: name("nope") });
    assert_eq!(status(&r), Status::NotFound);
    let unknown = header::RequestHeader {
        version: ferrovol_proto::limits::PROTOCOL_VERSION,
        opcode: 0x7e,
        request_id: RequestId(31),
        ..Default::default()
    };
    c.send_bytes(&unknown.encode()).unwrap();
    let r = c.recv().unwrap();
    assert_eq!((r.request_id, status(&r)), (RequestId(31), Status::UnknownOpcode));
    let r = c.call(Request::VolumeCreate {
        kind: ferrovol_proto::codec::VOLUME_KIND_BLOCK,
        name: name("odd"),
        size: 1000,
        labels: Labels::new(),
        source: None,
    });
    assert_eq!(status(&r), Status::InvalidArgument);
    by.round();

    // A truncated frame followed by EOF: the server just closes that connection.
    let mut c = RawClient::hello(addr, "trunc", "sesame");
    let frame =
        Request::Write { handle: VolumeHandle(1), offset: 0, data: Bytes::from(vec![1u8; 1000]), fua: false }
            .encode(RequestId(3))
            .to_bytes();
    c.send_bytes(&frame[..500]).unwrap();
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(c.is_closed());
    by.round();

    // A silent connection that never says HELLO is closed after the handshake timeout.
    let mut c = RawClient::connect(addr);
    let t = std::time::Instant::now();
    assert!(c.is_closed());
    assert!(t.elapsed() < Duration::from_secs(8));
    by.round();

    // Deleting a volume that is open elsewhere is refused.
    let r = c_del(addr);
    assert_eq!(r, Status::Busy);
    by.round();
}

fn c_del(addr: SocketAddr) -> Status {
    let mut c = RawClient::hello(addr, "deleter", "sesame");
    status(&c.call(Request::VolumeDelete { name: name("calm"), force: false }))
}

#[test]
fn pipelined_out_of_order_and_fencing() {
    let (addr, _dir, _t) = start(None);
    let mut a = RawClient::hello(addr, "node-a", "");
    assert_eq!(
        status(&a.call(Request::VolumeCreate {
            kind: ferrovol_proto::codec::VOLUME_KIND_BLOCK,
            name: name("v"),
            size: 4 << 20,
            labels: Labels::new(),
            source: None
        })),
        Status::Ok
    );
    let ha = open(&mut a, "v");
    // 64 writes pipelined, then a FLUSH, then 64 reads: every reply arrives, matched by id.
    let mut ids = std::collections::HashSet::new();
    for i in 0..64u64 {
        let data = Bytes::from(vec![i as u8; 65536]);
        ids.insert(a.send(&Request::Write { handle: ha, offset: i * 65536, data, fua: i % 8 == 0 }));
    }
    ids.insert(a.send(&Request::Flush { handle: ha }));
    for _ in 0..65 {
        let r = a.recv().unwrap();
        assert!(ids.remove(&r.request_id), "unexpected id {}", r.request_id);
        assert_eq!(status(&r), Status::Ok);
    }
    let mut want = std::collections::HashMap::new();
    for i in 0..64u64 {
        want.insert(a.send(&Request::Read { handle: ha, offset: i * 65536, len: 65536 }), i as u8);
    }
    for _ in 0..64 {
        let r = a.recv().unwrap();
        let fill = want.remove(&r.request_id).unwrap();
        match r.result {
            Ok(Reply::Data(d)) => assert!(d.len() == 65536 && d.iter().all(|b| *b == fill)),
            other => panic!("{other:?}"),
        }
    }

    // Fencing: A holds the writer attachment (generation 1, taken by `open`); B may read, but may
    // neither open it read-write (under any generation) nor take it without forcing.
    assert_eq!(attach(&mut a, "v", false).unwrap(), 1, "A holds generation 1");
    let mut b = RawClient::hello(addr, "node-b", "");
    for generation in [0, 1, 2] {
        let r = b.call(Request::Open { name: name("v"), read_only: false, generation });
        assert_eq!(status(&r), Status::AttachedElsewhere, "{r:?}");
    }
    let e = attach(&mut b, "v", false).unwrap_err();
    assert_eq!(e.status, Status::AttachedElsewhere);
    assert!(e.message.contains("node \"node-a\"") && e.message.contains("ago"), "{e}");
    let hb_ro = match b.call(Request::Open { name: name("v"), read_only: true, generation: 0 }).result {
        Ok(Reply::Opened { handle, .. }) => handle,
        other => panic!("{other:?}"),
    };
    assert_eq!(status(&b.call(Request::Read { handle: hb_ro, offset: 0, len: 4 })), Status::Ok);
    assert_eq!(
        status(&b.call(Request::Write {
            handle: hb_ro,
            offset: 0,
            data: Bytes::from_static(b"x"),
            fua: false
        })),
        Status::ReadOnly
    );
    assert_eq!(
        status(&a.call(Request::Write {
            handle: ha,
            offset: 0,
            data: Bytes::from_static(b"mine"),
            fua: false
        })),
        Status::Ok
    );
    // After A lets go (its own generation), B may take it and write.
    let release = |g| Request::AttachClear {
        name: name("v"),
        node: NodeId::try_from("node-a").unwrap(),
        generation: g,
    };
    assert_eq!(status(&a.call(release(7))), Status::Fenced, "not A's generation: not released");
    assert_eq!(status(&a.call(release(1))), Status::Ok);
    let hb = open(&mut b, "v");
    let w = Request::Write { handle: hb, offset: 0, data: Bytes::from_static(b"mine"), fua: false };
    assert_eq!(status(&b.call(w)), Status::Ok);
    assert_eq!(
        status(&a.call(Request::Write {
            handle: ha,
            offset: 0,
            data: Bytes::from_static(b"late"),
            fua: false
        })),
        Status::Fenced
    );

    // TRIM lowers the allocated bytes.
    let alloc = |c: &mut RawClient| match c.call(Request::VolumeStat { name: name("v") }).result {
        Ok(Reply::Volume(v)) => v.allocated,
        other => panic!("{other:?}"),
    };
    let before = alloc(&mut b);
    assert!(before >= 4 << 20, "allocated {before}");
    assert_eq!(status(&b.call(Request::Trim { handle: hb, offset: 0, len: 4 << 20 })), Status::Ok);
    let after = alloc(&mut b);
    assert!(after < before / 2, "allocated {before} -> {after}");
    match b.call(Request::Read { handle: hb, offset: 0, len: 4096 }).result {
        Ok(Reply::Data(d)) => assert!(d.iter().all(|x| *x == 0)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn takeover_fences_writes_already_in_flight() {
    use std::io::Write as _;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let (addr, _dir, _t) = start(None);
    let mut a = RawClient::hello(addr, "node-a", "");
    let r = a.call(Request::VolumeCreate {
        kind: ferrovol_proto::codec::VOLUME_KIND_BLOCK,
        name: name("v"),
        size: 1 << 20,
        labels: Labels::new(),
        source: None,
    });
    assert_eq!(status(&r), Status::Ok);
    let ha = open(&mut a, "v");
    const BLOCKS: u64 = 16;

    // A streams writes of 'A' over the first blocks without waiting for replies; a second thread
    // tallies the replies.
    let mut tx = a.stream.try_clone().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut id = 1000u64;
            while !stop.load(Ordering::Relaxed) {
                let data = Bytes::from(vec![b'A'; 4096]);
                let w = Request::Write { handle: ha, offset: (id % BLOCKS) * 4096, data, fua: false };
                if tx.write_all(&w.encode(RequestId(id)).to_bytes()).is_err() {
                    break;
                }
                id += 1;
            }
            tx.shutdown(std::net::Shutdown::Write).unwrap();
        })
    };
    let tally = std::thread::spawn(move || {
        let (mut ok, mut fenced) = (0u64, 0u64);
        while let Some(r) = a.recv() {
            match status(&r) {
                Status::Ok => ok += 1,
                Status::Fenced => fenced += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        (ok, fenced)
    });
    std::thread::sleep(Duration::from_millis(100));

    // B takes the volume over (A is "dead" as far as B knows) and overwrites every block.
    let mut b = RawClient::hello(addr, "node-b", "");
    let g = attach(&mut b, "v", true).unwrap();
    assert_eq!(g, 2);
    let hb = match b.call(Request::Open { name: name("v"), read_only: false, generation: g }).result {
        Ok(Reply::Opened { handle, .. }) => handle,
        other => panic!("{other:?}"),
    };
    for i in 0..BLOCKS {
        let w =
            Request::Write { handle: hb, offset: i * 4096, data: Bytes::from(vec![b'B'; 4096]), fua: false };
        assert_eq!(status(&b.call(w)), Status::Ok);
    }
    assert_eq!(status(&b.call(Request::Flush { handle: hb })), Status::Ok);
    // A keeps sending for a while after the takeover was answered.
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    let (ok, fenced) = tally.join().unwrap();
    assert!(ok > 0 && fenced > 0, "A's writes overlapped the takeover: {ok} ok, {fenced} fenced");

    // Not one of A's writes landed after the takeover: every block still holds B's data.
    match b.call(Request::Read { handle: hb, offset: 0, len: (BLOCKS * 4096) as u32 }).result {
        Ok(Reply::Data(d)) => assert!(d.iter().all(|x| *x == b'B'), "a write of the old holder landed"),
        other => panic!("{other:?}"),
    }
}

/// READs racing WRITEs of the same range: every reply's CRC matches its bytes (the CRC is taken
/// over the reply's own buffer, not over page cache that a write may change before it is sent).
#[test]
fn reads_racing_writes_always_carry_a_matching_crc() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let (addr, _dir, _t) = start(None);
    let mut w = RawClient::hello(addr, "writer", "");
    let r = w.call(Request::VolumeCreate {
        kind: ferrovol_proto::codec::VOLUME_KIND_BLOCK,
        name: name("race"),
        size: 4 << 20,
        labels: Labels::new(),
        source: None,
    });
    assert_eq!(status(&r), Status::Ok);
    let hw = open(&mut w, "race");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0u8;
            while !stop.load(Ordering::Relaxed) {
                let data = Bytes::from(vec![i; 1 << 20]);
                assert_eq!(
                    status(&w.call(Request::Write { handle: hw, offset: 0, data, fua: false })),
                    Status::Ok
                );
                i = i.wrapping_add(1);
            }
        })
    };
    let mut rd = RawClient::hello(addr, "reader", "");
    let hr = match rd.call(Request::Open { name: name("race"), read_only: true, generation: 0 }).result {
        Ok(Reply::Opened { handle, .. }) => handle,
        other => panic!("{other:?}"),
    };
    let t = std::time::Instant::now();
    let mut reads = 0;
    while t.elapsed() < Duration::from_secs(2) {
        // `recv` parses every reply, CRC check included, and fails the test on a mismatch.
        match rd.call(Request::Read { handle: hr, offset: 0, len: 1 << 20 }).result {
            Ok(Reply::Data(d)) => assert_eq!(d.len(), 1 << 20),
            other => panic!("{other:?}"),
        }
        reads += 1;
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(reads > 10, "{reads} reads");
}

/// A reconnect retires the connection it replaces: once the new HELLO of the same client session
/// and slot is answered, a write still arriving on the old connection is FENCED (it must not land
/// after the client re-sent it on the new one), while another slot of the session is unaffected.
#[test]
fn a_reconnect_retires_the_old_connection_of_its_slot() {
    let (addr, _dir, _t) = start(None);
    let session = 0x5e55_1011;
    let connect = |slot| {
        let mut c = RawClient::connect(addr);
        assert!(c.call(hello_as("n", "", session, slot)).result.is_ok());
        c.node = "n".into();
        c
    };
    let mut old = connect(0);
    let r = old.call(Request::VolumeCreate {
        kind: ferrovol_proto::codec::VOLUME_KIND_BLOCK,
        name: name("v"),
        size: 1 << 20,
        labels: Labels::new(),
        source: None,
    });
    assert_eq!(status(&r), Status::Ok);
    let h_old = open(&mut old, "v");
    let mut other_slot = connect(1);
    let h_other = open(&mut other_slot, "v");
    let w = |h| Request::Write { handle: h, offset: 0, data: Bytes::from_static(b"data"), fua: false };
    assert_eq!(status(&old.call(w(h_old))), Status::Ok);

    let mut new = connect(0); // slot 0 reconnects
    let h_new = open(&mut new, "v");
    let r = old.call(w(h_old));
    assert_eq!(status(&r), Status::Replaced, "{r:?}");
    assert_eq!(status(&new.call(w(h_new))), Status::Ok);
    assert_eq!(status(&other_slot.call(w(h_other))), Status::Ok, "slot 1 is another connection");
    // Reads on the old connection still work (they are harmless).
    assert_eq!(status(&old.call(Request::Read { handle: h_old, offset: 0, len: 4 })), Status::Ok);
}

//! Golden bytes: the exact encoding of representative frames, commented field by field. If one of these
//! changes, the wire format changed: bump the protocol version and update PROTOCOL.md.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // tests: a panic is a failure

use bytes::{Bytes, BytesMut};
use ferrovol_proto::codec::{split_request, split_response};
use ferrovol_proto::*;

fn crc(b: &[u8]) -> [u8; 4] {
    crc32fast::hash(b).to_le_bytes()
}

#[test]
fn read_request_golden() {
    let req = Request::Read { handle: VolumeHandle(3), offset: 0x1000, len: 4096 };
    let frame = req.encode(RequestId(0x0102030405060708));
    let mut expected: Vec<u8> = vec![];
    expected.extend_from_slice(b"FVRQ"); // magic
    expected.push(2); // version
    expected.push(0x22); // opcode READ
    expected.extend_from_slice(&[0, 0]); // flags
    expected.extend_from_slice(&[8, 7, 6, 5, 4, 3, 2, 1]); // request id, LE
    expected.extend_from_slice(&[3, 0, 0, 0]); // handle
    expected.extend_from_slice(&[0, 0x10, 0, 0]); // length 4096
    expected.extend_from_slice(&[0, 0x10, 0, 0, 0, 0, 0, 0]); // offset 0x1000
    expected.extend_from_slice(&[0, 0, 0, 0]); // payload_len 0
    expected.extend_from_slice(&[0, 0, 0, 0]); // payload crc of "" = 0
    expected.extend_from_slice(&[0, 0, 0, 0]); // reserved
    let hcrc = crc(&expected);
    expected.extend_from_slice(&hcrc); // header crc over bytes 0..44
    assert_eq!(expected.len(), 48);
    assert_eq!(&frame.header[..], &expected[..]);
    assert!(frame.payload.is_empty());
}

#[test]
fn write_fua_request_golden() {
    let data = Bytes::from_static(b"hello");
    let req = Request::Write { handle: VolumeHandle(1), offset: 512, data: data.clone(), fua: true };
    let frame = req.encode(RequestId(9));
    let mut expected: Vec<u8> = vec![];
    expected.extend_from_slice(b"FVRQ");
    expected.push(2); // version
    expected.push(0x23); // WRITE
    expected.extend_from_slice(&[1, 0]); // flags: FUA
    expected.extend_from_slice(&9u64.to_le_bytes()); // request id
    expected.extend_from_slice(&[1, 0, 0, 0]); // handle 1
    expected.extend_from_slice(&[5, 0, 0, 0]); // length = payload length
    expected.extend_from_slice(&512u64.to_le_bytes()); // offset
    expected.extend_from_slice(&[5, 0, 0, 0]); // payload_len
    expected.extend_from_slice(&crc(b"hello")); // payload crc
    expected.extend_from_slice(&[0, 0, 0, 0]); // reserved
    let hcrc = crc(&expected);
    expected.extend_from_slice(&hcrc);
    assert_eq!(&frame.header[..], &expected[..]);
    // Zero-copy: the payload is the caller's buffer, not a copy of it.
    assert_eq!(frame.payload.as_ptr(), data.as_ptr());
}

#[test]
fn hello_request_golden() {
    let req = Request::Hello(Hello {
        version_min: 2,
        version_max: 2,
        features: 0b111,
        session: 0x0102_0304_0506_0708,
        slot: 3,
        node_id: NodeId::try_from("n1").unwrap(),
        token: "tok".into(),
    });
    let frame = req.encode(RequestId(1));
    let payload: &[u8] = &[
        2, // version_min
        2, // version_max
        3, 0, // connection slot within the session
        7, 0, 0, 0, 0, 0, 0, 0, // features: FUA | TRIM | WRITE_ZEROES
        8, 7, 6, 5, 4, 3, 2, 1, // client session id
        2, b'n', b'1', // node id, str8
        3, 0, b't', b'o', b'k', // token, str16
    ];
    assert_eq!(&frame.payload[..], payload);
    assert_eq!(frame.header[5], 0x01); // opcode HELLO
    assert_eq!(&frame.header[32..36], &(payload.len() as u32).to_le_bytes());
    assert_eq!(&frame.header[36..40], &crc(payload));
}

#[test]
fn hello_reply_golden() {
    let resp = Response::ok(
        RequestId(1),
        Opcode::Hello,
        Reply::Hello(HelloReply {
            version: 2,
            session_flags: 0b10, // SESSION_ENROLLED
            features: 7,
            in_flight_requests_max: 256,
            in_flight_bytes_max: 1 << 26,
            payload_len_max: 1 << 22,
            server_id: "s".into(),
            credential: "cr".into(),
        }),
    );
    let payload: &[u8] = &[
        2,    // version chosen
        0b10, // session flags: bit 0 admin, bit 1 enrolled (a credential follows)
        0, 0, // reserved
        7, 0, 0, 0, 0, 0, 0, 0, // features
        0, 1, 0, 0, // in_flight_requests_max 256
        0, 0, 0, 4, // in_flight_bytes_max 64 MiB
        0, 0, 0x40, 0, // payload_len_max 4 MiB
        1, b's', // server id, str8
        2, 0, b'c', b'r', // credential, str16
    ];
    assert_eq!(&resp.encode().payload[..], payload);
}

#[test]
fn attachment_requests_golden() {
    let v = || VolumeName::try_from("v").unwrap();
    let n = || NodeId::try_from("n").unwrap();
    // ATTACH_SET with FORCE (takeover): flag bit 2 in the header, name and node in the payload.
    let f = Request::AttachSet { name: v(), node: n(), force: true }.encode(RequestId(1));
    assert_eq!(frame_flags(&f), 0b100);
    assert_eq!(&f.payload[..], &[1, b'v', 1, b'n']);
    // ATTACH_CLEAR: name, node, generation u64 (0 = any).
    let f = Request::AttachClear { name: v(), node: n(), generation: 5 }.encode(RequestId(1));
    assert_eq!((f.header[5], frame_flags(&f)), (0x16, 0));
    assert_eq!(&f.payload[..], &[1, b'v', 1, b'n', 5, 0, 0, 0, 0, 0, 0, 0]);
    // OPEN read-write under generation 3; read-only carries 0 and flag bit 1.
    let f = Request::Open { name: v(), read_only: false, generation: 3 }.encode(RequestId(1));
    assert_eq!((f.header[5], frame_flags(&f)), (0x20, 0));
    assert_eq!(&f.payload[..], &[1, b'v', 3, 0, 0, 0, 0, 0, 0, 0]);
    let f = Request::Open { name: v(), read_only: true, generation: 0 }.encode(RequestId(1));
    assert_eq!(frame_flags(&f), 0b10);
    assert_eq!(&f.payload[..], &[1, b'v', 0, 0, 0, 0, 0, 0, 0, 0]);
    // PING: opcode 0x02, no payload.
    let f = Request::Ping.encode(RequestId(1));
    assert_eq!((f.header[5], f.payload.len()), (0x02, 0));
    // NODE_RESET: node str8.
    let f = Request::NodeReset { node: n() }.encode(RequestId(1));
    assert_eq!(f.header[5], 0x1a);
    assert_eq!(&f.payload[..], &[1, b'n']);
    // VOLUME_DELETE with FORCE.
    let f = Request::VolumeDelete { name: v(), force: true }.encode(RequestId(1));
    assert_eq!((f.header[5], frame_flags(&f)), (0x11, 0b100));
    // A read-only OPEN with a generation, and FORCE on an opcode that has no such flag, are refused.
    let mut bad =
        Request::Open { name: v(), read_only: true, generation: 0 }.encode(RequestId(9)).to_bytes().to_vec();
    let at = bad.len() - 8;
    bad[at] = 1;
    let mut buf = reframe(&bad);
    assert_eq!(
        Request::parse(split_request(&mut buf).unwrap().unwrap()).unwrap_err().status,
        Status::BadRequest
    );
    let mut h =
        RequestHeader { version: 2, opcode: Opcode::VolumeStat as u8, flags: 0b100, ..Default::default() };
    h.request_id = RequestId(3);
    let mut buf = BytesMut::from(&h.encode()[..]);
    assert_eq!(
        Request::parse(split_request(&mut buf).unwrap().unwrap()).unwrap_err().status,
        Status::BadRequest
    );
}

fn frame_flags(f: &RequestFrame) -> u16 {
    u16::from_le_bytes([f.header[6], f.header[7]])
}

/// Re-encodes a request whose payload was edited: new payload CRC and header CRC.
fn reframe(bytes: &[u8]) -> BytesMut {
    let payload = &bytes[REQUEST_HEADER_LEN..];
    let mut header = bytes[..REQUEST_HEADER_LEN].to_vec();
    header[36..40].copy_from_slice(&crc(payload));
    let hcrc = crc(&header[..44]);
    header[44..48].copy_from_slice(&hcrc);
    let mut out = BytesMut::from(&header[..]);
    out.extend_from_slice(payload);
    out
}

#[test]
fn volume_create_payload_golden() {
    let req = Request::VolumeCreate {
        kind: ferrovol_proto::codec::VOLUME_KIND_BLOCK,
        name: VolumeName::try_from("vol-a").unwrap(),
        size: 1 << 30,
        labels: Labels::new(),
        source: None,
    };
    let frame = req.encode(RequestId(2));
    let payload: &[u8] = &[
        0, 0, 0, 0x40, 0, 0, 0, 0, // size 1 GiB
        0, // kind: block
        5, b'v', b'o', b'l', b'-', b'a', // name, str8
    ];
    assert_eq!(&frame.payload[..], payload);
    assert_eq!(frame.header[5], 0x10);
}

#[test]
fn volume_create_with_labels_golden() {
    let labels = Labels::from([("k".to_owned(), "vé".to_owned())]);
    let req = Request::VolumeCreate {
        kind: ferrovol_proto::codec::VOLUME_KIND_BLOCK,
        name: VolumeName::try_from("v").unwrap(),
        size: 4096,
        labels,
        source: None,
    };
    let frame = req.encode(RequestId(3));
    let payload: &[u8] = &[
        0, 0x10, 0, 0, 0, 0, 0, 0, // size 4096
        0, // kind: block
        1, b'v', // name, str8
        1,    // one label
        1, b'k', // key, str8
        3, 0, b'v', 0xc3, 0xa9, // value, str16 (UTF-8)
    ];
    assert_eq!(&frame.payload[..], payload);
    let mut buf = BytesMut::new();
    frame.write_to(&mut buf);
    let (_, back) = Request::parse(split_request(&mut buf).unwrap().unwrap()).unwrap();
    assert_eq!(back, req);
    // Bad labels are refused by the decoder: an uppercase key.
    let bad = Request::VolumeCreate {
        kind: ferrovol_proto::codec::VOLUME_KIND_BLOCK,
        name: VolumeName::try_from("v").unwrap(),
        size: 4096,
        labels: Labels::from([("K".to_owned(), String::new())]),
        source: None,
    };
    let mut buf = BytesMut::new();
    bad.encode(RequestId(4)).write_to(&mut buf);
    assert!(Request::parse(split_request(&mut buf).unwrap().unwrap()).is_err());
}

#[test]
fn volume_create_from_source_golden() {
    let req = Request::VolumeCreate {
        kind: ferrovol_proto::codec::VOLUME_KIND_BLOCK,
        name: VolumeName::try_from("c").unwrap(),
        size: 0,
        labels: Labels::new(),
        source: Some(VolumeSource::Snapshot(VolumeName::try_from("s1").unwrap())),
    };
    let frame = req.encode(RequestId(3));
    let payload: &[u8] = &[
        0, 0, 0, 0, 0, 0, 0, 0, // size 0: the source's size
        0, // kind: block
        1, b'c', // name, str8
        0,    // no labels (present because a source follows)
        1,    // source kind: snapshot
        2, b's', b'1', // source name, str8
    ];
    assert_eq!(&frame.payload[..], payload);
    let mut buf = BytesMut::new();
    frame.write_to(&mut buf);
    let (_, back) = Request::parse(split_request(&mut buf).unwrap().unwrap()).unwrap();
    assert_eq!(back, req);
    // An unknown source kind is refused.
    let mut bad = payload.to_vec();
    bad[12] = 3;
    let mut h = RequestHeader::decode(&frame.header).unwrap();
    h.payload_len = bad.len() as u32;
    h.payload_crc = u32::from_le_bytes(crc(&bad));
    let mut buf = BytesMut::from(&h.encode()[..]);
    buf.extend_from_slice(&bad);
    let err = Request::parse(split_request(&mut buf).unwrap().unwrap()).unwrap_err();
    assert_eq!(err.status, Status::BadRequest);
}

#[test]
fn snapshot_requests_golden() {
    let n = |s: &str| VolumeName::try_from(s).unwrap();
    let create = Request::SnapshotCreate { name: n("s1"), source: n("v"), labels: Labels::new() };
    let f = create.encode(RequestId(1));
    assert_eq!(f.header[5], 0x1b);
    assert_eq!(&f.payload[..], &[2, b's', b'1', 1, b'v', 0][..]);
    let f = Request::SnapshotDelete { name: n("s1") }.encode(RequestId(1));
    assert_eq!((f.header[5], &f.payload[..]), (0x1c, &[2, b's', b'1'][..]));
    let f = Request::SnapshotStat { name: n("s1") }.encode(RequestId(1));
    assert_eq!((f.header[5], &f.payload[..]), (0x1e, &[2, b's', b'1'][..]));
    let list = Request::SnapshotList { source: Some(n("v")), start_after: None, max_entries: 10 };
    let f = list.encode(RequestId(1));
    assert_eq!((f.header[5], &f.payload[..]), (0x1d, &[10, 0, 0, 0, 0, 1, b'v'][..]));
}

#[test]
fn snapshot_reply_golden() {
    let info = SnapshotInfo {
        name: VolumeName::try_from("s").unwrap(),
        source: VolumeName::try_from("v").unwrap(),
        size: 4096,
        allocated: 0,
        created_unix_ms: 1,
        ready: false,
        copied_bytes: 2048,
        labels: Labels::new(),
        kind: 0,
    };
    let frame = Response::ok(RequestId(9), Opcode::SnapshotStat, Reply::Snapshot(info.clone())).encode();
    let payload: &[u8] = &[
        1, b's', // name
        1, b'v', // source
        0, 0x10, 0, 0, 0, 0, 0, 0, // size 4096
        0, 0, 0, 0, 0, 0, 0, 0, // allocated
        1, 0, 0, 0, 0, 0, 0, 0, // created_unix_ms
        0, // ready: no
        0, 8, 0, 0, 0, 0, 0, 0, // copied_bytes 2048
        0, // labels: none
    ];
    assert_eq!(&frame.payload[..], payload);
    assert_eq!(frame.header[5], 0x1e);
    // A snapshot of an fs volume: the kinds trailer follows, one u8 per snapshot.
    let fs = SnapshotInfo { kind: 1, ..info.clone() };
    let frame = Response::ok(RequestId(9), Opcode::SnapshotStat, Reply::Snapshot(fs.clone())).encode();
    assert_eq!(&frame.payload[..], [payload, &[1]].concat());
    let list = Reply::SnapshotList { entries: vec![info, fs], more: false };
    let frame = Response::ok(RequestId(9), Opcode::SnapshotList, list).encode();
    assert_eq!(frame.payload[..5], [2, 0, 0, 0, 0]);
    assert_eq!(frame.payload[frame.payload.len() - 2..], [0, 1], "kinds trailer: block, fs");
}

#[test]
fn error_response_golden() {
    let resp = Response::error(RequestId(5), Opcode::Write as u8, Status::Fenced, "owned by n2");
    let frame = resp.encode();
    let mut expected: Vec<u8> = vec![];
    expected.extend_from_slice(b"FVRS"); // magic
    expected.push(2); // version
    expected.push(0x23); // opcode echo: WRITE
    expected.extend_from_slice(&[12, 0]); // status 12 = Fenced
    expected.extend_from_slice(&5u64.to_le_bytes()); // request id
    expected.extend_from_slice(&[11, 0, 0, 0]); // payload_len: the message
    expected.extend_from_slice(&crc(b"owned by n2")); // payload crc
    expected.extend_from_slice(&[0, 0, 0, 0]); // reserved
    let hcrc = crc(&expected);
    expected.extend_from_slice(&hcrc); // header crc over bytes 0..28
    assert_eq!(expected.len(), 32);
    assert_eq!(&frame.header[..], &expected[..]);
    assert_eq!(&frame.payload[..], b"owned by n2");
}

#[test]
fn opened_response_golden() {
    let resp = Response::ok(
        RequestId(6),
        Opcode::Open,
        Reply::Opened { handle: VolumeHandle(4), size: 8192, read_only: true },
    );
    let frame = resp.encode();
    let payload: &[u8] = &[
        4, 0, 0, 0, // handle
        1, 0, 0, 0, // flags: read-only
        0, 0x20, 0, 0, 0, 0, 0, 0, // size 8192
    ];
    assert_eq!(&frame.payload[..], payload);
    assert_eq!(&frame.header[6..8], &[0, 0]); // status ok
}

#[test]
fn incomplete_frames_ask_for_more() {
    let frame =
        Request::Write { handle: VolumeHandle(1), offset: 0, data: Bytes::from(vec![7u8; 1000]), fua: false }
            .encode(RequestId(1));
    let all = frame.to_bytes();
    for cut in [0, 1, 47, 48, 100, all.len() - 1] {
        let mut buf = BytesMut::from(&all[..cut]);
        assert_eq!(split_request(&mut buf), Ok(None), "cut at {cut}");
        assert_eq!(buf.len(), cut, "nothing consumed");
    }
    let mut buf = BytesMut::from(&all[..]);
    let raw = split_request(&mut buf).unwrap().unwrap();
    assert!(buf.is_empty());
    let (_, req) = Request::parse(raw).unwrap();
    assert!(matches!(req, Request::Write { ref data, .. } if data.len() == 1000));
}

#[test]
fn payload_is_split_not_copied() {
    let frame =
        Request::Write { handle: VolumeHandle(1), offset: 0, data: Bytes::from(vec![1u8; 64]), fua: false }
            .encode(RequestId(1));
    let mut buf = BytesMut::new();
    frame.write_to(&mut buf);
    let base = buf.as_ptr() as usize;
    let raw = split_request(&mut buf).unwrap().unwrap();
    assert_eq!(raw.payload.as_ptr() as usize, base + REQUEST_HEADER_LEN, "payload shares the read buffer");
}

#[test]
fn corrupt_header_is_fatal() {
    let mut bytes = Request::Flush { handle: VolumeHandle(1) }.encode(RequestId(1)).to_bytes().to_vec();
    bytes[24] ^= 1; // flip a bit of the offset
    let mut buf = BytesMut::from(&bytes[..]);
    assert!(matches!(split_request(&mut buf), Err(FrameError::Header(_))));
    let mut garbage = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n0123456789abcdef0123456789"[..]);
    assert!(matches!(split_request(&mut garbage), Err(FrameError::Header(_))));
}

#[test]
fn oversized_length_rejected_before_allocation() {
    let h = RequestHeader {
        version: 2,
        opcode: Opcode::Write as u8,
        request_id: RequestId(3),
        payload_len: u32::MAX,
        length: u32::MAX,
        ..Default::default()
    };
    let mut buf = BytesMut::from(&h.encode()[..]);
    let cap_before = buf.capacity();
    match split_request(&mut buf) {
        Err(FrameError::PayloadTooLarge { request_id, .. }) => assert_eq!(request_id, RequestId(3)),
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    assert_eq!(buf.capacity(), cap_before);
    // Control opcodes have a much lower limit.
    let h =
        RequestHeader { version: 2, opcode: Opcode::Hello as u8, payload_len: 1 << 20, ..Default::default() };
    let mut buf = BytesMut::from(&h.encode()[..]);
    assert!(matches!(split_request(&mut buf), Err(FrameError::PayloadTooLarge { .. })));
    // An unsupported version is fatal too.
    let h = RequestHeader { version: 9, opcode: 1, ..Default::default() };
    let mut buf = BytesMut::from(&h.encode()[..]);
    assert_eq!(split_request(&mut buf), Err(FrameError::UnsupportedVersion(9)));
}

#[test]
fn bad_payload_crc_is_a_request_error() {
    let frame =
        Request::Write { handle: VolumeHandle(1), offset: 0, data: Bytes::from_static(b"abcd"), fua: false }
            .encode(RequestId(11));
    let mut bytes = frame.to_bytes().to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    let mut buf = BytesMut::from(&bytes[..]);
    let raw = split_request(&mut buf).unwrap().unwrap();
    let err = Request::parse(raw).unwrap_err();
    assert_eq!(err.status, Status::Checksum);
    assert_eq!(err.request_id, RequestId(11));
}

#[test]
fn hostile_names_and_fields_rejected() {
    // A name like "../x" never becomes a VolumeName, so build the payload by hand.
    let payload = [&[4u8][..], b"../x"].concat();
    let h = RequestHeader {
        version: 2,
        opcode: Opcode::VolumeDelete as u8,
        request_id: RequestId(1),
        payload_len: payload.len() as u32,
        payload_crc: crc32fast::hash(&payload),
        ..Default::default()
    };
    let mut buf = BytesMut::from(&h.encode()[..]);
    buf.extend_from_slice(&payload);
    let err = Request::parse(split_request(&mut buf).unwrap().unwrap()).unwrap_err();
    assert_eq!(err.status, Status::InvalidName);

    // Trailing bytes after a valid payload.
    let payload = [&[1u8][..], b"a", b"zz"].concat();
    let h = RequestHeader { payload_len: 4, payload_crc: crc32fast::hash(&payload), ..h };
    let mut buf = BytesMut::from(&h.encode()[..]);
    buf.extend_from_slice(&payload);
    let err = Request::parse(split_request(&mut buf).unwrap().unwrap()).unwrap_err();
    assert_eq!(err.status, Status::BadRequest);

    // Unknown opcode, unknown flags, a READ larger than the limit.
    for (opcode, flags, length) in [(0x7f, 0, 0), (0x22, 0x8000, 0), (0x22, 0, u32::MAX), (0x21, 1, 0)] {
        let h = RequestHeader {
            version: 2,
            opcode,
            flags,
            length,
            request_id: RequestId(2),
            ..Default::default()
        };
        let mut buf = BytesMut::from(&h.encode()[..]);
        let err = Request::parse(split_request(&mut buf).unwrap().unwrap()).unwrap_err();
        assert_ne!(err.status, Status::Ok);
        assert_eq!(err.request_id, RequestId(2));
    }
}

#[test]
fn response_round_trip_all_replies() {
    let info = VolumeInfo {
        name: VolumeName::try_from("v").unwrap(),
        kind: 0,
        size: 1 << 20,
        allocated: 4096,
        created_unix_ms: 1_700_000_000_000,
        generation: 3,
        owner: Some(NodeId::try_from("node-a").unwrap()),
        attached_unix_ms: 1_700_000_001_000,
        labels: Labels::from([("csi.ferrovol.io/name".to_owned(), "pvc-Ω ünïcode".to_owned())]),
    };
    let snap = SnapshotInfo {
        name: VolumeName::try_from("s").unwrap(),
        source: VolumeName::try_from("v").unwrap(),
        size: 1 << 30,
        allocated: 1 << 29,
        created_unix_ms: 1_700_000_000_000,
        ready: true,
        copied_bytes: 1 << 30,
        labels: Labels::from([("csi.ferrovol.io/name".to_owned(), "snapshot-1".to_owned())]),
        kind: 1,
    };
    let cases = vec![
        (
            Opcode::Hello,
            Reply::Hello(HelloReply {
                version: 2,
                session_flags: 3,
                credential: "c".repeat(64),
                features: 7,
                in_flight_requests_max: 256,
                in_flight_bytes_max: 1 << 26,
                payload_len_max: 1 << 22,
                server_id: "srv".into(),
            }),
        ),
        (Opcode::VolumeStat, Reply::Volume(info.clone())),
        (Opcode::VolumeList, Reply::List { entries: vec![info.clone(), info], more: true }),
        (Opcode::AttachSet, Reply::Attached { generation: 9 }),
        (
            Opcode::StoreStat,
            Reply::StoreStat(StoreStat {
                total_bytes: 1 << 40,
                free_bytes: 1 << 39,
                provisioned_bytes: 3 << 40,
                volumes: 7,
            }),
        ),
        (Opcode::NodeStat, Reply::Node { registered_unix_ms: 1_700_000_000_000 }),
        (Opcode::Read, Reply::Data(Bytes::from_static(b"data"))),
        (Opcode::Flush, Reply::Done),
        (Opcode::SnapshotCreate, Reply::Snapshot(snap.clone())),
        (Opcode::SnapshotStat, Reply::Snapshot(snap.clone())),
        (Opcode::SnapshotList, Reply::SnapshotList { entries: vec![snap.clone(), snap], more: false }),
        (Opcode::SnapshotDelete, Reply::Done),
    ];
    for (op, reply) in cases {
        let resp = Response::ok(RequestId(42), op, reply);
        let mut buf = BytesMut::new();
        resp.encode().write_to(&mut buf);
        let back = Response::parse(split_response(&mut buf).unwrap().unwrap()).unwrap();
        assert_eq!(back, resp);
        assert!(buf.is_empty());
    }
}

#[test]
fn fs_lookup_request_golden() {
    use ferrovol_proto::fs::{Creds, FsName, FsOp};
    let req = Request::Fs {
        handle: VolumeHandle(2),
        node: 1,
        creds: Creds { uid: 1000, gid: 100, groups: vec![10] },
        op: FsOp::Lookup { name: FsName::new(Bytes::from_static(b"a.txt")).unwrap() },
    };
    let frame = req.encode(RequestId(7));
    let mut payload: Vec<u8> = vec![];
    payload.extend_from_slice(&1u64.to_le_bytes()); // node 1: the root
    payload.extend_from_slice(&1000u32.to_le_bytes()); // uid
    payload.extend_from_slice(&100u32.to_le_bytes()); // gid
    payload.push(1); // one supplementary group
    payload.extend_from_slice(&10u32.to_le_bytes());
    payload.push(5); // name length
    payload.extend_from_slice(b"a.txt");
    assert_eq!(&frame.payload[..], &payload[..]);
    assert!(frame.head.is_empty());
    assert_eq!(frame.header[5], 0x30); // FS_LOOKUP
    assert_eq!(&frame.header[16..20], &[2, 0, 0, 0]); // the fs volume's handle
    assert_eq!(&frame.header[32..36], &(payload.len() as u32).to_le_bytes());
    assert_eq!(&frame.header[36..40], &crc(&payload));
}

#[test]
fn fs_write_request_sends_the_data_as_its_own_slice() {
    use ferrovol_proto::fs::{Creds, FsOp};
    let data = Bytes::from_static(b"0123456789");
    let req = Request::Fs {
        handle: VolumeHandle(2),
        node: 0x0000_0007_0000_000c,
        creds: Creds { uid: 0, gid: 0, groups: vec![] },
        op: FsOp::Write { fh: 99, flags: 1, offset: 4096, data: data.clone() },
    };
    let frame = req.encode(RequestId(8));
    let mut head: Vec<u8> = vec![];
    head.extend_from_slice(&0x0000_0007_0000_000cu64.to_le_bytes()); // node
    head.extend_from_slice(&[0; 9]); // uid 0, gid 0, no groups
    head.extend_from_slice(&99u64.to_le_bytes()); // fh
    head.extend_from_slice(&1u32.to_le_bytes()); // open flags (O_WRONLY)
    assert_eq!(&frame.head[..], &head[..]);
    // Zero-copy: the data is the caller's buffer.
    assert_eq!(frame.payload.as_ptr(), data.as_ptr());
    assert_eq!(frame.header[5], 0x39); // FS_WRITE
    assert_eq!(&frame.header[20..24], &10u32.to_le_bytes()); // length: the data only
    assert_eq!(&frame.header[24..32], &4096u64.to_le_bytes()); // offset
    let mut whole = head.clone();
    whole.extend_from_slice(&data);
    assert_eq!(&frame.header[32..36], &(whole.len() as u32).to_le_bytes()); // payload: head + data
    assert_eq!(&frame.header[36..40], &crc(&whole)); // one CRC over both
                                                     // The server sees one payload, and splits the data off it without a copy.
    let mut buf = BytesMut::from(&frame.to_bytes()[..]);
    let raw = split_request(&mut buf).unwrap().unwrap();
    let (_, parsed) = Request::parse(raw).unwrap();
    assert_eq!(parsed, req);
}

#[test]
fn errno_reply_golden() {
    let resp = Response {
        request_id: RequestId(5),
        opcode: 0x30,
        result: Err(ErrorReply::errno(2, "FS_LOOKUP: No such file or directory")),
    };
    let frame = resp.encode();
    let mut payload = 2u32.to_le_bytes().to_vec(); // ENOENT
    payload.extend_from_slice(b"FS_LOOKUP: No such file or directory");
    assert_eq!(&frame.payload[..], &payload[..]);
    assert_eq!(&frame.header[6..8], &24u16.to_le_bytes()); // status ERRNO
    let mut buf = BytesMut::from(&frame.to_bytes()[..]);
    let back = Response::parse(split_response(&mut buf).unwrap().unwrap()).unwrap();
    assert_eq!(back, resp);
}

#[test]
fn fs_open_reply_golden_carries_a_small_file() {
    use ferrovol_proto::fs::{Attr, FsReply};
    let attr = Attr { node: 12, size: 5, mode: 0o100_644, nlink: 1, blksize: 4096, ..Attr::default() };
    let data = Bytes::from_static(b"hello");
    let resp = Response::ok(
        RequestId(3),
        Opcode::FsOpen,
        Reply::Fs(FsReply::Opened { attr, fh: 0x42, data: data.clone() }),
    );
    let frame = resp.encode();
    let mut payload: Vec<u8> = vec![];
    payload.extend_from_slice(&12u64.to_le_bytes()); // Attr: node
    payload.extend_from_slice(&5u64.to_le_bytes()); // size
    payload.extend_from_slice(&0u64.to_le_bytes()); // blocks
    payload.extend_from_slice(&[0; 36]); // atime, mtime, ctime: i64 seconds + u32 nanoseconds each
    payload.extend_from_slice(&0o100_644u32.to_le_bytes()); // mode
    payload.extend_from_slice(&1u32.to_le_bytes()); // nlink
    payload.extend_from_slice(&[0; 12]); // uid, gid, rdev
    payload.extend_from_slice(&4096u32.to_le_bytes()); // blksize
    payload.extend_from_slice(&0x42u64.to_le_bytes()); // fh
    payload.extend_from_slice(b"hello"); // the whole file (read-only open, size <= 16 KiB)
    assert_eq!(&frame.payload[..], &payload[..]);
    assert_eq!(frame.header[5], 0x37); // FS_OPEN
    let mut buf = BytesMut::from(&frame.to_bytes()[..]);
    let back = Response::parse(split_response(&mut buf).unwrap().unwrap()).unwrap();
    assert_eq!(back, resp);
    // Inline bytes that are not the whole file are refused, not served as if they were.
    let short = Response::ok(
        RequestId(3),
        Opcode::FsOpen,
        Reply::Fs(FsReply::Opened { attr: Attr { size: 6, ..attr }, fh: 0x42, data }),
    );
    let mut buf = BytesMut::from(&short.encode().to_bytes()[..]);
    assert!(Response::parse(split_response(&mut buf).unwrap().unwrap()).is_err());
}

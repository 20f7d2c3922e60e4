//! Property tests: every request and response survives encode -> split -> parse unchanged, whatever the
//! chunking of the byte stream; and arbitrary bytes never panic the decoders.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // tests: a panic is a failure

use bytes::{Bytes, BytesMut};
use ferrovol_proto::codec::{split_request, split_response};
use ferrovol_proto::*;
use proptest::prelude::*;

fn name() -> impl Strategy<Value = VolumeName> {
    "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?".prop_map(|s| VolumeName::try_from(s).unwrap())
}

fn node() -> impl Strategy<Value = NodeId> {
    "[A-Za-z0-9._:-]{1,128}".prop_map(|s| NodeId::try_from(s.as_str()).unwrap())
}

fn labels() -> impl Strategy<Value = Labels> {
    proptest::collection::btree_map("[a-z0-9./_-]{1,63}", "\\PC{0,64}", 0..=8)
}

fn source() -> impl Strategy<Value = VolumeSource> {
    prop_oneof![name().prop_map(VolumeSource::Snapshot), name().prop_map(VolumeSource::Volume)]
}

fn snapshot_info() -> impl Strategy<Value = SnapshotInfo> {
    (name(), name(), any::<[u64; 4]>(), any::<bool>(), labels(), 0u8..=1).prop_map(
        |(name, source, [size, allocated, created_unix_ms, copied_bytes], ready, labels, kind)| {
            SnapshotInfo { name, source, size, allocated, created_unix_ms, ready, copied_bytes, labels, kind }
        },
    )
}

fn handle() -> impl Strategy<Value = VolumeHandle> {
    any::<u32>().prop_map(VolumeHandle)
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (any::<u8>(), any::<u8>(), any::<u64>(), (any::<u64>(), any::<u16>()), node(), "[ -~]{0,64}")
            .prop_map(|(a, b, f, (session, slot), n, t)| {
                Request::Hello(Hello {
                    version_min: a,
                    version_max: b,
                    features: f,
                    session,
                    slot,
                    node_id: n,
                    token: t,
                })
            }),
        (name(), any::<u64>(), labels(), proptest::option::of(source())).prop_map(
            |(name, size, labels, source)| Request::VolumeCreate {
                kind: ferrovol_proto::codec::VOLUME_KIND_BLOCK,
                name,
                size,
                labels,
                source
            }
        ),
        (name(), name(), labels()).prop_map(|(name, source, labels)| Request::SnapshotCreate {
            name,
            source,
            labels
        }),
        name().prop_map(|name| Request::SnapshotDelete { name }),
        name().prop_map(|name| Request::SnapshotStat { name }),
        (proptest::option::of(name()), proptest::option::of(name()), 1u32..=256).prop_map(
            |(source, start_after, max_entries)| Request::SnapshotList { source, start_after, max_entries }
        ),
        (name(), any::<bool>()).prop_map(|(name, force)| Request::VolumeDelete { name, force }),
        name().prop_map(|name| Request::VolumeStat { name }),
        (proptest::option::of(name()), 1u32..=256)
            .prop_map(|(s, m)| Request::VolumeList { start_after: s, max_entries: m }),
        (name(), any::<u64>()).prop_map(|(name, size)| Request::VolumeResize { name, size }),
        (name(), node(), any::<bool>()).prop_map(|(name, node, force)| Request::AttachSet {
            name,
            node,
            force
        }),
        Just(Request::StoreStat),
        Just(Request::Ping),
        node().prop_map(|node| Request::NodeRegister { node }),
        node().prop_map(|node| Request::NodeStat { node }),
        node().prop_map(|node| Request::NodeReset { node }),
        (name(), node(), any::<u64>()).prop_map(|(name, node, generation)| Request::AttachClear {
            name,
            node,
            generation
        }),
        name().prop_map(|name| Request::Open { name, read_only: true, generation: 0 }),
        (name(), any::<u64>()).prop_map(|(name, generation)| Request::Open {
            name,
            read_only: false,
            generation
        }),
        handle().prop_map(|handle| Request::Close { handle }),
        handle().prop_map(|handle| Request::Flush { handle }),
        (handle(), any::<u64>(), 0u32..=limits::READ_LEN_MAX)
            .prop_map(|(handle, offset, len)| Request::Read { handle, offset, len }),
        (handle(), any::<u64>(), any::<u32>()).prop_map(|(handle, offset, len)| Request::Trim {
            handle,
            offset,
            len
        }),
        (handle(), any::<u64>(), any::<u32>(), any::<bool>())
            .prop_map(|(handle, offset, len, fua)| Request::WriteZeroes { handle, offset, len, fua }),
        (handle(), any::<u64>(), proptest::collection::vec(any::<u8>(), 0..5000), any::<bool>()).prop_map(
            |(handle, offset, d, fua)| Request::Write { handle, offset, data: Bytes::from(d), fua }
        ),
    ]
}

fn volume_info() -> impl Strategy<Value = VolumeInfo> {
    (
        name(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        proptest::option::of(node()),
        any::<u64>(),
        labels(),
    )
        .prop_map(
            |(name, size, allocated, created_unix_ms, generation, owner, attached_unix_ms, labels)| {
                VolumeInfo {
                    name,
                    kind: 0,
                    size,
                    allocated,
                    created_unix_ms,
                    generation,
                    owner,
                    attached_unix_ms,
                    labels,
                }
            },
        )
}

/// Every successful reply, with the opcode it answers.
fn reply() -> impl Strategy<Value = (Opcode, Reply)> {
    prop_oneof![
        (any::<u8>(), any::<u8>(), any::<u64>(), any::<(u32, u32, u32)>(), "[ -~]{0,128}", "[ -~]{0,64}")
            .prop_map(|(version, session_flags, features, (r, b, p), server_id, credential)| {
                (
                    Opcode::Hello,
                    Reply::Hello(HelloReply {
                        version,
                        session_flags,
                        features,
                        in_flight_requests_max: r,
                        in_flight_bytes_max: b,
                        payload_len_max: p,
                        server_id,
                        credential,
                    }),
                )
            }),
        prop_oneof![
            Just(Opcode::VolumeDelete),
            Just(Opcode::SnapshotDelete),
            Just(Opcode::Ping),
            Just(Opcode::NodeReset),
            Just(Opcode::AttachClear),
            Just(Opcode::Close),
            Just(Opcode::Write),
            Just(Opcode::Flush),
            Just(Opcode::Trim),
            Just(Opcode::WriteZeroes)
        ]
        .prop_map(|op| (op, Reply::Done)),
        (
            prop_oneof![Just(Opcode::VolumeCreate), Just(Opcode::VolumeStat), Just(Opcode::VolumeResize)],
            volume_info()
        )
            .prop_map(|(op, v)| (op, Reply::Volume(v))),
        (proptest::collection::vec(volume_info(), 0..5), any::<bool>())
            .prop_map(|(entries, more)| (Opcode::VolumeList, Reply::List { entries, more })),
        any::<u64>().prop_map(|generation| (Opcode::AttachSet, Reply::Attached { generation })),
        (prop_oneof![Just(Opcode::SnapshotCreate), Just(Opcode::SnapshotStat)], snapshot_info())
            .prop_map(|(op, v)| (op, Reply::Snapshot(v))),
        (proptest::collection::vec(snapshot_info(), 0..4), any::<bool>())
            .prop_map(|(entries, more)| (Opcode::SnapshotList, Reply::SnapshotList { entries, more })),
        any::<[u64; 4]>().prop_map(|[t, f, p, v]| {
            (
                Opcode::StoreStat,
                Reply::StoreStat(StoreStat {
                    total_bytes: t,
                    free_bytes: f,
                    provisioned_bytes: p,
                    volumes: v,
                }),
            )
        }),
        (prop_oneof![Just(Opcode::NodeRegister), Just(Opcode::NodeStat)], any::<u64>())
            .prop_map(|(op, registered_unix_ms)| (op, Reply::Node { registered_unix_ms })),
        (handle(), any::<u64>(), any::<bool>())
            .prop_map(|(handle, size, read_only)| (Opcode::Open, Reply::Opened { handle, size, read_only })),
        proptest::collection::vec(any::<u8>(), 0..5000)
            .prop_map(|d| (Opcode::Read, Reply::Data(Bytes::from(d)))),
    ]
}

proptest! {
    #[test]
    fn replies_round_trip(replies in proptest::collection::vec((any::<u64>(), reply()), 1..6), chunk in 1usize..200) {
        let sent: Vec<Response> =
            replies.into_iter().map(|(id, (op, reply))| Response::ok(RequestId(id), op, reply)).collect();
        let mut stream = BytesMut::new();
        for r in &sent {
            r.encode().write_to(&mut stream);
        }
        let mut buf = BytesMut::new();
        let mut out = vec![];
        for piece in stream.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(raw) = split_response(&mut buf).unwrap() {
                out.push(Response::parse(raw).unwrap());
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(out, sent);
    }

    #[test]
    fn requests_round_trip(reqs in proptest::collection::vec((any::<u64>(), request()), 1..8), chunk in 1usize..200) {
        let mut stream = BytesMut::new();
        for (id, r) in &reqs {
            r.encode(RequestId(*id)).write_to(&mut stream);
        }
        // Feed the stream in chunks, as a socket would.
        let mut buf = BytesMut::new();
        let mut out = vec![];
        for piece in stream.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(raw) = split_request(&mut buf).unwrap() {
                out.push(Request::parse(raw).unwrap());
            }
        }
        prop_assert!(buf.is_empty());
        let expected: Vec<_> = reqs.into_iter().map(|(id, r)| (RequestId(id), r)).collect();
        prop_assert_eq!(out, expected);
    }

    #[test]
    fn error_responses_round_trip(id in any::<u64>(), op in any::<u8>(), msg in "[ -~]{0,200}", st in 1usize..opcode::Status::ALL.len()) {
        let status = opcode::Status::ALL[st];
        let resp = Response::error(RequestId(id), op, status, msg);
        let mut buf = BytesMut::new();
        resp.encode().write_to(&mut buf);
        let back = Response::parse(split_response(&mut buf).unwrap().unwrap()).unwrap();
        prop_assert_eq!(back, resp);
    }

    #[test]
    fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2000), chunk in 1usize..300) {
        fuzzing::decode_streams(&data, chunk);
    }

    #[test]
    fn mutated_frames_never_panic(req in request(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
        let mut bytes = req.encode(RequestId(1)).to_bytes().to_vec();
        for (at, x) in flips {
            let n = bytes.len();
            bytes[at % n] ^= x;
        }
        fuzzing::decode_streams(&bytes, bytes.len());
    }
}

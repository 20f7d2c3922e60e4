//! Codec micro-benchmarks: encode and decode of the frames on the hot path. The payload CRC dominates
//! for large frames; the header work is what remains for 4 KiB.
#![allow(clippy::unwrap_used)]

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferrovol_proto::codec::{split_request, split_response};
use ferrovol_proto::*;

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    for size in [4096usize, 1 << 20] {
        let data = Bytes::from(ferrovol_benches::pattern(1, size));
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("encode_write", size), &data, |b, data| {
            b.iter(|| {
                Request::Write { handle: VolumeHandle(1), offset: 4096, data: data.clone(), fua: false }
                    .encode(RequestId(1))
            })
        });
        let wire = Request::Write { handle: VolumeHandle(1), offset: 4096, data: data.clone(), fua: false }
            .encode(RequestId(1))
            .to_bytes();
        g.bench_with_input(BenchmarkId::new("decode_write", size), &wire, |b, wire| {
            b.iter(|| {
                let mut buf = BytesMut::from(&wire[..]);
                Request::parse(split_request(&mut buf).unwrap().unwrap()).unwrap()
            })
        });
        let reply = Response::ok(RequestId(1), Opcode::Read, Reply::Data(data.clone())).encode().to_bytes();
        g.bench_with_input(BenchmarkId::new("decode_read_reply", size), &reply, |b, reply| {
            b.iter(|| {
                let mut buf = BytesMut::from(&reply[..]);
                Response::parse(split_response(&mut buf).unwrap().unwrap()).unwrap()
            })
        });
    }
    g.finish();
    c.bench_function("codec/encode_read_request", |b| {
        b.iter(|| Request::Read { handle: VolumeHandle(1), offset: 1 << 30, len: 4096 }.encode(RequestId(7)))
    });
}

criterion_group!(benches, codec);
criterion_main!(benches);

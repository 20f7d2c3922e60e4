//! The in-process read/write path: client library -> TCP 127.0.0.1 -> server -> volume on a temp dir,
//! one request at a time (latency) and 32 in flight (throughput). End-to-end numbers against peers come
//! from `scripts/compare_nbd.py`; this bench is for quick A/B checks of a change.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferrovol_client::{ConnectOptions, Session};
use ferrovol_server::{Server, ServerConfig};

fn data_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).unwrap();
    let vol = rt.block_on(async {
        let server =
            Server::bind(ServerConfig::new(dir.path(), "127.0.0.1:0".parse().unwrap())).await.unwrap();
        let addr = server.local_addr().unwrap().to_string();
        tokio::spawn(server.run(std::future::pending()));
        let s = Session::connect(&addr, ConnectOptions::default()).await.unwrap();
        let name = "bench".parse().unwrap();
        s.create_volume(&name, 256 << 20).await.unwrap();
        s.open(&name, false).await.unwrap()
    });
    let block = Bytes::from(ferrovol_benches::pattern(3, 4096));
    let mut g = c.benchmark_group("data_path");
    g.measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(1));
    g.bench_function("write_4k_qd1", |b| b.to_async(&rt).iter(|| vol.write_at(8192, block.clone())));
    g.bench_function("read_4k_qd1", |b| b.to_async(&rt).iter(|| vol.read_at(8192, 4096)));
    g.throughput(Throughput::Elements(32));
    g.bench_function("read_4k_qd32", |b| {
        b.to_async(&rt).iter(|| {
            let futs = (0..32u64).map(|i| vol.read_at(i * 4096, 4096));
            futures::future::join_all(futs)
        })
    });
    let big = Bytes::from(ferrovol_benches::pattern(4, 1 << 20));
    g.throughput(Throughput::Bytes(1 << 20));
    g.bench_function("write_1m_qd1", |b| b.to_async(&rt).iter(|| vol.write_at(1 << 20, big.clone())));
    g.bench_function("read_1m_qd1", |b| b.to_async(&rt).iter(|| vol.read_at(1 << 20, 1 << 20)));
    g.finish();
}

criterion_group!(benches, data_path);
criterion_main!(benches);

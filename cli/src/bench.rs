// Measurement arithmetic: counts, block sizes and latencies far below the narrowing limits.
#![allow(clippy::cast_possible_truncation)]
//! The raw-protocol throughput harness behind `ferrovol bench raw`: fio-like jobs driven straight
//! through the client library (no FUSE, no kernel block layer), to measure the protocol and server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use ferrovol_client::{ClientError, Result, Volume};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// 1 MiB sequential reads.
    SeqRead,
    /// 1 MiB sequential writes.
    SeqWrite,
    /// 4 KiB random reads.
    RandRead,
    /// 4 KiB random writes.
    RandWrite,
}

impl Workload {
    /// The name as the flag spells it (`rand-read`).
    pub fn name(self) -> &'static str {
        match self {
            Workload::SeqRead => "seq-read",
            Workload::SeqWrite => "seq-write",
            Workload::RandRead => "rand-read",
            Workload::RandWrite => "rand-write",
        }
    }

    pub fn block_size(self) -> u64 {
        match self {
            Workload::SeqRead | Workload::SeqWrite => 1 << 20,
            Workload::RandRead | Workload::RandWrite => 4096,
        }
    }
    pub fn is_write(self) -> bool {
        matches!(self, Workload::SeqWrite | Workload::RandWrite)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub workload: Workload,
    pub queue_depth: usize,
    pub block_size: u64,
    pub ops: u64,
    pub seconds: f64,
    pub iops: f64,
    pub mib_per_s: f64,
    pub lat_p50_us: f64,
    pub lat_p99_us: f64,
}

/// Writes the first `span` bytes once (1 MiB writes, 8 in flight), so reads hit allocated data.
pub async fn prefill(vol: &Volume, span: u64) -> Result<()> {
    let bs: u64 = 1 << 20;
    let span = span.min(vol.size());
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let pattern: Bytes = (0..bs).map(|_| rng.gen::<u8>()).collect::<Vec<u8>>().into();
    let offsets: Vec<u64> = (0..span).step_by(bs as usize).collect();
    for chunk in offsets.chunks(8) {
        let futs = chunk.iter().map(|&off| {
            let n = (span - off).min(bs) as usize;
            vol.write_at(off, pattern.slice(..n))
        });
        futures::future::try_join_all(futs).await?;
    }
    vol.flush().await
}

/// Runs `workload` with `queue_depth` requests in flight for `runtime` over the first `span` bytes.
pub async fn run(
    vol: &Volume,
    workload: Workload,
    queue_depth: usize,
    runtime: Duration,
    span: u64,
) -> Result<BenchResult> {
    let bs = workload.block_size();
    let span = span.min(vol.size()) / bs * bs;
    let blocks = (span / bs).max(1);
    let mut seed_rng = rand::rngs::StdRng::seed_from_u64(42);
    let pattern: Bytes = (0..bs).map(|_| seed_rng.gen::<u8>()).collect::<Vec<u8>>().into();
    let next_seq = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + runtime;
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(queue_depth);
    for worker in 0..queue_depth.max(1) {
        let vol = vol.clone();
        let pattern = pattern.clone();
        let next_seq = next_seq.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(worker as u64 + 1);
            let mut lats: Vec<u32> = Vec::with_capacity(1 << 16);
            while Instant::now() < deadline {
                let block = match workload {
                    Workload::SeqRead | Workload::SeqWrite => {
                        next_seq.fetch_add(1, Ordering::Relaxed) % blocks
                    }
                    _ => rng.gen_range(0..blocks),
                };
                let offset = block * bs;
                let t = Instant::now();
                if workload.is_write() {
                    vol.write_at(offset, pattern.clone()).await?;
                } else {
                    // The parts as they came off the socket, as fio's nbd engine reads into its
                    // buffer: no user-space copy on either side.
                    let parts = vol.read_at_parts(offset, bs as usize).await?;
                    std::hint::black_box(&parts);
                }
                lats.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
            }
            Ok::<_, ClientError>(lats)
        }));
    }
    let mut lats = Vec::new();
    for t in tasks {
        match t.await {
            Ok(r) => lats.extend(r?),
            Err(e) => return Err(ClientError::Protocol(format!("bench task failed: {e}"))),
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    lats.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lats.is_empty() {
            0.0
        } else {
            f64::from(lats[((lats.len() - 1) as f64 * p) as usize])
        }
    };
    let ops = lats.len() as u64;
    Ok(BenchResult {
        workload,
        queue_depth,
        block_size: bs,
        ops,
        seconds,
        iops: ops as f64 / seconds,
        mib_per_s: (ops * bs) as f64 / seconds / (1 << 20) as f64,
        lat_p50_us: pct(0.5),
        lat_p99_us: pct(0.99),
    })
}

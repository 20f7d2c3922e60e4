//! The bounded fuzz run CI does on stable: the cargo-fuzz harness (`ferrovol_proto::fuzzing`) fed with
//! random and mutated-valid inputs for a fixed number of iterations (override with FERROVOL_FUZZ_ITERS).
//! The coverage-guided run is `cargo +nightly fuzz run decode` in `fuzz/`.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // tests: a panic is a failure

use bytes::Bytes;
use ferrovol_proto::*;
use rand::{Rng, SeedableRng};

#[test]
fn bounded_decoder_fuzz() {
    let iters: u64 =
        std::env::var("FERROVOL_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let seed: u64 = std::env::var("FERROVOL_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let seeds: Vec<Vec<u8>> = vec![
        Request::Read { handle: VolumeHandle(1), offset: 4096, len: 4096 }
            .encode(RequestId(1))
            .to_bytes()
            .to_vec(),
        Request::Write { handle: VolumeHandle(1), offset: 0, data: Bytes::from(vec![9u8; 300]), fua: true }
            .encode(RequestId(2))
            .to_bytes()
            .to_vec(),
        Request::VolumeCreate {
            kind: ferrovol_proto::codec::VOLUME_KIND_BLOCK,
            name: VolumeName::try_from("abc").unwrap(),
            size: 1 << 20,
            labels: Labels::new(),
            source: None,
        }
        .encode(RequestId(3))
        .to_bytes()
        .to_vec(),
        Response::error(RequestId(4), 0x23, Status::Fenced, "x").encode().to_bytes().to_vec(),
        Response::ok(RequestId(5), Opcode::Read, Reply::Data(Bytes::from_static(b"abc")))
            .encode()
            .to_bytes()
            .to_vec(),
    ];
    for i in 0..iters {
        let data: Vec<u8> = if i % 3 == 0 {
            let n = rng.gen_range(0..256);
            (0..n).map(|_| rng.gen()).collect()
        } else {
            // Mutate a valid frame, optionally fixing up the header CRC so the mutation reaches the parser.
            let mut d = seeds[rng.gen_range(0..seeds.len())].clone();
            for _ in 0..rng.gen_range(1..4) {
                let at = rng.gen_range(0..d.len());
                d[at] = rng.gen();
            }
            if rng.gen_bool(0.7) && d.len() >= 48 && &d[..4] == b"FVRQ" {
                let c = crc32fast::hash(&d[..44]).to_le_bytes();
                d[44..48].copy_from_slice(&c);
            }
            if rng.gen_bool(0.3) {
                let cut = rng.gen_range(0..=d.len());
                d.truncate(cut);
            }
            d
        };
        let chunk = rng.gen_range(1..64);
        ferrovol_proto::fuzzing::decode_streams(&data, chunk);
    }
}

//! Coverage-guided fuzzing of both decoders: `cargo +nightly fuzz run decode` (from `fuzz/`).
//! The same harness runs on stable, bounded, in `proto/tests/fuzz_bounded.rs` (CI).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunking, so the fuzzer also explores frames split across reads.
    let (chunk, rest) = match data.split_first() {
        Some((c, rest)) => (usize::from(*c).max(1), rest),
        None => (1, data),
    };
    ferrovol_proto::fuzzing::decode_streams(rest, chunk);
});

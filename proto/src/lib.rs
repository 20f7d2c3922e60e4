//! `ferrovol-proto`: the ferrovol wire protocol.
//!
//! Pure code: frame headers ([`header`]), opcodes and status codes ([`opcode`]), the limits every
//! length from the wire is checked against ([`limits`]), validated domain types ([`types`]) and the codec
//! between `BytesMut` and typed messages ([`codec`]). No sockets; see `PROTOCOL.md` for the byte layout.
//! The one exception is the optional [`io`] module (feature `io`): socket helpers the server and the
//! client share.

pub mod codec;
pub mod fs;
pub mod header;
#[cfg(feature = "io")]
pub mod io;
pub mod limits;
pub mod opcode;
pub mod secret;
#[cfg(feature = "io")]
pub mod tls;
pub mod types;

#[cfg(feature = "metrics")]
pub mod metrics;
/// The CSI spec's services and messages (package `csi.v1`), generated from `csi/csi.proto` at build
/// time by a pure-Rust protobuf compiler.
#[cfg(feature = "csi")]
#[allow(missing_docs, missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod csi {
    tonic::include_proto!("csi.v1");
}

pub use codec::{
    split_request, split_response, ErrorReply, Frame, FrameError, Hello, HelloReply, RawRequest, RawResponse,
    Reply, Request, RequestError, RequestFrame, Response, ResponseError, ResponseFrame, SnapshotInfo,
    StoreStat, VolumeInfo, VolumeSource,
};
pub use header::{RequestHeader, ResponseHeader, REQUEST_HEADER_LEN, RESPONSE_HEADER_LEN};
pub use opcode::{Opcode, Status};
pub use types::{
    format_unix_ms, validate_labels, Labels, NameError, NodeId, RequestId, VolumeHandle, VolumeName,
};

/// Parses a size the way Kubernetes writes quantities, which is what the CSI users of this project
/// live by: `k M G T P E` are powers of 1000, `Ki Mi Gi Ti Pi Ei` (also written `KiB`, `MiB`...)
/// powers of 1024, a plain number is bytes; `1.5Gi` is allowed where it is a whole number of bytes.
/// Units are case-sensitive. Not taken from Kubernetes: exponents (`1e9`) and signs. What could mean either (`10GB`, `10gb`, `10K`), or means something
/// else in Kubernetes (`m`: milli), or is malformed, is refused with a message that repeats what was
/// typed and says what to write instead.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() || num == "." {
        return Err(format!("size {s:?} does not start with a number"));
    }
    if unit.starts_with(char::is_whitespace) {
        let joined = format!("{num}{}", unit.trim());
        return Err(match parse_size(&joined) {
            Ok(_) => format!("size {s:?}: write the unit right after the number, without a space ({joined})"),
            Err(e) => format!("size {s:?}: write the unit right after the number, without a space; and {e}"),
        });
    }
    let (base, power): (u128, u32) = match unit {
        "" | "B" => (1, 0),
        "k" => (1000, 1),
        "M" => (1000, 2),
        "G" => (1000, 3),
        "T" => (1000, 4),
        "P" => (1000, 5),
        "E" => (1000, 6),
        "Ki" | "KiB" => (1024, 1),
        "Mi" | "MiB" => (1024, 2),
        "Gi" | "GiB" => (1024, 3),
        "Ti" | "TiB" => (1024, 4),
        "Pi" | "PiB" => (1024, 5),
        "Ei" | "EiB" => (1024, 6),
        _ => return Err(unit_error(s, num, unit)),
    };
    let mult = base.pow(power);
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if frac.contains('.') || (num.contains('.') && frac.is_empty()) {
        return Err(format!("size {s:?} is not a number"));
    }
    if frac.len() > 18 {
        return Err(format!("size {s:?} has too many decimals"));
    }
    let too_large = || format!("size {s:?} is too large");
    let int_v: u128 = if int.is_empty() { 0 } else { int.parse().map_err(|_| too_large())? };
    let scale = 10u128.pow(u32::try_from(frac.len()).unwrap_or(18));
    let frac_v: u128 = if frac.is_empty() { 0 } else { frac.parse().map_err(|_| too_large())? };
    let frac_bytes = frac_v.checked_mul(mult).ok_or_else(too_large)?;
    if frac_bytes % scale != 0 {
        return Err(format!("size {s:?} is not a whole number of bytes"));
    }
    let bytes =
        int_v.checked_mul(mult).and_then(|v| v.checked_add(frac_bytes / scale)).ok_or_else(too_large)?;
    u64::try_from(bytes).map_err(|_| too_large())
}

/// Why `unit` (after `num`) is not a unit, with what to write instead.
fn unit_error(s: &str, num: &str, unit: &str) -> String {
    let lower = unit.to_ascii_lowercase();
    let letter = lower.chars().next().filter(|c| "kmgtpe".contains(*c));
    match (letter, lower.get(1..).unwrap_or("")) {
        (Some('m'), "") if unit == "m" => format!(
            "size {s:?}: \"m\" is milli in Kubernetes quantities; write {num}M (10^6 bytes) or {num}Mi (2^20 bytes)"
        ),
        (Some(c), "" | "b") => {
            let dec = if c == 'k' { "k".to_owned() } else { c.to_ascii_uppercase().to_string() };
            let bin = format!("{}i", c.to_ascii_uppercase());
            let power = "kmgtpe".find(c).map_or(1, |i| i + 1);
            format!(
                "size {s:?} is ambiguous: write {num}{dec} for 10^{} bytes or {num}{bin} for 2^{} bytes",
                3 * power,
                10 * power
            )
        }
        (Some(c), "i" | "ib") => format!(
            "size {s:?}: units are case-sensitive; write {num}{}i",
            c.to_ascii_uppercase()
        ),
        _ => format!(
            "size {s:?} has an unknown unit {unit:?} (k, M, G, T, P, E are powers of 1000; Ki, Mi, Gi, Ti, \
             Pi, Ei powers of 1024; a plain number is bytes)"
        ),
    }
}

/// Formats bytes with a binary unit, e.g. `1.5 GiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else if (v - v.round()).abs() < 0.005 {
        format!("{v:.0} {}", UNITS[i])
    } else {
        format!("{v:.2} {}", UNITS[i])
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    /// The size grammar: each input, and the value or the exact error it gets.
    #[test]
    fn sizes() {
        let table: &[(&str, Result<u64, &str>)] = &[
            ("4096", Ok(4096)),
            ("4096B", Ok(4096)),
            (" 64Mi ", Ok(64 << 20)),
            ("64MiB", Ok(64 << 20)),
            ("64M", Ok(64_000_000)),
            ("1G", Ok(1_000_000_000)),
            ("1Gi", Ok(1 << 30)),
            ("10k", Ok(10_000)),
            ("10Ki", Ok(10 << 10)),
            ("1.5Gi", Ok(3 << 29)),
            ("0.5k", Ok(500)),
            ("2Ti", Ok(2 << 40)),
            ("2T", Ok(2_000_000_000_000)),
            ("1Pi", Ok(1 << 50)),
            ("1E", Ok(1_000_000_000_000_000_000)),
            ("", Err("size \"\" does not start with a number")),
            ("Mi", Err("size \"Mi\" does not start with a number")),
            ("10 Gi", Err("size \"10 Gi\": write the unit right after the number, without a space (10Gi)")),
            (
                "10 GB",
                Err("size \"10 GB\": write the unit right after the number, without a space; and size \"10GB\" is ambiguous: write 10G for 10^9 bytes or 10Gi for 2^30 bytes"),
            ),
            ("1.0000000000000000000Gi", Err("size \"1.0000000000000000000Gi\" has too many decimals")),
            ("10GB", Err("size \"10GB\" is ambiguous: write 10G for 10^9 bytes or 10Gi for 2^30 bytes")),
            ("10gb", Err("size \"10gb\" is ambiguous: write 10G for 10^9 bytes or 10Gi for 2^30 bytes")),
            ("10g", Err("size \"10g\" is ambiguous: write 10G for 10^9 bytes or 10Gi for 2^30 bytes")),
            ("10K", Err("size \"10K\" is ambiguous: write 10k for 10^3 bytes or 10Ki for 2^10 bytes")),
            ("10KB", Err("size \"10KB\" is ambiguous: write 10k for 10^3 bytes or 10Ki for 2^10 bytes")),
            ("10gi", Err("size \"10gi\": units are case-sensitive; write 10Gi")),
            ("10gib", Err("size \"10gib\": units are case-sensitive; write 10Gi")),
            (
                "10m",
                Err("size \"10m\": \"m\" is milli in Kubernetes quantities; write 10M (10^6 bytes) or 10Mi (2^20 bytes)"),
            ),
            (
                "12XB",
                Err("size \"12XB\" has an unknown unit \"XB\" (k, M, G, T, P, E are powers of 1000; Ki, Mi, Gi, Ti, Pi, Ei powers of 1024; a plain number is bytes)"),
            ),
            ("1.5", Err("size \"1.5\" is not a whole number of bytes")),
            ("1.2.3G", Err("size \"1.2.3G\" is not a number")),
            ("1.G", Err("size \"1.G\" is not a number")),
            ("99999999999999999999999Pi", Err("size \"99999999999999999999999Pi\" is too large")),
            ("16Ei", Err("size \"16Ei\" is too large")),
        ];
        for (input, want) in table {
            assert_eq!(parse_size(input), want.map_err(str::to_owned), "input {input:?}");
        }
        assert_eq!(format_size(1 << 30), "1 GiB");
        assert_eq!(format_size(1536), "1.50 KiB");
        assert_eq!(format_size(12), "12 B");
    }
}

/// The decoder harness shared by the cargo-fuzz targets (`fuzz/`) and the bounded randomized test
/// that CI runs: feed arbitrary bytes, in arbitrary chunks, through both decoders. It must never panic,
/// never allocate beyond the limits, and never loop without consuming input.
pub mod fuzzing {
    use bytes::BytesMut;

    use crate::codec::{split_request, split_response, Request, Response};
    use crate::limits::PAYLOAD_LEN_MAX;

    /// Decodes `data` as a request stream and as a response stream, fed in chunks of `chunk` bytes.
    pub fn decode_streams(data: &[u8], chunk: usize) {
        let chunk = chunk.max(1);
        let mut req_buf = BytesMut::new();
        let mut resp_buf = BytesMut::new();
        let mut req_dead = false;
        let mut resp_dead = false;
        for piece in data.chunks(chunk) {
            if !req_dead {
                req_buf.extend_from_slice(piece);
                loop {
                    match split_request(&mut req_buf) {
                        Ok(Some(raw)) => {
                            if let Ok((_, req)) = Request::parse(raw) {
                                // Whatever parses must re-encode and parse back to the same request.
                                let mut again = BytesMut::new();
                                req.encode(crate::RequestId(7)).write_to(&mut again);
                                let raw2 = split_request(&mut again).ok().flatten();
                                let back = raw2.and_then(|r| Request::parse(r).ok()).map(|(_, r)| r);
                                assert_eq!(back.as_ref(), Some(&req), "request re-encoding differs");
                            }
                        }
                        Ok(None) => break,
                        Err(_) => {
                            req_dead = true;
                            break;
                        }
                    }
                }
                assert!(req_buf.capacity() <= 2 * (PAYLOAD_LEN_MAX as usize + 4096) + data.len());
            }
            if !resp_dead {
                resp_buf.extend_from_slice(piece);
                loop {
                    match split_response(&mut resp_buf) {
                        Ok(Some(raw)) => {
                            let _ = Response::parse(raw);
                        }
                        Ok(None) => break,
                        Err(_) => {
                            resp_dead = true;
                            break;
                        }
                    }
                }
            }
        }
    }
}

//! `ferrovol-proto`: the ferrovol wire protocol.
//!
//! Pure code: frame headers ([`header`]), opcodes and status codes ([`opcode`]), the limits every
//! length from the wire is checked against ([`limits`]), validated domain types ([`types`]) and the codec
//! between `BytesMut` and typed messages ([`codec`]). No sockets; see `PROTOCOL.md` for the byte layout.
//! The one exception is the optional [`io`] module (feature `io`): socket helpers the server and the
//! client share.

pub mod codec;
pub mod header;
#[cfg(feature = "io")]
pub mod io;
pub mod limits;
pub mod opcode;
pub mod secret;
#[cfg(feature = "io")]
pub mod tls;
pub mod types;

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

/// Parses a size such as `64MiB`, `1G`, `4096`, `1.5GiB`. `K/M/G/T/P` and `KiB/MiB/...` are both powers
/// of 1024 (block-device convention, like `truncate -s`); a trailing `B` is optional.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("size {s:?} does not start with a number"));
    }
    let unit_l = unit.trim().to_ascii_lowercase();
    let shift = match unit_l.as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        _ => return Err(format!("size {s:?} has an unknown unit {unit:?} (use K, M, G, T, KiB, MiB, ...)")),
    };
    let mult = 1u128 << shift;
    let bytes: u128 = if let Some((int, frac)) = num.split_once('.') {
        let int: u128 =
            if int.is_empty() { 0 } else { int.parse().map_err(|_| format!("bad size {s:?}"))? };
        if frac.is_empty() || frac.len() > 9 || frac.contains('.') {
            return Err(format!("bad size {s:?}"));
        }
        let frac_v: u128 = frac.parse().map_err(|_| format!("bad size {s:?}"))?;
        let scale = 10u128.pow(u32::try_from(frac.len()).unwrap_or(9));
        int.checked_mul(mult)
            .and_then(|v| v.checked_add(frac_v * mult / scale))
            .ok_or_else(|| format!("size {s:?} is too large"))?
    } else {
        let n: u128 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
        n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"))?
    };
    u64::try_from(bytes).map_err(|_| format!("size {s:?} is too large"))
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

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1gib"), Ok(1 << 30));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert!(parse_size("").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("99999999999999999999999P").is_err());
        assert!(parse_size("1.2.3G").is_err());
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

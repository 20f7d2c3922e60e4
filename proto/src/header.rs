//! Fixed-size frame headers, byte by byte (see `proto/PROTOCOL.md`). All integers little-endian.
//!
//! Request header, 48 bytes:
//! ```text
//!  0  magic        [u8; 4]  "FVRQ"
//!  4  version      u8       protocol version the frame is encoded in (1)
//!  5  opcode       u8
//!  6  flags        u16      FLAG_FUA, FLAG_READ_ONLY
//!  8  request_id   u64
//! 16  handle       u32      volume handle (data opcodes), else 0
//! 20  length       u32      I/O length (READ, TRIM, WRITE_ZEROES; WRITE: = payload_len), else 0
//! 24  offset       u64      byte offset in the volume (data opcodes), else 0
//! 32  payload_len  u32
//! 36  payload_crc  u32      CRC32 (IEEE, crc32fast) of the payload; 0 for an empty payload
//! 40  reserved     u32      must be 0
//! 44  header_crc   u32      CRC32 of bytes 0..44
//! ```
//! Response header, 32 bytes:
//! ```text
//!  0  magic        [u8; 4]  "FVRS"
//!  4  version      u8
//!  5  opcode       u8       echo of the request's opcode (0 if the request could not be read)
//!  6  status       u16      0 = ok, else an error code; the payload is then a UTF-8 message
//!  8  request_id   u64      echo (0 if the request header could not be trusted)
//! 16  payload_len  u32
//! 20  payload_crc  u32
//! 24  reserved     u32      must be 0
//! 28  header_crc   u32      CRC32 of bytes 0..28
//! ```

use crate::types::{RequestId, VolumeHandle};

pub const REQUEST_MAGIC: [u8; 4] = *b"FVRQ";
pub const RESPONSE_MAGIC: [u8; 4] = *b"FVRS";
pub const REQUEST_HEADER_LEN: usize = 48;
pub const RESPONSE_HEADER_LEN: usize = 32;

/// A header that cannot be trusted: the connection's framing is lost.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error("header checksum mismatch (header says {expected:#010x}, computed {actual:#010x})")]
    Checksum { expected: u32, actual: u32 },
    #[error("reserved header field is not zero")]
    Reserved,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestHeader {
    pub version: u8,
    pub opcode: u8,
    pub flags: u16,
    pub request_id: RequestId,
    pub handle: VolumeHandle,
    pub length: u32,
    pub offset: u64,
    pub payload_len: u32,
    pub payload_crc: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResponseHeader {
    pub version: u8,
    pub opcode: u8,
    pub status: u16,
    pub request_id: RequestId,
    pub payload_len: u32,
    pub payload_crc: u32,
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn check_magic_and_crc(b: &[u8], magic: [u8; 4]) -> Result<(), HeaderError> {
    let got = [b[0], b[1], b[2], b[3]];
    if got != magic {
        return Err(HeaderError::BadMagic(got));
    }
    let n = b.len();
    let expected = le_u32(b, n - 4);
    let actual = crc32fast::hash(&b[..n - 4]);
    if expected != actual {
        return Err(HeaderError::Checksum { expected, actual });
    }
    if le_u32(b, n - 8) != 0 {
        return Err(HeaderError::Reserved);
    }
    Ok(())
}

impl RequestHeader {
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC);
        b[4] = self.version;
        b[5] = self.opcode;
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.request_id.0.to_le_bytes());
        b[16..20].copy_from_slice(&self.handle.0.to_le_bytes());
        b[20..24].copy_from_slice(&self.length.to_le_bytes());
        b[24..32].copy_from_slice(&self.offset.to_le_bytes());
        b[32..36].copy_from_slice(&self.payload_len.to_le_bytes());
        b[36..40].copy_from_slice(&self.payload_crc.to_le_bytes());
        // 40..44 reserved, zero.
        let crc = crc32fast::hash(&b[..44]);
        b[44..48].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, HeaderError> {
        check_magic_and_crc(b, REQUEST_MAGIC)?;
        Ok(Self {
            version: b[4],
            opcode: b[5],
            flags: le_u16(b, 6),
            request_id: RequestId(le_u64(b, 8)),
            handle: VolumeHandle(le_u32(b, 16)),
            length: le_u32(b, 20),
            offset: le_u64(b, 24),
            payload_len: le_u32(b, 32),
            payload_crc: le_u32(b, 36),
        })
    }
}

impl ResponseHeader {
    pub fn encode(&self) -> [u8; RESPONSE_HEADER_LEN] {
        let mut b = [0u8; RESPONSE_HEADER_LEN];
        b[0..4].copy_from_slice(&RESPONSE_MAGIC);
        b[4] = self.version;
        b[5] = self.opcode;
        b[6..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..16].copy_from_slice(&self.request_id.0.to_le_bytes());
        b[16..20].copy_from_slice(&self.payload_len.to_le_bytes());
        b[20..24].copy_from_slice(&self.payload_crc.to_le_bytes());
        // 24..28 reserved, zero.
        let crc = crc32fast::hash(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; RESPONSE_HEADER_LEN]) -> Result<Self, HeaderError> {
        check_magic_and_crc(b, RESPONSE_MAGIC)?;
        Ok(Self {
            version: b[4],
            opcode: b[5],
            status: le_u16(b, 6),
            request_id: RequestId(le_u64(b, 8)),
            payload_len: le_u32(b, 16),
            payload_crc: le_u32(b, 20),
        })
    }
}

/// CRC32 of a payload as carried in headers (0 for an empty payload, which is also crc32 of "").
pub fn payload_crc(payload: &[u8]) -> u32 {
    crc32fast::hash(payload)
}

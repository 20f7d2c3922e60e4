//! The codec: pure functions between `BytesMut` buffers and typed messages. No sockets here.
//!
//! Decoding is two steps, like mini-redis' `Frame::check` then `Frame::parse`:
//! 1. [`split_request`] / [`split_response`] check the fixed header (magic, header CRC, limits) and split
//!    one whole frame off the read buffer; the payload becomes a `Bytes` sharing the buffer's allocation
//!    (no copy). `Ok(None)` means "incomplete, read more". An `Err` means the framing is lost: answer
//!    and close the connection.
//! 2. [`Request::parse`] / [`Response::parse`] verify the payload CRC and convert the frame into a domain
//!    type (`TryFrom` at the edge). An `Err` here concerns one request only: answer it with the status
//!    and keep the connection.
//!
//! Encoding produces a [`Frame`]: a header array plus the payload `Bytes` (for WRITE requests and READ
//! replies, the caller's buffer itself), to be sent with one vectored write.

use std::io::IoSlice;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::fs::{self, Creds, FsOp, FsReply};
use crate::header::{
    payload_crc, HeaderError, RequestHeader, ResponseHeader, REQUEST_HEADER_LEN, RESPONSE_HEADER_LEN,
};
use crate::limits::*;
use crate::opcode::*;
use crate::types::{validate_labels, Labels, NameError, NodeId, RequestId, VolumeHandle, VolumeName};

/// Every FS opcode, as a pattern (the codec's matches name them all, so a new opcode is not
/// forgotten; their payloads are in `fs`).
macro_rules! fs_opcodes {
    () => {
        Opcode::FsLookup
            | Opcode::FsGetattr
            | Opcode::FsSetattr
            | Opcode::FsReaddir
            | Opcode::FsMkdir
            | Opcode::FsMknod
            | Opcode::FsCreate
            | Opcode::FsOpen
            | Opcode::FsRead
            | Opcode::FsWrite
            | Opcode::FsRelease
            | Opcode::FsFsync
            | Opcode::FsUnlink
            | Opcode::FsRmdir
            | Opcode::FsRename
            | Opcode::FsLink
            | Opcode::FsSymlink
            | Opcode::FsReadlink
            | Opcode::FsStatfs
            | Opcode::FsGetlk
            | Opcode::FsSetlk
            | Opcode::FsFlush
            | Opcode::FsFallocate
            | Opcode::FsLseek
            | Opcode::FsCopyRange
            | Opcode::FsGetxattr
            | Opcode::FsSetxattr
            | Opcode::FsListxattr
            | Opcode::FsRemovexattr
    };
}

/// The framing of the connection is lost; the only safe reaction is to close it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("protocol version {0} is not supported (this side speaks {PROTOCOL_VERSION_MIN}..={PROTOCOL_VERSION})")]
    UnsupportedVersion(u8),
    #[error("payload length {len} exceeds the limit {max} for request {request_id}")]
    PayloadTooLarge { request_id: RequestId, opcode: u8, len: u32, max: u32 },
}

impl FrameError {
    pub fn status(&self) -> Status {
        match self {
            FrameError::Header(_) => Status::BadRequest,
            FrameError::UnsupportedVersion(_) => Status::UnsupportedVersion,
            FrameError::PayloadTooLarge { .. } => Status::TooLarge,
        }
    }
}

/// One request could not be accepted; the connection stays usable. Answer with `status`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("request {request_id} (opcode {opcode:#04x}): {status}: {message}")]
pub struct RequestError {
    pub request_id: RequestId,
    pub opcode: u8,
    pub status: Status,
    pub message: String,
}

/// A response that does not make sense (the peer is broken or not a ferrovol server).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad response to request {request_id}: {message}")]
pub struct ResponseError {
    pub request_id: RequestId,
    /// The payload failed its CRC (damaged in transit: worth a retry), as opposed to a payload
    /// that arrived intact but makes no sense (a broken or foreign peer: not worth one).
    pub checksum: bool,
    pub message: String,
}

/// A frame split off the read buffer: header checked, payload not yet verified or parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame<H> {
    pub header: H,
    pub payload: Bytes,
}

pub type RawRequest = RawFrame<RequestHeader>;
pub type RawResponse = RawFrame<ResponseHeader>;

/// An encoded frame: `N` header bytes and the payload, ready for one vectored write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<const N: usize> {
    pub header: [u8; N],
    /// Payload bytes sent before `payload` (an FS_WRITE's fields before its data, so that the data
    /// is sent from the caller's buffer); usually empty.
    pub head: Bytes,
    pub payload: Bytes,
}

pub type RequestFrame = Frame<REQUEST_HEADER_LEN>;
pub type ResponseFrame = Frame<RESPONSE_HEADER_LEN>;

impl<const N: usize> Frame<N> {
    pub fn len(&self) -> usize {
        N + self.head.len() + self.payload.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The slices for a vectored write (the payload slice only if non-empty).
    pub fn io_slices(&self) -> impl Iterator<Item = IoSlice<'_>> {
        std::iter::once(IoSlice::new(&self.header))
            .chain((!self.head.is_empty()).then(|| IoSlice::new(&self.head)))
            .chain((!self.payload.is_empty()).then(|| IoSlice::new(&self.payload)))
    }

    /// Appends the frame to a buffer (a copy; for tests and small control frames).
    pub fn write_to(&self, dst: &mut BytesMut) {
        dst.reserve(self.len());
        dst.put_slice(&self.header);
        dst.put_slice(&self.head);
        dst.put_slice(&self.payload);
    }

    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.len());
        self.write_to(&mut b);
        b.freeze()
    }
}

/// The largest payload a request with this opcode byte may carry.
pub fn request_payload_len_max(opcode: u8) -> u32 {
    // FS_SETXATTR: a 64 KiB value and its fields do not fit the control limit (the value's own
    // limit is checked when it is parsed).
    if opcode == Opcode::Write as u8 || opcode == Opcode::FsWrite as u8 || opcode == Opcode::FsSetxattr as u8
    {
        PAYLOAD_LEN_MAX
    } else {
        CONTROL_PAYLOAD_LEN_MAX
    }
}

/// Splits one request frame off the front of `src`, or returns `Ok(None)` if it is not all there yet
/// (after reserving room for the rest, bounded by the limits).
pub fn split_request(src: &mut BytesMut) -> Result<Option<RawRequest>, FrameError> {
    split_request_within(src, PAYLOAD_LEN_MAX)
}

/// [`split_request`] with a lower payload limit: the server passes `HELLO_PAYLOAD_LEN_MAX` before a
/// peer has authenticated, so a header claiming megabytes makes it reserve nothing.
pub fn split_request_within(
    src: &mut BytesMut,
    payload_len_max: u32,
) -> Result<Option<RawRequest>, FrameError> {
    let Some(hdr_bytes) = src.get(..REQUEST_HEADER_LEN) else {
        return Ok(None);
    };
    let mut arr = [0u8; REQUEST_HEADER_LEN];
    arr.copy_from_slice(hdr_bytes);
    let header = RequestHeader::decode(&arr)?;
    if !(PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION).contains(&header.version) {
        return Err(FrameError::UnsupportedVersion(header.version));
    }
    let max = request_payload_len_max(header.opcode).min(payload_len_max);
    if header.payload_len > max {
        return Err(FrameError::PayloadTooLarge {
            request_id: header.request_id,
            opcode: header.opcode,
            len: header.payload_len,
            max,
        });
    }
    let total = REQUEST_HEADER_LEN + header.payload_len as usize;
    if src.len() < total {
        // Bounded: payload_len <= PAYLOAD_LEN_MAX was checked above.
        src.reserve(total - src.len());
        return Ok(None);
    }
    src.advance(REQUEST_HEADER_LEN);
    let payload = src.split_to(header.payload_len as usize).freeze();
    Ok(Some(RawFrame { header, payload }))
}

/// Splits one response frame off the front of `src` (client side).
pub fn split_response(src: &mut BytesMut) -> Result<Option<RawResponse>, FrameError> {
    let Some(hdr_bytes) = src.get(..RESPONSE_HEADER_LEN) else {
        return Ok(None);
    };
    let mut arr = [0u8; RESPONSE_HEADER_LEN];
    arr.copy_from_slice(hdr_bytes);
    let header = ResponseHeader::decode(&arr)?;
    if !(PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION).contains(&header.version) {
        return Err(FrameError::UnsupportedVersion(header.version));
    }
    if header.payload_len > PAYLOAD_LEN_MAX {
        return Err(FrameError::PayloadTooLarge {
            request_id: header.request_id,
            opcode: header.opcode,
            len: header.payload_len,
            max: PAYLOAD_LEN_MAX,
        });
    }
    let total = RESPONSE_HEADER_LEN + header.payload_len as usize;
    if src.len() < total {
        src.reserve(total - src.len());
        return Ok(None);
    }
    src.advance(RESPONSE_HEADER_LEN);
    let payload = src.split_to(header.payload_len as usize).freeze();
    Ok(Some(RawFrame { header, payload }))
}

// ---------------------------------------------------------------------------------------------------
// Payload field encoding: integers little-endian; `str8` = u8 length + UTF-8 bytes; `str16` = u16
// length + UTF-8 bytes.

/// Why a payload could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("payload truncated")]
    Truncated,
    #[error("{0} trailing bytes after the payload")]
    Trailing(usize),
    #[error("string field is not UTF-8")]
    Utf8,
    #[error("string field is {len} bytes, the limit is {max}")]
    TooLong { len: usize, max: usize },
    #[error("{0}")]
    Name(#[from] NameError),
    #[error("{0}")]
    Invalid(&'static str),
}

impl PayloadError {
    pub(crate) fn status(&self) -> Status {
        match self {
            PayloadError::Name(_) => Status::InvalidName,
            PayloadError::TooLong { .. } => Status::TooLarge,
            _ => Status::BadRequest,
        }
    }
}

/// A bounds-checked reader over a payload. Every getter fails instead of panicking.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], PayloadError> {
        if self.buf.len() < n {
            return Err(PayloadError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, PayloadError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, PayloadError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, PayloadError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, PayloadError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn str_of(&mut self, len: usize, max: usize) -> Result<&'a str, PayloadError> {
        if len > max {
            return Err(PayloadError::TooLong { len, max });
        }
        std::str::from_utf8(self.take(len)?).map_err(|_| PayloadError::Utf8)
    }
    fn str8(&mut self, max: usize) -> Result<&'a str, PayloadError> {
        let len = self.u8()? as usize;
        self.str_of(len, max)
    }
    fn str16(&mut self, max: usize) -> Result<&'a str, PayloadError> {
        let len = self.u16()? as usize;
        self.str_of(len, max)
    }
    fn volume_name(&mut self) -> Result<VolumeName, PayloadError> {
        Ok(VolumeName::try_from(self.str8(VOLUME_NAME_LEN_MAX)?)?)
    }
    fn node_id(&mut self) -> Result<NodeId, PayloadError> {
        Ok(NodeId::try_from(self.str8(NODE_ID_LEN_MAX)?)?)
    }
    fn labels(&mut self) -> Result<Labels, PayloadError> {
        let n = usize::from(self.u8()?);
        if n > LABELS_MAX {
            return Err(PayloadError::TooLong { len: n, max: LABELS_MAX });
        }
        let mut labels = Labels::new();
        for _ in 0..n {
            let k = self.str8(LABEL_KEY_LEN_MAX)?.to_owned();
            let v = self.str16(LABEL_VALUE_LEN_MAX)?.to_owned();
            if labels.insert(k, v).is_some() {
                return Err(PayloadError::Invalid("duplicate label key"));
            }
        }
        validate_labels(&labels)?;
        Ok(labels)
    }
    fn finish(self) -> Result<(), PayloadError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(PayloadError::Trailing(self.buf.len()))
        }
    }
}

/// Strings are bounded by their types' limits, all below 256 (str8) or 65536 (str16); a longer one
/// (a bug) is cut rather than written with a wrong length.
fn put_str8(dst: &mut BytesMut, s: &str) {
    debug_assert!(s.len() <= u8::MAX as usize);
    let len = u8::try_from(s.len()).unwrap_or(u8::MAX);
    dst.put_u8(len);
    dst.put_slice(&s.as_bytes()[..usize::from(len)]);
}

/// count u8, then count x (key str8, value str16); labels are validated before they are encoded.
fn put_labels(dst: &mut BytesMut, labels: &Labels) {
    dst.put_u8(u8::try_from(labels.len()).unwrap_or(u8::MAX));
    for (k, v) in labels.iter().take(usize::from(u8::MAX)) {
        put_str8(dst, k);
        put_str16(dst, v);
    }
}

fn put_str16(dst: &mut BytesMut, s: &str) {
    debug_assert!(s.len() <= u16::MAX as usize);
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    dst.put_u16_le(len);
    dst.put_slice(&s.as_bytes()[..usize::from(len)]);
}

// ---------------------------------------------------------------------------------------------------
// Requests

/// HELLO: the first request on every connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version_min: u8,
    pub version_max: u8,
    pub features: u64,
    /// The client's session: random, chosen once per client process session and kept across its
    /// connections and reconnects. The server lets one session at a time write a volume.
    pub session: u64,
    /// Which of the session's connections this is (0..). A new HELLO with the same session and
    /// slot (a reconnect) retires the connection it replaces: that one's writes are refused from
    /// then on, so a write still queued there can never land after the re-sent ones.
    pub slot: u16,
    pub node_id: NodeId,
    /// The credential: the node's own credential, the admin token, or the join token (which enrolls
    /// a node not known yet); empty when the client has none.
    pub token: String,
}

/// A request, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Hello(Hello),
    Ping,
    VolumeCreate {
        name: VolumeName,
        /// `VOLUME_KIND_BLOCK` or `VOLUME_KIND_FS`.
        kind: u8,
        /// 0 only with a `source`: the source's size.
        size: u64,
        /// Kept with the volume and returned in its VolumeInfo (empty: none).
        labels: Labels,
        /// The volume starts as a copy of a snapshot or (a clone) of another volume.
        source: Option<VolumeSource>,
    },
    VolumeDelete {
        name: VolumeName,
        /// Admin only: delete although a writer attachment is recorded.
        force: bool,
    },
    /// Names sorted ascending, strictly after `start_after`, at most `max_entries` (<= LIST_ENTRIES_MAX).
    VolumeList {
        start_after: Option<VolumeName>,
        max_entries: u32,
    },
    VolumeStat {
        name: VolumeName,
    },
    VolumeResize {
        name: VolumeName,
        size: u64,
    },
    AttachSet {
        name: VolumeName,
        node: NodeId,
        /// Take the attachment over from another holder (or from an earlier one of the same node):
        /// the generation changes and the old holder's writes are fenced.
        force: bool,
    },
    AttachClear {
        name: VolumeName,
        node: NodeId,
        /// The generation being released; 0 releases whatever generation `node` holds.
        generation: u64,
    },
    StoreStat,
    NodeRegister {
        node: NodeId,
    },
    NodeStat {
        node: NodeId,
    },
    /// Admin only: forget `node`'s credential.
    NodeReset {
        node: NodeId,
    },
    /// Snapshot names follow the volume name rules, in a namespace of their own.
    SnapshotCreate {
        name: VolumeName,
        source: VolumeName,
        labels: Labels,
    },
    SnapshotDelete {
        name: VolumeName,
    },
    /// Names ascending, strictly after `start_after`; only `source`'s snapshots when given.
    SnapshotList {
        source: Option<VolumeName>,
        start_after: Option<VolumeName>,
        max_entries: u32,
    },
    SnapshotStat {
        name: VolumeName,
    },
    Open {
        name: VolumeName,
        read_only: bool,
        /// Read-write: the writer attachment generation the session holds (from ATTACH_SET or the
        /// CSI publish context). Read-only: 0.
        generation: u64,
    },
    Close {
        handle: VolumeHandle,
    },
    Read {
        handle: VolumeHandle,
        offset: u64,
        len: u32,
    },
    Write {
        handle: VolumeHandle,
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Flush {
        handle: VolumeHandle,
    },
    Trim {
        handle: VolumeHandle,
        offset: u64,
        len: u32,
    },
    WriteZeroes {
        handle: VolumeHandle,
        offset: u64,
        len: u32,
        fua: bool,
    },
    /// A file operation on an OPENed fs volume (see [`crate::fs`]).
    Fs {
        handle: VolumeHandle,
        node: u64,
        creds: Creds,
        op: FsOp,
    },
}

/// Volume kinds. Only block volumes exist in this version.
pub const VOLUME_KIND_BLOCK: u8 = 0;
/// A filesystem the server formats, mounts and serves file by file (RWX).
pub const VOLUME_KIND_FS: u8 = 1;

/// Where a new volume's content comes from (VOLUME_CREATE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSource {
    Snapshot(VolumeName),
    /// A clone: the volume's content at the moment the server received the create.
    Volume(VolumeName),
}

/// VOLUME_CREATE source kinds on the wire.
pub const SOURCE_SNAPSHOT: u8 = 1;
pub const SOURCE_VOLUME: u8 = 2;

impl Request {
    pub fn opcode(&self) -> Opcode {
        match self {
            Request::Hello(_) => Opcode::Hello,
            Request::Ping => Opcode::Ping,
            Request::VolumeCreate { .. } => Opcode::VolumeCreate,
            Request::VolumeDelete { .. } => Opcode::VolumeDelete,
            Request::VolumeList { .. } => Opcode::VolumeList,
            Request::VolumeStat { .. } => Opcode::VolumeStat,
            Request::VolumeResize { .. } => Opcode::VolumeResize,
            Request::AttachSet { .. } => Opcode::AttachSet,
            Request::AttachClear { .. } => Opcode::AttachClear,
            Request::StoreStat => Opcode::StoreStat,
            Request::NodeRegister { .. } => Opcode::NodeRegister,
            Request::NodeStat { .. } => Opcode::NodeStat,
            Request::NodeReset { .. } => Opcode::NodeReset,
            Request::SnapshotCreate { .. } => Opcode::SnapshotCreate,
            Request::SnapshotDelete { .. } => Opcode::SnapshotDelete,
            Request::SnapshotList { .. } => Opcode::SnapshotList,
            Request::SnapshotStat { .. } => Opcode::SnapshotStat,
            Request::Open { .. } => Opcode::Open,
            Request::Close { .. } => Opcode::Close,
            Request::Read { .. } => Opcode::Read,
            Request::Write { .. } => Opcode::Write,
            Request::Flush { .. } => Opcode::Flush,
            Request::Trim { .. } => Opcode::Trim,
            Request::WriteZeroes { .. } => Opcode::WriteZeroes,
            Request::Fs { op, .. } => op.opcode(),
        }
    }

    /// Bytes this request counts against the connection's in-flight byte budget.
    pub fn in_flight_bytes(&self) -> u32 {
        match self {
            Request::Read { len, .. } => *len,
            // Bounded by PAYLOAD_LEN_MAX, which fits in u32.
            Request::Write { data, .. } => u32::try_from(data.len()).unwrap_or(u32::MAX),
            Request::Fs { op, .. } => op.data_len(),
            _ => 0,
        }
    }

    /// Encodes the request. A WRITE's payload is `data` itself (a reference-count bump, not a copy).
    pub fn encode(&self, request_id: RequestId) -> RequestFrame {
        let mut h = RequestHeader {
            version: PROTOCOL_VERSION,
            opcode: self.opcode() as u8,
            request_id,
            ..Default::default()
        };
        let mut p = BytesMut::new();
        let payload = match self {
            Request::Hello(hello) => {
                p.put_u8(hello.version_min);
                p.put_u8(hello.version_max);
                p.put_u16_le(hello.slot);
                p.put_u64_le(hello.features);
                p.put_u64_le(hello.session);
                put_str8(&mut p, hello.node_id.as_str());
                put_str16(&mut p, &hello.token);
                p.freeze()
            }
            Request::VolumeCreate { name, kind, size, labels, source } => {
                p.put_u64_le(*size);
                p.put_u8(*kind);
                put_str8(&mut p, name.as_str());
                if !labels.is_empty() || source.is_some() {
                    put_labels(&mut p, labels);
                }
                match source {
                    None => {}
                    Some(VolumeSource::Snapshot(s)) => {
                        p.put_u8(SOURCE_SNAPSHOT);
                        put_str8(&mut p, s.as_str());
                    }
                    Some(VolumeSource::Volume(v)) => {
                        p.put_u8(SOURCE_VOLUME);
                        put_str8(&mut p, v.as_str());
                    }
                }
                p.freeze()
            }
            Request::SnapshotCreate { name, source, labels } => {
                put_str8(&mut p, name.as_str());
                put_str8(&mut p, source.as_str());
                put_labels(&mut p, labels);
                p.freeze()
            }
            Request::SnapshotDelete { name } | Request::SnapshotStat { name } => {
                put_str8(&mut p, name.as_str());
                p.freeze()
            }
            Request::SnapshotList { source, start_after, max_entries } => {
                p.put_u32_le(*max_entries);
                put_str8(&mut p, start_after.as_ref().map(|n| n.as_str()).unwrap_or(""));
                put_str8(&mut p, source.as_ref().map(|n| n.as_str()).unwrap_or(""));
                p.freeze()
            }
            Request::VolumeDelete { name, force } => {
                if *force {
                    h.flags |= FLAG_FORCE;
                }
                put_str8(&mut p, name.as_str());
                p.freeze()
            }
            Request::VolumeStat { name } => {
                put_str8(&mut p, name.as_str());
                p.freeze()
            }
            Request::VolumeList { start_after, max_entries } => {
                p.put_u32_le(*max_entries);
                put_str8(&mut p, start_after.as_ref().map(|n| n.as_str()).unwrap_or(""));
                p.freeze()
            }
            Request::VolumeResize { name, size } => {
                p.put_u64_le(*size);
                put_str8(&mut p, name.as_str());
                p.freeze()
            }
            Request::AttachSet { name, node, force } => {
                if *force {
                    h.flags |= FLAG_FORCE;
                }
                put_str8(&mut p, name.as_str());
                put_str8(&mut p, node.as_str());
                p.freeze()
            }
            Request::AttachClear { name, node, generation } => {
                put_str8(&mut p, name.as_str());
                put_str8(&mut p, node.as_str());
                p.put_u64_le(*generation);
                p.freeze()
            }
            Request::StoreStat | Request::Ping => Bytes::new(),
            Request::NodeRegister { node } | Request::NodeStat { node } | Request::NodeReset { node } => {
                put_str8(&mut p, node.as_str());
                p.freeze()
            }
            Request::Open { name, read_only, generation } => {
                if *read_only {
                    h.flags |= FLAG_READ_ONLY;
                }
                put_str8(&mut p, name.as_str());
                p.put_u64_le(*generation);
                p.freeze()
            }
            Request::Close { handle } | Request::Flush { handle } => {
                h.handle = *handle;
                Bytes::new()
            }
            Request::Read { handle, offset, len } | Request::Trim { handle, offset, len } => {
                h.handle = *handle;
                h.offset = *offset;
                h.length = *len;
                Bytes::new()
            }
            Request::WriteZeroes { handle, offset, len, fua } => {
                h.handle = *handle;
                h.offset = *offset;
                h.length = *len;
                if *fua {
                    h.flags |= FLAG_FUA;
                }
                Bytes::new()
            }
            Request::Write { handle, offset, data, fua } => {
                h.handle = *handle;
                h.offset = *offset;
                h.length = u32::try_from(data.len()).unwrap_or(u32::MAX);
                if *fua {
                    h.flags |= FLAG_FUA;
                }
                data.clone()
            }
            Request::Fs { handle, node, creds, op } => {
                h.handle = *handle;
                let fields = fs::encode_request(*node, creds, op).freeze();
                match op {
                    FsOp::Read { offset, len, .. } => {
                        h.offset = *offset;
                        h.length = *len;
                        fields
                    }
                    FsOp::Write { offset, data, .. } => {
                        h.offset = *offset;
                        h.length = u32::try_from(data.len()).unwrap_or(u32::MAX);
                        let len = fields.len() + data.len();
                        h.payload_len = u32::try_from(len).unwrap_or(u32::MAX);
                        let mut crc = crc32fast::Hasher::new();
                        crc.update(&fields);
                        crc.update(data);
                        h.payload_crc = crc.finalize();
                        return Frame { header: h.encode(), head: fields, payload: data.clone() };
                    }
                    _ => fields,
                }
            }
        };
        h.payload_len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        h.payload_crc = payload_crc(&payload);
        Frame { header: h.encode(), head: Bytes::new(), payload }
    }

    /// Verifies the payload checksum and converts a raw frame into a request.
    pub fn parse(raw: RawRequest) -> Result<(RequestId, Request), RequestError> {
        let h = raw.header;
        let fail = |status: Status, message: String| RequestError {
            request_id: h.request_id,
            opcode: h.opcode,
            status,
            message,
        };
        let actual = payload_crc(&raw.payload);
        if actual != h.payload_crc {
            return Err(fail(
                Status::Checksum,
                format!("payload crc {actual:#010x} does not match header crc {:#010x}", h.payload_crc),
            ));
        }
        let op = Opcode::try_from(h.opcode)
            .map_err(|v| fail(Status::UnknownOpcode, format!("unknown opcode {v:#04x}")))?;
        if h.flags & !FLAGS_KNOWN != 0 {
            return Err(fail(Status::BadRequest, format!("unknown flags {:#06x}", h.flags & !FLAGS_KNOWN)));
        }
        let allowed_flags = match op {
            Opcode::Write | Opcode::WriteZeroes => FLAG_FUA,
            Opcode::Open => FLAG_READ_ONLY,
            Opcode::AttachSet | Opcode::VolumeDelete => FLAG_FORCE,
            _ => 0,
        };
        if h.flags & !allowed_flags != 0 {
            return Err(fail(Status::BadRequest, format!("flags {:#06x} are not valid for {op}", h.flags)));
        }
        // Header fields a request does not use must be zero: they are not silently ignored.
        let uses_handle = op.is_data() || op.is_fs() || op == Opcode::Close;
        let uses_range = op.is_fs() // checked by `fs::parse_request`
            || matches!(op, Opcode::Read | Opcode::Write | Opcode::Trim | Opcode::WriteZeroes);
        if (!uses_handle && h.handle.0 != 0) || (!uses_range && (h.offset != 0 || h.length != 0)) {
            return Err(fail(Status::BadRequest, format!("{op}: unused header fields must be zero")));
        }
        let fua = h.flags & FLAG_FUA != 0;
        let force = h.flags & FLAG_FORCE != 0;
        let mut r = Reader::new(&raw.payload);
        let parsed = (|| -> Result<Request, PayloadError> {
            if op.is_fs() {
                let (node, creds, fsop) = fs::parse_request(op, h.offset, h.length, &raw.payload, &mut r)?;
                return Ok(Request::Fs { handle: h.handle, node, creds, op: fsop });
            }
            let req = match op {
                Opcode::Hello => {
                    let version_min = r.u8()?;
                    let version_max = r.u8()?;
                    let slot = r.u16()?;
                    let features = r.u64()?;
                    let session = r.u64()?;
                    let node_id = r.node_id()?;
                    let token = r.str16(TOKEN_LEN_MAX)?.to_owned();
                    Request::Hello(Hello {
                        version_min,
                        version_max,
                        features,
                        session,
                        slot,
                        node_id,
                        token,
                    })
                }
                Opcode::VolumeCreate => {
                    let size = r.u64()?;
                    let kind = r.u8()?;
                    if kind != VOLUME_KIND_BLOCK && kind != VOLUME_KIND_FS {
                        return Err(PayloadError::Invalid("unknown volume kind"));
                    }
                    let name = r.volume_name()?;
                    // Labels are optional: a payload may end right after the name. A source follows
                    // the labels.
                    let labels = if r.buf.is_empty() { Labels::new() } else { r.labels()? };
                    let source = if r.buf.is_empty() {
                        None
                    } else {
                        match r.u8()? {
                            SOURCE_SNAPSHOT => Some(VolumeSource::Snapshot(r.volume_name()?)),
                            SOURCE_VOLUME => Some(VolumeSource::Volume(r.volume_name()?)),
                            _ => return Err(PayloadError::Invalid("unknown volume source kind")),
                        }
                    };
                    Request::VolumeCreate { size, kind, name, labels, source }
                }
                Opcode::SnapshotCreate => Request::SnapshotCreate {
                    name: r.volume_name()?,
                    source: r.volume_name()?,
                    labels: r.labels()?,
                },
                Opcode::SnapshotDelete => Request::SnapshotDelete { name: r.volume_name()? },
                Opcode::SnapshotStat => Request::SnapshotStat { name: r.volume_name()? },
                Opcode::SnapshotList => {
                    let max_entries = r.u32()?;
                    if max_entries == 0 || max_entries > LIST_ENTRIES_MAX {
                        return Err(PayloadError::Invalid("max_entries must be 1..=LIST_ENTRIES_MAX"));
                    }
                    let optional = |s: &str| -> Result<Option<VolumeName>, PayloadError> {
                        if s.is_empty() {
                            Ok(None)
                        } else {
                            Ok(Some(VolumeName::try_from(s)?))
                        }
                    };
                    let start_after = optional(r.str8(VOLUME_NAME_LEN_MAX)?)?;
                    let source = optional(r.str8(VOLUME_NAME_LEN_MAX)?)?;
                    Request::SnapshotList { source, start_after, max_entries }
                }
                Opcode::VolumeDelete => Request::VolumeDelete { name: r.volume_name()?, force },
                Opcode::VolumeStat => Request::VolumeStat { name: r.volume_name()? },
                Opcode::VolumeList => {
                    let max_entries = r.u32()?;
                    if max_entries == 0 || max_entries > LIST_ENTRIES_MAX {
                        return Err(PayloadError::Invalid("max_entries must be 1..=LIST_ENTRIES_MAX"));
                    }
                    let s = r.str8(VOLUME_NAME_LEN_MAX)?;
                    let start_after = if s.is_empty() { None } else { Some(VolumeName::try_from(s)?) };
                    Request::VolumeList { start_after, max_entries }
                }
                Opcode::VolumeResize => {
                    let size = r.u64()?;
                    Request::VolumeResize { size, name: r.volume_name()? }
                }
                Opcode::AttachSet => Request::AttachSet { name: r.volume_name()?, node: r.node_id()?, force },
                Opcode::AttachClear => {
                    Request::AttachClear { name: r.volume_name()?, node: r.node_id()?, generation: r.u64()? }
                }
                Opcode::StoreStat => Request::StoreStat,
                Opcode::Ping => Request::Ping,
                Opcode::NodeRegister => Request::NodeRegister { node: r.node_id()? },
                Opcode::NodeStat => Request::NodeStat { node: r.node_id()? },
                Opcode::NodeReset => Request::NodeReset { node: r.node_id()? },
                Opcode::Open => {
                    let read_only = h.flags & FLAG_READ_ONLY != 0;
                    let name = r.volume_name()?;
                    let generation = r.u64()?;
                    if read_only && generation != 0 {
                        return Err(PayloadError::Invalid("a read-only OPEN carries generation 0"));
                    }
                    Request::Open { read_only, name, generation }
                }
                Opcode::Close => Request::Close { handle: h.handle },
                Opcode::Flush => Request::Flush { handle: h.handle },
                Opcode::Read => {
                    if h.length > READ_LEN_MAX {
                        return Err(PayloadError::TooLong {
                            len: h.length as usize,
                            max: READ_LEN_MAX as usize,
                        });
                    }
                    Request::Read { handle: h.handle, offset: h.offset, len: h.length }
                }
                Opcode::Trim => Request::Trim { handle: h.handle, offset: h.offset, len: h.length },
                Opcode::WriteZeroes => {
                    Request::WriteZeroes { handle: h.handle, offset: h.offset, len: h.length, fua }
                }
                Opcode::Write => {
                    if h.length != h.payload_len {
                        return Err(PayloadError::Invalid("WRITE length differs from payload length"));
                    }
                    // Consume the payload: it is the data, shared with the read buffer.
                    r = Reader::new(&[]);
                    Request::Write { handle: h.handle, offset: h.offset, data: raw.payload.clone(), fua }
                }
                fs_opcodes!() => return Err(PayloadError::Invalid("FS opcode")),
                Opcode::FsNotify => {
                    return Err(PayloadError::Invalid("FS_NOTIFY is sent by servers, not to them"))
                }
            };
            Ok(req)
        })();
        let req = parsed.map_err(|e| fail(e.status(), e.to_string()))?;
        r.finish().map_err(|e| fail(e.status(), e.to_string()))?;
        Ok((h.request_id, req))
    }
}

// ---------------------------------------------------------------------------------------------------
// Responses

/// The server's side of the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloReply {
    pub version: u8,
    /// `SESSION_ADMIN`, `SESSION_ENROLLED`.
    pub session_flags: u8,
    pub features: u64,
    pub in_flight_requests_max: u32,
    pub in_flight_bytes_max: u32,
    pub payload_len_max: u32,
    pub server_id: String,
    /// The node's new credential when this HELLO enrolled it (`SESSION_ENROLLED`), else empty. The
    /// client keeps it and presents it from then on.
    pub credential: String,
}

/// What the server knows about a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub name: VolumeName,
    pub kind: u8,
    pub size: u64,
    /// Bytes of storage actually allocated (thin provisioning).
    pub allocated: u64,
    pub created_unix_ms: u64,
    /// Incremented each time the writer attachment changes.
    pub generation: u64,
    /// The node holding the writer attachment, if any.
    pub owner: Option<NodeId>,
    /// When the current writer attachment was set (0 = none).
    pub attached_unix_ms: u64,
    /// Set at creation.
    pub labels: Labels,
}

/// What the server knows about a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub name: VolumeName,
    /// The volume it is an image of (which may have been deleted since).
    pub source: VolumeName,
    /// The source's size when the snapshot was cut.
    pub size: u64,
    /// Bytes of storage the snapshot occupies (shared extents of a reflink count in full).
    pub allocated: u64,
    pub created_unix_ms: u64,
    /// Complete and usable as a volume source. A reflinked snapshot is ready at once; a copied one
    /// once its copy is done.
    pub ready: bool,
    /// Progress of the copy: bytes of `size` already preserved (`size` when ready).
    pub copied_bytes: u64,
    pub labels: Labels,
    /// The source's kind (`VOLUME_KIND_BLOCK` or `VOLUME_KIND_FS`): a restore is of that kind. On
    /// the wire in a trailer, present only when some snapshot of the reply is not of a block volume.
    pub kind: u8,
}

/// The server's data dir: what its filesystem holds and what the volumes were given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreStat {
    /// Size of the filesystem holding the data dir.
    pub total_bytes: u64,
    /// Bytes still free there for the server's use.
    pub free_bytes: u64,
    /// Sum of the volumes' sizes (they are sparse, so this may exceed `total_bytes`).
    pub provisioned_bytes: u64,
    pub volumes: u64,
}

/// A successful reply; which variant depends on the request's opcode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Hello(HelloReply),
    /// DELETE, ATTACH_CLEAR, CLOSE, WRITE, FLUSH, TRIM, WRITE_ZEROES.
    Done,
    /// CREATE, STAT, RESIZE.
    Volume(VolumeInfo),
    List {
        entries: Vec<VolumeInfo>,
        more: bool,
    },
    Attached {
        generation: u64,
    },
    StoreStat(StoreStat),
    /// NODE_REGISTER, NODE_STAT: when the node was first registered.
    Node {
        registered_unix_ms: u64,
    },
    Opened {
        handle: VolumeHandle,
        size: u64,
        read_only: bool,
    },
    /// READ: the data, shared with the read buffer (client) or the server's read buffer.
    Data(Bytes),
    /// SNAPSHOT_CREATE, SNAPSHOT_STAT.
    Snapshot(SnapshotInfo),
    SnapshotList {
        entries: Vec<SnapshotInfo>,
        more: bool,
    },
    /// The answer to an FS request.
    Fs(FsReply),
    /// FS_NOTIFY (request id 0, from the server unasked).
    Notify(fs::Notices),
}

/// A failed request: a status and a human-readable reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ErrorReply {
    pub status: Status,
    pub message: String,
    /// With `Status::Errno`: the errno (sent as a u32 before the message); else 0.
    pub errno: u32,
}

impl ErrorReply {
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > ERROR_MESSAGE_LEN_MAX {
            let mut cut = ERROR_MESSAGE_LEN_MAX;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Self { status, message, errno: 0 }
    }

    /// A file operation's failure: `errno` and what it was.
    pub fn errno(errno: u32, message: impl Into<String>) -> Self {
        Self { errno, ..Self::new(Status::Errno, message) }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub request_id: RequestId,
    /// The request's opcode byte (0 when the request could not be read at all).
    pub opcode: u8,
    pub result: Result<Reply, ErrorReply>,
}

/// A list reply: count u32, more u8, then the entries.
fn put_list<T>(mut p: BytesMut, entries: &[T], more: bool, put: fn(&mut BytesMut, &T)) -> Bytes {
    p.put_u32_le(u32::try_from(entries.len()).unwrap_or(u32::MAX));
    p.put_u8(u8::from(more));
    for v in entries {
        put(&mut p, v);
    }
    p.freeze()
}

fn get_list<T>(
    r: &mut Reader<'_>,
    get: fn(&mut Reader<'_>) -> Result<T, PayloadError>,
) -> Result<(Vec<T>, bool), PayloadError> {
    let n = r.u32()?;
    if n > LIST_ENTRIES_MAX {
        return Err(PayloadError::Invalid("too many list entries"));
    }
    let more = r.u8()? != 0;
    let mut entries = Vec::with_capacity(n as usize);
    for _ in 0..n {
        entries.push(get(r)?);
    }
    Ok((entries, more))
}

fn put_snapshot_info(p: &mut BytesMut, v: &SnapshotInfo) {
    put_str8(p, v.name.as_str());
    put_str8(p, v.source.as_str());
    p.put_u64_le(v.size);
    p.put_u64_le(v.allocated);
    p.put_u64_le(v.created_unix_ms);
    p.put_u8(u8::from(v.ready));
    p.put_u64_le(v.copied_bytes);
    put_labels(p, &v.labels);
}

/// The kinds trailer of a snapshot reply: one kind u8 per snapshot, only when some is not block
/// (so a reply of block snapshots only is byte for byte what older servers sent).
fn put_snapshot_kinds(p: &mut BytesMut, entries: &[SnapshotInfo]) {
    if entries.iter().any(|v| v.kind != VOLUME_KIND_BLOCK) {
        for v in entries {
            p.put_u8(v.kind);
        }
    }
}

fn get_snapshot_kinds(r: &mut Reader<'_>, entries: &mut [SnapshotInfo]) -> Result<(), PayloadError> {
    if r.remaining() == 0 {
        return Ok(());
    }
    for v in entries {
        v.kind = match r.u8()? {
            k @ (VOLUME_KIND_BLOCK | VOLUME_KIND_FS) => k,
            _ => return Err(PayloadError::Invalid("unknown snapshot kind")),
        };
    }
    Ok(())
}

fn get_snapshot_info(r: &mut Reader<'_>) -> Result<SnapshotInfo, PayloadError> {
    Ok(SnapshotInfo {
        name: r.volume_name()?,
        source: r.volume_name()?,
        size: r.u64()?,
        allocated: r.u64()?,
        created_unix_ms: r.u64()?,
        ready: match r.u8()? {
            0 => false,
            1 => true,
            _ => return Err(PayloadError::Invalid("snapshot ready flag is not 0 or 1")),
        },
        copied_bytes: r.u64()?,
        labels: r.labels()?,
        kind: VOLUME_KIND_BLOCK,
    })
}

fn put_volume_info(p: &mut BytesMut, v: &VolumeInfo) {
    put_str8(p, v.name.as_str());
    p.put_u8(v.kind);
    p.put_u64_le(v.size);
    p.put_u64_le(v.allocated);
    p.put_u64_le(v.created_unix_ms);
    p.put_u64_le(v.generation);
    put_str8(p, v.owner.as_ref().map(|n| n.as_str()).unwrap_or(""));
    p.put_u64_le(v.attached_unix_ms);
    put_labels(p, &v.labels);
}

fn get_volume_info(r: &mut Reader<'_>) -> Result<VolumeInfo, PayloadError> {
    let name = r.volume_name()?;
    let kind = r.u8()?;
    let size = r.u64()?;
    let allocated = r.u64()?;
    let created_unix_ms = r.u64()?;
    let generation = r.u64()?;
    let owner = r.str8(NODE_ID_LEN_MAX)?;
    let owner = if owner.is_empty() { None } else { Some(NodeId::try_from(owner)?) };
    let attached_unix_ms = r.u64()?;
    let labels = r.labels()?;
    Ok(VolumeInfo {
        name,
        kind,
        size,
        allocated,
        created_unix_ms,
        generation,
        owner,
        attached_unix_ms,
        labels,
    })
}

impl Response {
    pub fn ok(request_id: RequestId, opcode: Opcode, reply: Reply) -> Self {
        Self { request_id, opcode: opcode as u8, result: Ok(reply) }
    }

    pub fn error(request_id: RequestId, opcode: u8, status: Status, message: impl Into<String>) -> Self {
        Self { request_id, opcode, result: Err(ErrorReply::new(status, message)) }
    }

    /// Encodes the response. A READ reply's payload is the data `Bytes` itself (no copy).
    pub fn encode(&self) -> ResponseFrame {
        let mut p = BytesMut::new();
        let (status, payload) = match &self.result {
            Err(e) if e.status == Status::Errno => {
                p.put_u32_le(e.errno);
                p.put_slice(e.message.as_bytes());
                (e.status as u16, p.freeze())
            }
            Err(e) => (e.status as u16, Bytes::copy_from_slice(e.message.as_bytes())),
            Ok(reply) => {
                let payload = match reply {
                    Reply::Hello(h) => {
                        p.put_u8(h.version);
                        p.put_u8(h.session_flags);
                        p.put_u16_le(0);
                        p.put_u64_le(h.features);
                        p.put_u32_le(h.in_flight_requests_max);
                        p.put_u32_le(h.in_flight_bytes_max);
                        p.put_u32_le(h.payload_len_max);
                        put_str8(&mut p, &h.server_id);
                        put_str16(&mut p, &h.credential);
                        p.freeze()
                    }
                    Reply::Done => Bytes::new(),
                    Reply::Volume(v) => {
                        put_volume_info(&mut p, v);
                        p.freeze()
                    }
                    Reply::List { entries, more } => put_list(p, entries, *more, put_volume_info),
                    Reply::Attached { generation } => {
                        p.put_u64_le(*generation);
                        p.freeze()
                    }
                    Reply::StoreStat(st) => {
                        p.put_u64_le(st.total_bytes);
                        p.put_u64_le(st.free_bytes);
                        p.put_u64_le(st.provisioned_bytes);
                        p.put_u64_le(st.volumes);
                        p.freeze()
                    }
                    Reply::Node { registered_unix_ms } => {
                        p.put_u64_le(*registered_unix_ms);
                        p.freeze()
                    }
                    Reply::Opened { handle, size, read_only } => {
                        p.put_u32_le(handle.0);
                        p.put_u32_le(u32::from(*read_only));
                        p.put_u64_le(*size);
                        p.freeze()
                    }
                    Reply::Data(d) => d.clone(),
                    Reply::Snapshot(v) => {
                        put_snapshot_info(&mut p, v);
                        put_snapshot_kinds(&mut p, std::slice::from_ref(v));
                        p.freeze()
                    }
                    Reply::SnapshotList { entries, more } => {
                        let mut p = BytesMut::from(put_list(p, entries, *more, put_snapshot_info));
                        put_snapshot_kinds(&mut p, entries);
                        p.freeze()
                    }
                    Reply::Fs(f) => match fs::encode_reply(&mut p, f) {
                        Some(data) => data,
                        None => p.freeze(),
                    },
                    Reply::Notify(n) => {
                        fs::put_notices(&mut p, n);
                        p.freeze()
                    }
                };
                (Status::Ok as u16, payload)
            }
        };
        let h = ResponseHeader {
            version: PROTOCOL_VERSION,
            opcode: self.opcode,
            status,
            request_id: self.request_id,
            payload_len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
            payload_crc: payload_crc(&payload),
        };
        Frame { header: h.encode(), head: Bytes::new(), payload }
    }

    /// Verifies the payload checksum and converts a raw frame into a response.
    pub fn parse(raw: RawResponse) -> Result<Response, ResponseError> {
        let h = raw.header;
        let fail = |message: String| ResponseError { request_id: h.request_id, checksum: false, message };
        let actual = payload_crc(&raw.payload);
        if actual != h.payload_crc {
            return Err(ResponseError {
                request_id: h.request_id,
                checksum: true,
                message: format!("payload crc {actual:#010x} does not match header {:#010x}", h.payload_crc),
            });
        }
        let status = Status::try_from(h.status).map_err(|v| fail(format!("unknown status {v}")))?;
        if status == Status::Errno {
            let Some((errno, message)) = raw.payload.split_first_chunk::<4>() else {
                return Err(fail("an errno reply without its errno".into()));
            };
            let message = String::from_utf8_lossy(message).into_owned();
            return Ok(Response {
                request_id: h.request_id,
                opcode: h.opcode,
                result: Err(ErrorReply::errno(u32::from_le_bytes(*errno), message)),
            });
        }
        if status != Status::Ok {
            let message = String::from_utf8_lossy(&raw.payload).into_owned();
            return Ok(Response {
                request_id: h.request_id,
                opcode: h.opcode,
                result: Err(ErrorReply::new(status, message)),
            });
        }
        let op = Opcode::try_from(h.opcode).map_err(|v| fail(format!("reply to unknown opcode {v:#04x}")))?;
        let mut r = Reader::new(&raw.payload);
        let parsed = (|| -> Result<Reply, PayloadError> {
            Ok(match op {
                Opcode::Hello => {
                    let version = r.u8()?;
                    let session_flags = r.u8()?;
                    let _ = r.u16()?;
                    Reply::Hello(HelloReply {
                        version,
                        session_flags,
                        features: r.u64()?,
                        in_flight_requests_max: r.u32()?,
                        in_flight_bytes_max: r.u32()?,
                        payload_len_max: r.u32()?,
                        server_id: r.str8(SERVER_ID_LEN_MAX)?.to_owned(),
                        credential: r.str16(TOKEN_LEN_MAX)?.to_owned(),
                    })
                }
                Opcode::VolumeCreate | Opcode::VolumeStat | Opcode::VolumeResize => {
                    Reply::Volume(get_volume_info(&mut r)?)
                }
                Opcode::VolumeList => {
                    let (entries, more) = get_list(&mut r, get_volume_info)?;
                    Reply::List { entries, more }
                }
                Opcode::SnapshotCreate | Opcode::SnapshotStat => {
                    let mut v = get_snapshot_info(&mut r)?;
                    get_snapshot_kinds(&mut r, std::slice::from_mut(&mut v))?;
                    Reply::Snapshot(v)
                }
                Opcode::SnapshotList => {
                    let (mut entries, more) = get_list(&mut r, get_snapshot_info)?;
                    get_snapshot_kinds(&mut r, &mut entries)?;
                    Reply::SnapshotList { entries, more }
                }
                Opcode::AttachSet => Reply::Attached { generation: r.u64()? },
                Opcode::StoreStat => Reply::StoreStat(StoreStat {
                    total_bytes: r.u64()?,
                    free_bytes: r.u64()?,
                    provisioned_bytes: r.u64()?,
                    volumes: r.u64()?,
                }),
                Opcode::NodeRegister | Opcode::NodeStat => Reply::Node { registered_unix_ms: r.u64()? },
                Opcode::Open => {
                    let handle = VolumeHandle(r.u32()?);
                    let flags = r.u32()?;
                    Reply::Opened { handle, read_only: flags & 1 != 0, size: r.u64()? }
                }
                Opcode::Read => {
                    r = Reader::new(&[]);
                    Reply::Data(raw.payload.clone())
                }
                Opcode::VolumeDelete
                | Opcode::SnapshotDelete
                | Opcode::Ping
                | Opcode::NodeReset
                | Opcode::AttachClear
                | Opcode::Close
                | Opcode::Write
                | Opcode::Flush
                | Opcode::Trim
                | Opcode::WriteZeroes => Reply::Done,
                fs_opcodes!() => Reply::Fs(fs::parse_reply(op, &raw.payload, &mut r)?),
                Opcode::FsNotify => Reply::Notify(fs::get_notices(&mut r)?),
            })
        })();
        let reply = parsed.map_err(|e| fail(e.to_string()))?;
        r.finish().map_err(|e| fail(e.to_string()))?;
        Ok(Response { request_id: h.request_id, opcode: h.opcode, result: Ok(reply) })
    }
}

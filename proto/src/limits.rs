//! Every bound of the protocol in one place. Lengths read from the wire are checked against these
//! constants *before* anything is allocated for them.

/// Current (and only) protocol version. Carried in every header; negotiated by HELLO. Version 2 added
/// the client session id and credentials to HELLO, generations to OPEN and ATTACH_CLEAR, and the
/// attachment time to VolumeInfo; version 1 had no enforced writer and is no longer spoken.
pub const PROTOCOL_VERSION: u8 = 2;
/// Oldest version this build speaks.
pub const PROTOCOL_VERSION_MIN: u8 = 2;

/// Largest payload of any frame (a WRITE request or a READ response), in bytes.
pub const PAYLOAD_LEN_MAX: u32 = 4 << 20;
/// Largest payload of a request that is not WRITE (names, tokens, control arguments).
pub const CONTROL_PAYLOAD_LEN_MAX: u32 = 64 << 10;
/// Largest READ a client may ask for in one request.
pub const READ_LEN_MAX: u32 = PAYLOAD_LEN_MAX;
/// Requests one connection may have in flight (sent, not yet answered).
pub const IN_FLIGHT_REQUESTS_MAX: u32 = 256;
/// Payload bytes one connection may have in flight (WRITE payloads plus READ lengths).
pub const IN_FLIGHT_BYTES_MAX: u32 = 64 << 20;

/// Volume names: like Kubernetes DNS labels.
pub const VOLUME_NAME_LEN_MAX: usize = 63;
/// Node (client) identifiers.
pub const NODE_ID_LEN_MAX: usize = 128;
/// Authentication token.
pub const TOKEN_LEN_MAX: usize = 1024;
/// Largest payload accepted before a successful HELLO: a whole HELLO fits, nothing larger is read
/// (or allocated) for a peer that has not authenticated.
pub const HELLO_PAYLOAD_LEN_MAX: u32 = 2048;
/// Server id string in HELLO replies.
pub const SERVER_ID_LEN_MAX: usize = 128;
/// Human-readable message in an error reply.
pub const ERROR_MESSAGE_LEN_MAX: usize = 1024;
/// Entries in one VOLUME_LIST reply.
pub const LIST_ENTRIES_MAX: u32 = 256;
/// Labels per volume (set at VOLUME_CREATE, returned in VolumeInfo).
pub const LABELS_MAX: usize = 8;
/// A label key: 1-63 bytes of `[a-z0-9./_-]`.
pub const LABEL_KEY_LEN_MAX: usize = 63;
/// A label value: any UTF-8, at most this many bytes.
pub const LABEL_VALUE_LEN_MAX: usize = 1024;
/// Nodes a server remembers (NODE_REGISTER beyond this: `NO_SPACE`).
pub const NODES_MAX: usize = 65_536;

/// Volume sizes are multiples of this (and so are the offsets a block device uses).
pub const VOLUME_SIZE_ALIGN: u64 = 4096;
/// Largest volume: 1 PiB.
pub const VOLUME_SIZE_MAX: u64 = 1 << 50;

const _: () = assert!(READ_LEN_MAX <= PAYLOAD_LEN_MAX);
// HELLO: versions, reserved, features, session, node id (str8), token (str16).
const _: () =
    assert!(1 + 1 + 2 + 8 + 8 + 1 + NODE_ID_LEN_MAX + 2 + TOKEN_LEN_MAX <= HELLO_PAYLOAD_LEN_MAX as usize);
const _: () = assert!(CONTROL_PAYLOAD_LEN_MAX < PAYLOAD_LEN_MAX);
const _: () = assert!(IN_FLIGHT_BYTES_MAX >= 2 * PAYLOAD_LEN_MAX, "one max-size request must always fit");
// A full LIST reply (each entry at most ~300 bytes) must fit one payload.
/// A VolumeInfo is at most 512 bytes plus its labels: a full LIST page always fits in one payload.
const _: () = assert!(
    LIST_ENTRIES_MAX as u64
        * (512 + 1 + (LABELS_MAX * (1 + LABEL_KEY_LEN_MAX + 2 + LABEL_VALUE_LEN_MAX)) as u64)
        <= PAYLOAD_LEN_MAX as u64
);
const _: () = assert!(VOLUME_SIZE_MAX.is_multiple_of(VOLUME_SIZE_ALIGN));

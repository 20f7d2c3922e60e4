//! The server's error type, and the one place it is mapped to wire status codes.

use ferrovol_proto::{ErrorReply, NameError, Status};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("volume {0:?} not found")]
    NotFound(String),
    #[error("snapshot {0:?} not found")]
    SnapshotNotFound(String),
    /// A snapshot of that name exists; the message names its source.
    #[error("{0}")]
    SnapshotExists(String),
    /// A new volume smaller than its source.
    #[error("{0}")]
    TooSmall(String),
    #[error("node {0:?} is not registered (its CSI node plugin never reported to this server)")]
    NodeNotFound(String),
    #[error("volume {0:?} already exists")]
    AlreadyExists(String),
    #[error("invalid name: {0}")]
    InvalidName(#[from] NameError),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("range {offset}+{len} is beyond the end of the volume ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("volume is open read-only on this connection")]
    ReadOnly,
    /// Refused: the session does not hold the volume's current writer attachment (it never did, or
    /// it was taken over or released since).
    #[error("{0}")]
    Fenced(String),
    /// The writer attachment belongs to someone else; the message names the holder and since when.
    #[error("{0}")]
    AttachedElsewhere(String),
    /// A write on a connection a newer HELLO of the same client session and slot retired.
    #[error(
        "this connection was replaced by a newer one of the same client session; its writes are refused so \
         they cannot land after the ones sent again on the new one"
    )]
    Replaced,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Busy(String),
    #[error("unknown volume handle {0}")]
    BadHandle(u32),
    #[error("no space left on the server's storage")]
    NoSpace,
    #[error("storage I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("data dir: {0}")]
    DataDir(String),
}

impl StoreError {
    /// The single mapping from server errors to wire status codes.
    pub fn status(&self) -> Status {
        match self {
            StoreError::NotFound(_) | StoreError::NodeNotFound(_) | StoreError::SnapshotNotFound(_) => {
                Status::NotFound
            }
            StoreError::AlreadyExists(_) | StoreError::SnapshotExists(_) => Status::AlreadyExists,
            StoreError::TooSmall(_) => Status::OutOfRange,
            StoreError::InvalidName(_) => Status::InvalidName,
            StoreError::InvalidArgument(_) => Status::InvalidArgument,
            StoreError::OutOfRange { .. } => Status::OutOfRange,
            StoreError::ReadOnly => Status::ReadOnly,
            StoreError::Fenced(_) => Status::Fenced,
            StoreError::Replaced => Status::Replaced,
            StoreError::AttachedElsewhere(_) => Status::AttachedElsewhere,
            StoreError::Forbidden(_) => Status::Forbidden,
            StoreError::Busy(_) => Status::Busy,
            StoreError::BadHandle(_) => Status::BadHandle,
            StoreError::NoSpace => Status::NoSpace,
            StoreError::Io(e) if e.raw_os_error() == Some(libc::ENOSPC) => Status::NoSpace,
            StoreError::Io(_) => Status::Io,
            StoreError::DataDir(_) => Status::Internal,
        }
    }

    pub fn to_reply(&self) -> ErrorReply {
        ErrorReply::new(self.status(), self.to_string())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

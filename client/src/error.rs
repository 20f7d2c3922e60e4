//! The client library's error type.

use std::time::Duration;

use ferrovol_proto::{Opcode, Status};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    /// The server refused the request; `status` says why. Shown as the server's message alone (a
    /// sentence naming what was refused, for users: no opcode), or the status in words if empty.
    #[error("{}", if message.is_empty() { status.describe() } else { message.as_str() })]
    Server { op: Opcode, status: Status, message: String },
    /// The server could not be reached for the whole wait.
    #[error("server {addr} unreachable for {waited:.1?} (last error: {last})")]
    Unavailable { addr: String, waited: Duration, last: String },
    /// The server is connected but did not answer in time.
    #[error("{op} not answered within {timeout:?}")]
    TimedOut { op: Opcode, timeout: Duration },
    /// A control request was in flight when the connection dropped: it may or may not have happened.
    #[error("connection lost while {op} was in flight; it may or may not have been applied")]
    ConnectionLost { op: Opcode },
    /// The reply's payload checksum did not match (a READ is retried before this reaches the caller).
    #[error("reply to {op} failed its checksum")]
    Checksum { op: Opcode },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("the session is closed")]
    Closed,
    /// A file operation failed on the server with this errno.
    #[error("{message}")]
    Errno { op: Opcode, errno: u32, message: String },
}

impl ClientError {
    /// The server's status code, when the server answered with an error.
    pub fn status(&self) -> Option<Status> {
        match self {
            ClientError::Server { status, .. } => Some(*status),
            ClientError::Errno { .. } => Some(Status::Errno),
            _ => None,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

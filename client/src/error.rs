//! The client library's error type.

use std::time::Duration;

use ferrovol_proto::{Opcode, Status};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    /// The server refused the request; `status` says why. Shown as the server's message (a
    /// sentence naming what was refused, for users: no opcode), with the status in words where the
    /// message does not say it (`server_text`).
    #[error("{}", server_text(*status, message))]
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

/// A refusal for users: the server's message, plus the status where it is the point (a failed
/// authentication, a forbidden or fenced request), or the status alone when there is no message.
fn server_text(status: Status, message: &str) -> String {
    match status {
        _ if message.is_empty() => status.describe().to_owned(),
        Status::AuthFailed | Status::Forbidden | Status::Fenced | Status::Replaced
            if !message.contains(status.describe()) =>
        {
            format!("{} ({message})", status.describe())
        }
        _ => message.to_owned(),
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

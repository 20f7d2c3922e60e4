//! The driver's one error type, and the one mapping from it (and from the ferrovol server's status
//! codes) to the gRPC codes the CSI spec names.

use ferrovol_client::ClientError;
use ferrovol_proto::Status as Wire;

/// What went wrong, by the gRPC code the spec asks for. The message says what and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsiError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    OutOfRange(String),
    /// An operation on the same object is in progress, or a token was not issued by us.
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// The server cannot be reached or is not ready: retry.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl CsiError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }
    pub fn not_found(msg: impl Into<String>) -> Self {
        Self::NotFound(msg.into())
    }
    pub fn precondition(msg: impl Into<String>) -> Self {
        Self::FailedPrecondition(msg.into())
    }
    pub fn internal(msg: impl Into<String>) -> Self {
        Self::Internal(msg.into())
    }
    /// "what: why", for a failed step of ours.
    pub fn step(what: &str, e: impl std::fmt::Display) -> Self {
        Self::Internal(format!("{what}: {e}"))
    }
}

impl From<CsiError> for tonic::Status {
    fn from(e: CsiError) -> Self {
        use tonic::Code;
        let code = match &e {
            CsiError::InvalidArgument(_) => Code::InvalidArgument,
            CsiError::NotFound(_) => Code::NotFound,
            CsiError::AlreadyExists(_) => Code::AlreadyExists,
            CsiError::FailedPrecondition(_) => Code::FailedPrecondition,
            CsiError::OutOfRange(_) => Code::OutOfRange,
            CsiError::Aborted(_) => Code::Aborted,
            CsiError::ResourceExhausted(_) => Code::ResourceExhausted,
            CsiError::PermissionDenied(_) => Code::PermissionDenied,
            CsiError::Unavailable(_) => Code::Unavailable,
            CsiError::Internal(_) => Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}

impl From<&ClientError> for CsiError {
    /// A failed call to the ferrovol server, by its wire status.
    fn from(e: &ClientError) -> Self {
        let msg = e.to_string();
        match e.status() {
            Some(Wire::NotFound) => CsiError::NotFound(msg),
            Some(Wire::AlreadyExists) => CsiError::AlreadyExists(msg),
            Some(Wire::AttachedElsewhere) | Some(Wire::Busy) | Some(Wire::Fenced) => {
                CsiError::FailedPrecondition(msg)
            }
            Some(Wire::NoSpace) => CsiError::ResourceExhausted(msg),
            Some(Wire::OutOfRange) => CsiError::OutOfRange(msg),
            Some(Wire::InvalidName) | Some(Wire::InvalidArgument) | Some(Wire::TooLarge) => {
                CsiError::InvalidArgument(msg)
            }
            Some(Wire::AuthFailed) | Some(Wire::Forbidden) => CsiError::PermissionDenied(msg),
            Some(Wire::ShuttingDown) | Some(Wire::NotReady) => CsiError::Unavailable(msg),
            Some(_) => CsiError::Internal(msg),
            None => match e {
                ClientError::InvalidArgument(_) => CsiError::InvalidArgument(msg),
                _ => CsiError::Unavailable(msg),
            },
        }
    }
}

impl From<ClientError> for CsiError {
    fn from(e: ClientError) -> Self {
        CsiError::from(&e)
    }
}

pub type CsiResult<T> = Result<T, CsiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let s: tonic::Status = CsiError::not_found("volume v").into();
        assert_eq!((s.code(), s.message()), (tonic::Code::NotFound, "volume v"));
        let s: tonic::Status = CsiError::Aborted("busy".into()).into();
        assert_eq!(s.code(), tonic::Code::Aborted);
    }
}

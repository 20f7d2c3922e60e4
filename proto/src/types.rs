//! Domain newtypes: values that crossed the wire and were validated at the edge.

use std::fmt;

use crate::limits::{NODE_ID_LEN_MAX, VOLUME_NAME_LEN_MAX};

/// Identifies one request on one connection; responses echo it (they may come back out of order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct RequestId(pub u64);

/// A server-side handle for an OPENed volume, valid on the connection that opened it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct VolumeHandle(pub u32);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for VolumeHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is {len} bytes long, the limit is {max}")]
    TooLong { len: usize, max: usize },
    #[error("name contains {0:?}; allowed are lowercase letters, digits and '-'")]
    BadChar(char),
    #[error("name must start and end with a lowercase letter or digit")]
    BadEdge,
    #[error("node id contains a control character, whitespace or is not UTF-8")]
    BadNodeId,
    #[error("label {0:?}: keys are 1-63 bytes of [a-z0-9./_-], values at most 1024 bytes, at most 8 labels")]
    BadLabel(String),
}

/// Small key/value annotations a volume keeps from its creation (the CSI driver keeps the original
/// CSI name and the StorageClass parameters there).
pub type Labels = std::collections::BTreeMap<String, String>;

/// Checks labels against the protocol's limits.
pub fn validate_labels(labels: &Labels) -> Result<(), NameError> {
    use crate::limits::{LABELS_MAX, LABEL_KEY_LEN_MAX, LABEL_VALUE_LEN_MAX};
    if labels.len() > LABELS_MAX {
        return Err(NameError::BadLabel(format!("{} labels", labels.len())));
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= LABEL_KEY_LEN_MAX
            && k.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"./_-".contains(&b));
        if !key_ok || v.len() > LABEL_VALUE_LEN_MAX {
            return Err(NameError::BadLabel(k.clone()));
        }
    }
    Ok(())
}

/// A volume name: 1-63 characters of `[a-z0-9-]`, starting and ending alphanumeric (a Kubernetes DNS
/// label). It is safe as a single path component: it can never be `.`, `..`, contain `/`, or start
/// with `.`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeName(String);

impl VolumeName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for VolumeName {
    type Error = NameError;
    fn try_from(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > VOLUME_NAME_LEN_MAX {
            return Err(NameError::TooLong { len: s.len(), max: VOLUME_NAME_LEN_MAX });
        }
        if let Some(c) = s.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')) {
            return Err(NameError::BadChar(c));
        }
        if s.starts_with('-') || s.ends_with('-') {
            return Err(NameError::BadEdge);
        }
        Ok(Self(s.to_owned()))
    }
}

impl TryFrom<String> for VolumeName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Self::try_from(s.as_str())
    }
}

impl std::str::FromStr for VolumeName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Self::try_from(s)
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Identifies a client node (a Kubernetes node name, a host name): 1-128 bytes of printable UTF-8
/// without whitespace. Used for the writer attachment (fencing).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(String);

impl NodeId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for NodeId {
    type Error = NameError;
    fn try_from(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > NODE_ID_LEN_MAX {
            return Err(NameError::TooLong { len: s.len(), max: NODE_ID_LEN_MAX });
        }
        if s.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(NameError::BadNodeId);
        }
        Ok(Self(s.to_owned()))
    }
}

impl std::str::FromStr for NodeId {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Self::try_from(s)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A UTC timestamp for messages, "2026-12-01 10:04:05 UTC" (civil-from-days, no time crate needed).
pub fn format_unix_ms(ms: u64) -> String {
    if ms == 0 {
        return "an unknown time".into();
    }
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil algorithm, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names() {
        for ok in ["a", "pvc-123", "0abc", &"x".repeat(63)] {
            assert!(VolumeName::try_from(ok).is_ok(), "{ok}");
        }
        assert_eq!(VolumeName::try_from(""), Err(NameError::Empty));
        assert_eq!(VolumeName::try_from("../x"), Err(NameError::BadChar('.')));
        assert_eq!(VolumeName::try_from("a/b"), Err(NameError::BadChar('/')));
        assert_eq!(VolumeName::try_from("."), Err(NameError::BadChar('.')));
        assert_eq!(VolumeName::try_from("Abc"), Err(NameError::BadChar('A')));
        assert_eq!(VolumeName::try_from("-a"), Err(NameError::BadEdge));
        assert_eq!(VolumeName::try_from("a-"), Err(NameError::BadEdge));
        assert_eq!(VolumeName::try_from("a\0"), Err(NameError::BadChar('\0')));
        assert!(matches!(VolumeName::try_from("x".repeat(64).as_str()), Err(NameError::TooLong { .. })));
    }

    #[test]
    fn node_ids() {
        assert!(NodeId::try_from("node-1.example").is_ok());
        assert!(NodeId::try_from("Node_A:7").is_ok());
        assert_eq!(NodeId::try_from(""), Err(NameError::Empty));
        assert_eq!(NodeId::try_from("a b"), Err(NameError::BadNodeId));
        assert_eq!(NodeId::try_from("a\n"), Err(NameError::BadNodeId));
        assert!(NodeId::try_from("n".repeat(129).as_str()).is_err());
    }
}

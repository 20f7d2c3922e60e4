//! CSI volume names (any string up to 128 bytes) to ferrovol volume names (lowercase, digits and '-',
//! up to 63): a readable prefix plus a hash of the whole name, so the mapping is deterministic (the
//! same CreateVolume always lands on the same volume) and distinct names never collide in practice.

use ferrovol_proto::VolumeName;
use sha2::{Digest, Sha256};

/// Longest readable prefix kept from the CSI name.
const PREFIX_MAX: usize = 30;
/// Hex digits of SHA-256 kept (96 bits).
const HASH_HEX: usize = 24;

pub fn volume_name_for(csi_name: &str) -> VolumeName {
    let mut prefix = String::with_capacity(PREFIX_MAX);
    for c in csi_name.chars() {
        if prefix.len() >= PREFIX_MAX {
            break;
        }
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            prefix.push(c);
        } else if !prefix.is_empty() && !prefix.ends_with('-') {
            prefix.push('-');
        }
    }
    let prefix = prefix.trim_end_matches('-');
    let digest = Sha256::digest(csi_name.as_bytes());
    let hash: String = digest.iter().map(|b| format!("{b:02x}")).collect::<String>()[..HASH_HEX].to_owned();
    let name = if prefix.is_empty() { format!("vol-{hash}") } else { format!("{prefix}-{hash}") };
    // Built from [a-z0-9-] without edge dashes and within the length limit: always valid.
    VolumeName::try_from(name.as_str()).unwrap_or_else(|_| unreachable_name(&hash))
}

#[cold]
fn unreachable_name(hash: &str) -> VolumeName {
    VolumeName::try_from(format!("vol-{hash}")).unwrap_or_else(|e| panic!("volume name from a hash: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_valid_and_distinct() {
        let a = volume_name_for("pvc-6f1c2a9e-4b7d-4e0a-9a51-0c9f1b3e7d21");
        assert_eq!(a, volume_name_for("pvc-6f1c2a9e-4b7d-4e0a-9a51-0c9f1b3e7d21"));
        assert!(a.as_str().starts_with("pvc-6f1c2a9e-4b7d-4e0a-9a51-0c"));
        assert_ne!(volume_name_for("Data"), volume_name_for("data"));
        for hostile in ["", "../../etc", "UPPER case ☃", "-", &"x".repeat(128), "\u{0}\n"] {
            let n = volume_name_for(hostile);
            assert!(n.as_str().len() <= 63, "{n}");
        }
        assert!(volume_name_for("☃").as_str().starts_with("vol-"));
    }
}

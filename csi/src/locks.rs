//! One operation per volume at a time: a second concurrent call on the same volume gets ABORTED (the
//! CO retries it), as the spec asks, instead of queueing behind a mount that may take long.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

#[derive(Debug, Clone, Default)]
pub struct VolumeLocks {
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Held while an operation on one volume runs.
#[derive(Debug)]
pub struct VolumeGuard {
    busy: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl VolumeLocks {
    pub fn try_lock(&self, key: &str) -> Result<VolumeGuard, crate::error::CsiError> {
        let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        if !busy.insert(key.to_owned()) {
            return Err(crate::error::CsiError::Aborted(format!(
                "an operation on volume {key} is already in progress"
            )));
        }
        Ok(VolumeGuard { busy: self.busy.clone(), key: key.to_owned() })
    }
}

impl Drop for VolumeGuard {
    fn drop(&mut self) {
        self.busy.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_aborted_until_the_first_is_dropped() {
        let locks = VolumeLocks::default();
        let g = locks.try_lock("a").unwrap();
        assert!(matches!(locks.try_lock("a"), Err(crate::error::CsiError::Aborted(_))));
        assert!(locks.try_lock("b").is_ok());
        drop(g);
        assert!(locks.try_lock("a").is_ok());
    }
}

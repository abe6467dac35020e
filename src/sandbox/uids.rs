//! A pool of unprivileged uids, one per concurrently running job.
//!
//! Two jobs never share a uid, so they cannot signal each other, read each
//! other's scratch dirs, or share an RLIMIT_NPROC count. Several workers on one
//! host share the range: each claims its uids with an exclusive `flock` on
//! `<lock_dir>/<uid>.lock`, held for the worker's lifetime and released by the
//! kernel when the worker dies.

use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum UidError {
    #[error("creating the uid lock dir {path}: {source}")]
    LockDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("only {got} of the {wanted} uids needed are free in {first}-{last} (other workers hold the rest)")]
    Exhausted {
        wanted: usize,
        got: usize,
        first: u32,
        last: u32,
    },
    #[error("the uid range {first}-{last} is invalid: it must be non-empty and above 0")]
    Range { first: u32, last: u32 },
}

struct Claimed {
    uid: u32,
    _lock: Flock<File>,
}

/// The uids this worker holds; `lease` hands out a free one.
#[derive(Clone)]
pub struct UidPool {
    free: Arc<Mutex<Vec<u32>>>,
    _claims: Arc<Vec<Claimed>>,
}

/// A uid in use by one job; returned to the pool on drop.
pub struct UidLease {
    pub uid: u32,
    free: Arc<Mutex<Vec<u32>>>,
    retired: bool,
}

impl UidLease {
    /// Never hand this uid out again (its scratch could not be cleared).
    pub fn retire(mut self) {
        self.retired = true;
    }
}

impl Drop for UidLease {
    fn drop(&mut self) {
        if self.retired {
            return;
        }
        if let Ok(mut free) = self.free.lock() {
            free.push(self.uid);
        }
    }
}

impl UidPool {
    /// Claim `count` uids from `first..=last`.
    pub fn claim(
        lock_dir: &Path,
        first: u32,
        last: u32,
        count: usize,
    ) -> Result<UidPool, UidError> {
        if first == 0 || last < first {
            return Err(UidError::Range { first, last });
        }
        std::fs::create_dir_all(lock_dir).map_err(|source| UidError::LockDir {
            path: lock_dir.to_owned(),
            source,
        })?;
        let mut claims = Vec::with_capacity(count);
        for uid in first..=last {
            if claims.len() == count {
                break;
            }
            let Ok(file) = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(lock_dir.join(format!("{uid}.lock")))
            else {
                continue;
            };
            // Taken by another worker: try the next uid.
            if let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                claims.push(Claimed { uid, _lock: lock });
            }
        }
        if claims.len() < count {
            return Err(UidError::Exhausted {
                wanted: count,
                got: claims.len(),
                first,
                last,
            });
        }
        let free = claims.iter().rev().map(|c| c.uid).collect();
        Ok(UidPool {
            free: Arc::new(Mutex::new(free)),
            _claims: Arc::new(claims),
        })
    }

    /// Every uid this pool holds.
    pub fn all(&self) -> Vec<u32> {
        self._claims.iter().map(|c| c.uid).collect()
    }

    /// A free uid, or `None` when every claimed uid is running a job.
    pub fn lease(&self) -> Option<UidLease> {
        let uid = self.free.lock().ok()?.pop()?;
        Some(UidLease {
            uid,
            free: self.free.clone(),
            retired: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_pools_never_share_a_uid() {
        let dir = std::env::temp_dir().join(format!("sandq-uids-{}", std::process::id()));
        let a = UidPool::claim(&dir, 20000, 20009, 4).unwrap();
        let b = UidPool::claim(&dir, 20000, 20009, 4).unwrap();
        let la: Vec<UidLease> = (0..4).map(|_| a.lease().unwrap()).collect();
        let lb: Vec<UidLease> = (0..4).map(|_| b.lease().unwrap()).collect();
        let mut all: Vec<u32> = la.iter().chain(&lb).map(|l| l.uid).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 8, "every running job has its own uid");
        assert!(a.lease().is_none(), "a pool hands out only what it claimed");
        drop(la);
        assert!(a.lease().is_some(), "a returned uid is leased again");
        assert!(UidPool::claim(&dir, 20000, 20009, 4).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}

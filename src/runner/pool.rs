//! The warm pool: interpreters started ahead of their job, fully locked down.
//!
//! For each (language, network) profile the pool keeps up to `size`
//! interpreters that have gone through the whole spawn path (namespaces, root,
//! cgroup, uid, no_new_privs, Landlock, seccomp, exec) and the prescript's
//! start-up, and now block reading fd 3. A job takes one, its limits are set
//! on it (memory on its cgroup, CPU with prlimit), and its code and stdin are
//! written to it; it runs that one job and exits. Never reused: nothing a job
//! leaves (files, modules, globals) can reach another.
//!
//! One refill thread per pool spawns replacements. It lives as long as the
//! pool because an interpreter's death signal is tied to the thread that
//! cloned it. An interpreter that died while waiting (killed from outside) is
//! found dead on take and replaced.

use super::{RunError, Runner, StartSpec, Started};
use crate::job::{Job, Language};
use crate::sandbox::Sandbox;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A pool profile: language and network.
pub type Profile = (Language, bool);

struct State {
    idle: HashMap<Profile, VecDeque<Started>>,
}

struct Inner {
    sandbox: Arc<Sandbox>,
    size: usize,
    profiles: Vec<Profile>,
    /// Memory the interpreters are started with (Node's heap flag is fixed
    /// at start, so only jobs with this memory_mb can take a Node one).
    memory_mb: u64,
    timeout_ms: u64,
    state: Mutex<State>,
    wake: Condvar,
    stop: AtomicBool,
}

/// Pre-started interpreters, refilled in the background.
pub struct Pool {
    inner: Arc<Inner>,
    refill: Option<JoinHandle<()>>,
}

impl Pool {
    /// Start a pool of `size` per profile. `size` 0 means no pool.
    pub fn start(
        sandbox: Arc<Sandbox>,
        size: usize,
        profiles: Vec<Profile>,
        memory_mb: u64,
        timeout_ms: u64,
    ) -> Pool {
        let inner = Arc::new(Inner {
            sandbox,
            size,
            profiles,
            memory_mb,
            timeout_ms,
            state: Mutex::new(State {
                idle: HashMap::new(),
            }),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let refill = (size > 0).then(|| {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("sandq-pool".into())
                .spawn(move || refill(&inner))
                .ok()
        });
        Pool {
            inner,
            refill: refill.flatten(),
        }
    }

    /// Whether this pool can serve `job` with the limits it asks for.
    pub fn eligible(&self, job: &Job) -> bool {
        self.inner.size > 0
            && self
                .inner
                .profiles
                .contains(&(job.language, job.enable_network))
            && (job.language == Language::Python3 || job.memory_mb == self.inner.memory_mb)
    }

    /// A live pre-started interpreter for `job`, if one is waiting.
    pub fn take(&self, job: &Job) -> Option<Started> {
        if !self.eligible(job) {
            return None;
        }
        let profile = (job.language, job.enable_network);
        let mut dead = Vec::new();
        let found = {
            let mut state = self.inner.state.lock().ok()?;
            let queue = state.idle.get_mut(&profile)?;
            let mut found = None;
            while let Some(s) = queue.pop_front() {
                if s.alive() {
                    found = Some(s);
                    break;
                }
                dead.push(s);
            }
            found
        };
        for s in dead {
            s.discard();
        }
        // No refill here: starting an interpreter now would compete for the
        // CPU with the job that just took one. See `replenish`.
        found
    }

    /// Refill now; called once the job that took an interpreter has ended,
    /// so the two never compete for the CPU on a small machine.
    pub fn replenish(&self) {
        self.inner.wake.notify_one();
    }

    /// Idle interpreters per profile, for the pool-size gauge.
    pub fn sizes(&self) -> Vec<(Profile, usize)> {
        let Ok(state) = self.inner.state.lock() else {
            return Vec::new();
        };
        self.inner
            .profiles
            .iter()
            .map(|p| (*p, state.idle.get(p).map_or(0, VecDeque::len)))
            .collect()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Relaxed);
        self.inner.wake.notify_all();
        if let Some(h) = self.refill.take() {
            let _ = h.join();
        }
        if let Ok(mut state) = self.inner.state.lock() {
            for (_, queue) in state.idle.drain() {
                for s in queue {
                    s.discard();
                }
            }
        }
    }
}

/// The refill loop: top every profile up to `size`, then sleep until a take
/// (or a periodic check for interpreters killed while waiting).
fn refill(inner: &Inner) {
    let runner = Runner {
        sandbox: &inner.sandbox,
    };
    let mut failures = 0u32;
    while !inner.stop.load(Ordering::Relaxed) {
        let wanted = {
            let Ok(mut state) = inner.state.lock() else {
                return;
            };
            for queue in state.idle.values_mut() {
                // Drop the dead so they are replaced.
                let (live, dead): (VecDeque<Started>, VecDeque<Started>) =
                    queue.drain(..).partition(Started::alive);
                *queue = live;
                for s in dead {
                    s.discard();
                }
            }
            inner
                .profiles
                .iter()
                .find(|p| state.idle.get(p).map_or(0, VecDeque::len) < inner.size)
                .copied()
        };
        let Some((language, network)) = wanted else {
            let Ok(state) = inner.state.lock() else {
                return;
            };
            let _ = inner.wake.wait_timeout(state, Duration::from_millis(500));
            continue;
        };
        match runner.start(&StartSpec {
            language,
            network,
            memory_mb: inner.memory_mb,
            timeout_ms: inner.timeout_ms,
            code: None,
        }) {
            Ok(s) => {
                failures = 0;
                if let Ok(mut state) = inner.state.lock() {
                    state
                        .idle
                        .entry((language, network))
                        .or_default()
                        .push_back(s);
                }
            }
            Err(e) => {
                // Out of uids is normal while every slot runs a job; anything
                // else is logged, with backoff so a broken host does not spin.
                if !matches!(e, RunError::NoUid) {
                    tracing::warn!(error = %e, %language, "warm pool could not start an interpreter");
                }
                failures = (failures + 1).min(6);
                std::thread::sleep(Duration::from_millis(25 << failures));
            }
        }
    }
}

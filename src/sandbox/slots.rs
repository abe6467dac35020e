//! One spawning thread per uid, living in that uid's slot cgroup (cgroup v1).
//!
//! A child starts in the cgroups of the thread that cloned it, so cloning each
//! job from a thread that joined the uid's slot cgroup once, at start-up,
//! puts the job in its cgroup with no move at all (see `cgroup`). The thread
//! also outlives every child it clones, which their death signal relies on.
//!
//! Only the clone runs on these threads, and it shares the worker's memory
//! (`spawn::spawn_shared`): the thread is suspended until the child has
//! exec'd, while the caller, on its own thread, receives the child's seccomp
//! listener and lets that exec through ([`Slots::begin`], then
//! [`Pending::wait`]). Each thread blocks every signal and owns the stack its
//! children start on.

use super::cgroup::{CgroupError, Cgroups};
use super::spawn::{self, ChildPlan, SpawnError, Spawned};
use std::collections::HashMap;
use std::io::Write;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::Mutex;

/// A clone request: the plan's address and where to answer.
struct Request {
    /// `*const ChildPlan`, as an address: the requester waits for the answer
    /// (`Pending::wait`, also on its error paths), so the plan outlives its
    /// use on the spawning thread and in the child.
    plan: usize,
    /// `*const AtomicI32` the kernel writes the child's pidfd to, owned by
    /// the requester like `plan`.
    pidfd: usize,
    reply: SyncSender<Result<Spawned, SpawnError>>,
}

/// A clone under way on a slot thread.
pub struct Pending {
    answer: Receiver<Result<Spawned, SpawnError>>,
}

impl Pending {
    /// The child, once it has exec'd or exited (a child stopped short of
    /// exec ends: see `runner::supervise::approve_exec`).
    pub fn wait(self) -> Result<Spawned, SpawnError> {
        self.answer.recv().unwrap_or_else(|_| {
            Err(SpawnError::Clone(std::io::Error::other(
                "the slot thread is gone",
            )))
        })
    }
}

/// The spawning threads, by uid.
pub struct Slots {
    senders: HashMap<u32, Mutex<Sender<Request>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Slots {
    /// Start a thread per uid, each joining its slot cgroup first.
    pub fn start(cgroups: &Cgroups, uids: &[u32]) -> Result<Slots, CgroupError> {
        let mut senders = HashMap::new();
        let mut joined = Vec::new();
        let mut threads = Vec::new();
        for &uid in uids {
            let dirs = cgroups.slot_dirs(uid)?;
            let (tx, rx) = mpsc::channel::<Request>();
            let (ready_tx, ready_rx) = mpsc::sync_channel(1);
            let thread = std::thread::Builder::new()
                .name(format!("sandq-slot-{uid}"))
                .spawn(move || {
                    // This thread only: `tasks` moves one thread, not the process.
                    // SAFETY: gettid has no arguments and cannot fail.
                    let tid = unsafe { libc::gettid() };
                    let joined = dirs.iter().try_for_each(|dir| {
                        let tasks = dir.join("tasks");
                        std::fs::OpenOptions::new()
                            .write(true)
                            .open(&tasks)
                            .and_then(|mut f| f.write_all(tid.to_string().as_bytes()))
                            .map_err(|source| CgroupError::Io {
                                path: tasks,
                                source,
                            })
                    });
                    let ok = joined.is_ok();
                    let _ = ready_tx.send(joined);
                    if ok {
                        serve(rx);
                    }
                })
                .map_err(|source| CgroupError::Io {
                    path: "thread".into(),
                    source,
                })?;
            threads.push(thread);
            joined.push(ready_rx);
            senders.insert(uid, Mutex::new(tx));
        }
        for ready in joined {
            ready
                .recv()
                .map_err(|_| CgroupError::Unavailable("a slot thread died".into()))??;
        }
        Ok(Slots { senders, threads })
    }

    /// Start cloning `plan` on `uid`'s thread; `None` when `uid` has none.
    /// The caller must keep `plan` and `pidfd` alive and call
    /// [`Pending::wait`] before dropping them.
    pub fn begin(
        &self,
        uid: u32,
        plan: &ChildPlan<'_>,
        pidfd: &std::sync::atomic::AtomicI32,
    ) -> Option<Pending> {
        let sender = self.senders.get(&uid)?.lock().ok()?.clone();
        let (reply, answer) = mpsc::sync_channel(1);
        let request = Request {
            plan: plan as *const ChildPlan<'_> as usize,
            pidfd: pidfd as *const std::sync::atomic::AtomicI32 as usize,
            reply,
        };
        sender.send(request).ok()?;
        Some(Pending { answer })
    }
}

impl Drop for Slots {
    /// Close the channels and wait for the threads to end, so that the slot
    /// cgroups are empty and can be removed.
    fn drop(&mut self) {
        self.senders.clear();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// The children's stack: 256 KiB (the lock-down needs a few), with a guard
/// page below it so an overflow faults instead of writing into the worker's
/// memory, which the child shares.
struct ChildStack {
    base: *mut libc::c_void,
    len: usize,
}

const STACK: usize = 256 * 1024;
const GUARD: usize = 4096;

impl ChildStack {
    fn new() -> std::io::Result<ChildStack> {
        let len = STACK + GUARD;
        // SAFETY: a fresh private anonymous mapping; checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let stack = ChildStack { base, len };
        // SAFETY: the lowest page of the mapping we own.
        if unsafe { libc::mprotect(base, GUARD, libc::PROT_NONE) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stack)
    }

    fn usable(&mut self) -> &mut [u8] {
        // SAFETY: the mapping above the guard page is ours, read-write, and
        // only lent out for one clone at a time.
        unsafe { std::slice::from_raw_parts_mut(self.base.cast::<u8>().add(GUARD), STACK) }
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping; no child runs on it any more.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

fn serve(requests: Receiver<Request>) {
    // No signal handler may run in a child that shares our memory: block
    // them all on this thread, which the child inherits (spawn, step 1).
    // SAFETY: sigfillset and pthread_sigmask on a local set.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
    }
    let mut stack = match ChildStack::new() {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "no stack for shared-memory clones; forking instead");
            None
        }
    };
    for request in requests {
        // SAFETY: the requester sent the addresses of a live ChildPlan and
        // AtomicI32 and waits for `reply` before dropping them.
        let (plan, pidfd) = unsafe {
            (
                &*(request.plan as *const ChildPlan<'_>),
                &*(request.pidfd as *const std::sync::atomic::AtomicI32),
            )
        };
        let spawned = match stack.as_mut() {
            Some(stack) => spawn::spawn_shared(plan, stack.usable(), pidfd),
            None => spawn::spawn(plan),
        };
        if spawned.is_err() {
            // No child: wake the requester, who waits for one on the other
            // end of this socket, at once instead of at its timeout.
            // SAFETY: shutdown(2) of a socket the requester keeps open.
            unsafe { libc::shutdown(plan.control, libc::SHUT_RDWR) };
        }
        let _ = request.reply.send(spawned);
    }
}

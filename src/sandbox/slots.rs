//! One spawning thread per uid, living in that uid's slot cgroup (cgroup v1).
//!
//! A child starts in the cgroups of the thread that cloned it, so cloning each
//! job from a thread that joined the uid's slot cgroup once, at start-up,
//! puts the job in its cgroup with no move at all (see `cgroup`). The thread
//! also outlives every child it clones, which their death signal relies on.
//!
//! Only `spawn::spawn` runs on these threads; everything else of a run stays
//! on the caller's thread, which blocks until the clone is done.

use super::cgroup::{CgroupError, Cgroups};
use super::spawn::{self, ChildPlan, SpawnError, Spawned};
use std::collections::HashMap;
use std::io::Write;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::Mutex;

/// A clone request: the plan's address and where to answer.
struct Request {
    /// `*const ChildPlan`, as an address: the requester blocks until the
    /// answer comes, so the plan outlives its use on the spawning thread.
    plan: usize,
    reply: SyncSender<Result<Spawned, SpawnError>>,
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

    /// Clone `plan` from `uid`'s thread. `None` when `uid` has none.
    pub fn spawn(&self, uid: u32, plan: &ChildPlan<'_>) -> Option<Result<Spawned, SpawnError>> {
        let sender = self.senders.get(&uid)?.lock().ok()?.clone();
        let (reply, answer) = mpsc::sync_channel(1);
        let request = Request {
            plan: plan as *const ChildPlan<'_> as usize,
            reply,
        };
        sender.send(request).ok()?;
        // Blocking here keeps `plan` alive until the thread is done with it.
        answer.recv().ok()
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

fn serve(requests: Receiver<Request>) {
    for request in requests {
        // SAFETY: the requester sent the address of a live ChildPlan and is
        // blocked on `reply` until we answer, so the plan is valid meanwhile.
        let plan = unsafe { &*(request.plan as *const ChildPlan<'_>) };
        let _ = request.reply.send(spawn::spawn(plan));
    }
}

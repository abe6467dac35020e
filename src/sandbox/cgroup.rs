//! Per-job memory and pids limits through cgroups, v2 or v1, whichever the host has.
//!
//! On cgroup v1, each uid of the worker has a slot cgroup under
//! `<hierarchy>/sandq/<worker>/uid-<uid>` for the worker's lifetime, and the
//! thread that spawns that uid's jobs is a member of it (`sandbox::slots`):
//! a child is born in it, and the limits are set per job. Moving a task into
//! a v1 cgroup waits for an RCU grace period and stalls every fork and thread
//! creation on the host meanwhile, which a per-job move would pay every time.
//! Elsewhere each job gets a cgroup of its own under `<...>/sandq/<worker>/`,
//! made before the spawn, removed after the reap, and the parent moves the
//! child in after exec (see `sandbox::spawn`, step 4). A kill by the memory controller is read back from `oom_kill` in
//! `memory.events` (v2) or `memory.oom_control` (v1) to report `memory_limit`.
//! Only cgroups this worker created are ever touched.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy: {0}")]
    Unavailable(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_err(path))
}

/// Which hierarchy the host has.
#[derive(Debug)]
pub enum Cgroups {
    /// Unified hierarchy: one directory holds memory and pids.
    V2 { base: PathBuf },
    /// Legacy: a directory per controller.
    V1 { memory: PathBuf, pids: PathBuf },
}

impl Cgroups {
    /// Detect the hierarchy and create this worker's parent group(s), named
    /// `<pid>-<tag>`; groups left by dead workers (their pid gone) are removed.
    pub fn detect(tag: &str) -> Result<Cgroups, CgroupError> {
        let worker_tag = format!("{}-{tag}", std::process::id());
        let worker_tag = worker_tag.as_str();
        let root = Path::new("/sys/fs/cgroup");
        let v1_memory = root.join("memory");
        let v1_pids = root.join("pids");
        if v1_memory.join("memory.limit_in_bytes").exists() && v1_pids.join("cgroup.procs").exists()
        {
            remove_stale(&v1_memory.join("sandq"));
            remove_stale(&v1_pids.join("sandq"));
            let memory = v1_memory.join("sandq").join(worker_tag);
            let pids = v1_pids.join("sandq").join(worker_tag);
            fs::create_dir_all(&memory).map_err(io_err(&memory))?;
            fs::create_dir_all(&pids).map_err(io_err(&pids))?;
            return Ok(Cgroups::V1 { memory, pids });
        }
        let controllers = fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        if controllers.contains("memory") && controllers.contains("pids") {
            // Each level must delegate memory and pids to the next one.
            let sandq = root.join("sandq");
            fs::create_dir_all(&sandq).map_err(io_err(&sandq))?;
            remove_stale(&sandq);
            write(&root.join("cgroup.subtree_control"), "+memory +pids")?;
            let base = sandq.join(worker_tag);
            fs::create_dir_all(&base).map_err(io_err(&base))?;
            write(&sandq.join("cgroup.subtree_control"), "+memory +pids")?;
            write(&base.join("cgroup.subtree_control"), "+memory +pids")?;
            return Ok(Cgroups::V2 { base });
        }
        Err(CgroupError::Unavailable(
            "neither cgroup v1 memory+pids nor cgroup v2 with memory and pids controllers is mounted at /sys/fs/cgroup".into(),
        ))
    }

    pub fn version(&self) -> &'static str {
        match self {
            Cgroups::V2 { .. } => "v2",
            Cgroups::V1 { .. } => "v1",
        }
    }

    /// Make a job's cgroup with its limits (the per-job layout; see `slot`
    /// for cgroup v1).
    pub fn create(
        &self,
        name: &str,
        memory_bytes: u64,
        pids: u64,
    ) -> Result<JobCgroup, CgroupError> {
        let dirs: Vec<PathBuf> = match self {
            Cgroups::V2 { base } => vec![base.join(name)],
            Cgroups::V1 { memory, pids } => vec![memory.join(name), pids.join(name)],
        };
        for dir in &dirs {
            fs::create_dir(dir).map_err(io_err(dir))?;
        }
        let mut job = JobCgroup {
            v2: matches!(self, Cgroups::V2 { .. }),
            dirs,
            procs: Vec::new(),
            slot: None,
        };
        job.set_memory(memory_bytes)?;
        if job.v2 {
            // No swap: a job over its memory is killed, not paged out.
            let _ = write(&job.dirs[0].join("memory.swap.max"), "0");
        }
        job.set_pids(pids)?;
        for dir in &job.dirs {
            let path = dir.join("cgroup.procs");
            let file = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)
                .map_err(io_err(&path))?;
            job.procs.push(file);
        }
        Ok(job)
    }

    /// The directories of uid `uid`'s slot: a cgroup that lives as long as
    /// the worker, which the thread that spawns that uid's jobs joins once
    /// (cgroup v1 only; see `sandbox::slots`). Created on first use.
    pub fn slot_dirs(&self, uid: u32) -> Result<Vec<PathBuf>, CgroupError> {
        let dirs = self.slot_paths(uid)?;
        for dir in &dirs {
            if !dir.exists() {
                fs::create_dir(dir).map_err(io_err(dir))?;
            }
        }
        Ok(dirs)
    }

    /// Where uid `uid`'s slot groups are (memory, pids), made or not.
    fn slot_paths(&self, uid: u32) -> Result<Vec<PathBuf>, CgroupError> {
        let Cgroups::V1 { memory, pids } = self else {
            return Err(CgroupError::Unavailable("slots need cgroup v1".into()));
        };
        let name = format!("uid-{uid}");
        Ok(vec![memory.join(&name), pids.join(&name)])
    }

    /// Limits for one job in uid `uid`'s slot cgroup, with the counters read
    /// now so that the report covers this job only.
    pub fn job_in_slot(
        &self,
        uid: u32,
        memory_bytes: u64,
        pids: u64,
    ) -> Result<JobCgroup, CgroupError> {
        // Made by `slot_dirs` when the slot's thread started.
        let dirs = self.slot_paths(uid)?;
        let mut job = JobCgroup {
            v2: false,
            dirs,
            procs: Vec::new(),
            slot: Some(Baseline::default()),
        };
        job.set_memory(memory_bytes)?;
        // The spawning thread itself is a member of the pids group.
        job.set_pids(pids + 1)?;
        job.slot = Some(job.counters());
        Ok(job)
    }
}

/// Remove the groups of workers that no longer run (a SIGKILLed worker cannot
/// clean up; its jobs died with it through their death signal).
fn remove_stale(parent: &Path) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        // Alive only if that pid is still a sandq process (pids are reused).
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "sandq" {
            continue;
        }
        remove_tree(&entry.path());
    }
}

/// Remove a worker's group and the job or slot groups in it (empty ones
/// only: the kernel refuses to remove a group with processes in it).
fn remove_tree(dir: &Path) {
    if let Ok(children) = fs::read_dir(dir) {
        for child in children.flatten().filter(|c| c.path().is_dir()) {
            let _ = fs::remove_dir(child.path());
        }
    }
    let _ = fs::remove_dir(dir);
}

/// One job's cgroup(s): its own, removed when dropped, or its uid's slot
/// (`slot` holds the counters at the job's start), which stays.
pub struct JobCgroup {
    v2: bool,
    dirs: Vec<PathBuf>,
    procs: Vec<File>,
    slot: Option<Baseline>,
}

/// Event counters of a slot cgroup when a job started.
#[derive(Debug, Default, Clone, Copy)]
struct Baseline {
    oom_kills: u64,
    pids_max_hits: u64,
}

/// What the cgroup saw of a finished job.
#[derive(Debug, Default, Clone, Copy)]
pub struct CgroupReport {
    pub oom_killed: bool,
    pub peak_memory_bytes: Option<u64>,
    pub pids_limit_hit: bool,
}

fn read_key(path: &Path, key: &str) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

impl JobCgroup {
    /// Move process `pid` (all its threads) into the job's cgroup(s). A job
    /// in a slot is there already: it was cloned by the slot's thread.
    pub fn attach(&self, pid: libc::pid_t) -> Result<(), CgroupError> {
        let value = pid.to_string();
        for (file, dir) in self.procs.iter().zip(&self.dirs) {
            (&*file)
                .write_all(value.as_bytes())
                .map_err(io_err(&dir.join("cgroup.procs")))?;
        }
        Ok(())
    }

    fn set_pids(&self, pids: u64) -> Result<(), CgroupError> {
        let dir = self.dirs.last().unwrap_or(&self.dirs[0]);
        write(&dir.join("pids.max"), &pids.to_string())
    }

    fn counters(&self) -> Baseline {
        let mem = &self.dirs[0];
        let pids = self.dirs.last().unwrap_or(mem);
        let oom = if self.v2 {
            read_key(&mem.join("memory.events"), "oom_kill")
        } else {
            read_key(&mem.join("memory.oom_control"), "oom_kill")
        };
        Baseline {
            oom_kills: oom.unwrap_or(0),
            pids_max_hits: read_key(&pids.join("pids.events"), "max").unwrap_or(0),
        }
    }

    /// Change the memory limit (a pre-started interpreter taking a job).
    pub fn set_memory(&self, bytes: u64) -> Result<(), CgroupError> {
        let dir = &self.dirs[0];
        if self.v2 {
            return write(&dir.join("memory.max"), &bytes.to_string());
        }
        // v1 refuses a memsw limit below the memory limit and vice versa:
        // order the two writes by direction.
        let mem = dir.join("memory.limit_in_bytes");
        let memsw = dir.join("memory.memsw.limit_in_bytes");
        let current: u64 = fs::read_to_string(&mem)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if current == bytes {
            // The usual case for a slot: the last job had the same limit.
            return Ok(());
        }
        let value = bytes.to_string();
        if bytes >= current {
            if memsw.exists() {
                write(&memsw, &value)?;
            }
            write(&mem, &value)
        } else {
            write(&mem, &value)?;
            if memsw.exists() {
                write(&memsw, &value)?;
            }
            Ok(())
        }
    }

    pub fn report(&self) -> CgroupReport {
        let mem = &self.dirs[0];
        let now = self.counters();
        let base = self.slot.unwrap_or_default();
        // A slot's peak also counts page cache earlier jobs left charged to
        // it, so only a job's own group reports one (the reap's rusage still
        // gives the job's peak RSS).
        let peak_file = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        let peak_memory_bytes = match self.slot {
            Some(_) => None,
            None => fs::read_to_string(mem.join(peak_file))
                .ok()
                .and_then(|s| s.trim().parse().ok()),
        };
        CgroupReport {
            oom_killed: now.oom_kills > base.oom_kills,
            peak_memory_bytes,
            pids_limit_hit: now.pids_max_hits > base.pids_max_hits,
        }
    }
}

impl Drop for JobCgroup {
    fn drop(&mut self) {
        if self.slot.is_some() {
            return;
        }
        self.procs.clear();
        for dir in &self.dirs {
            // Right after the reap the kernel may still hold the group briefly.
            for attempt in 0..50 {
                match fs::remove_dir(dir) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 49 => {
                        std::thread::sleep(std::time::Duration::from_millis(2));
                    }
                    _ => break,
                }
            }
        }
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        let dirs = match self {
            Cgroups::V2 { base } => vec![base.clone()],
            Cgroups::V1 { memory, pids } => vec![memory.clone(), pids.clone()],
        };
        for dir in dirs {
            remove_tree(&dir);
        }
    }
}

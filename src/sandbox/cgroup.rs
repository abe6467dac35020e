//! Per-job memory and pids limits through cgroups, v2 or v1, whichever the host has.
//!
//! On cgroup v1, each uid of the worker has a slot cgroup under
//! `<hierarchy>/sandq/<worker>/uid-<uid>` for the worker's lifetime, and the
//! thread that spawns that uid's jobs is a member of it (`sandbox::slots`):
//! a child is born in it, and the limits are set per job. Moving a task into
//! a v1 cgroup waits for an RCU grace period and stalls every fork and thread
//! creation on the host meanwhile, which a per-job move would pay every time.
//!
//! On cgroup v2 each job gets a group of its own, made before the spawn and
//! removed after the reap, and is born in it (`CLONE_INTO_CGROUP`, see
//! `sandbox::spawn`, step 4). The groups live under the worker's own group
//! (where a container's cgroup namespace or a systemd unit with
//! `Delegate=yes` puts it), never above it: `<own>/sandq/<worker>/job-<n>`.
//! v2 lets a group hand controllers to its children only while it holds no
//! process itself, so the worker first moves the processes of its own group
//! (itself, and in a container its init) into a leaf, `<own>/sandq-worker`,
//! then enables `+memory +pids` below `<own>`. Only at the hierarchy's real
//! root, which that rule exempts, does everything stay where it is. A worker
//! that finds itself in such a leaf already (several workers in one
//! container or unit) uses the leaf's parent as its own group.
//!
//! A kill by the memory controller is read back from `oom_kill` in
//! `memory.events` (v2) or `memory.oom_control` (v1) to report
//! `memory_limit`. Only cgroups this worker created are ever removed.

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
    /// Unified hierarchy: one directory holds memory and pids. `born_in`:
    /// the kernel starts a child in its group (`CLONE_INTO_CGROUP`).
    V2 { base: PathBuf, born_in: bool },
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
        if root.join("cgroup.controllers").exists() {
            return v2(root, worker_tag);
        }
        Err(CgroupError::Unavailable(
            "neither cgroup v1 memory+pids nor cgroup v2 is mounted at /sys/fs/cgroup".into(),
        ))
    }

    /// The hierarchy and how a job joins its group, for the layer report.
    pub fn describe(&self) -> String {
        match self {
            Cgroups::V2 { base, born_in } => format!(
                "cgroup v2 under {}, {}",
                base.display(),
                if *born_in {
                    "jobs born in their group"
                } else {
                    "jobs moved in after exec (no CLONE_INTO_CGROUP before Linux 5.7)"
                }
            ),
            Cgroups::V1 { .. } => "cgroup v1, jobs born in their uid's group".into(),
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
            Cgroups::V2 { base, .. } => vec![base.join(name)],
            Cgroups::V1 { memory, pids } => vec![memory.join(name), pids.join(name)],
        };
        for dir in &dirs {
            fs::create_dir(dir).map_err(io_err(dir))?;
        }
        let mut job = JobCgroup {
            v2: matches!(self, Cgroups::V2 { .. }),
            dirs,
            procs: Vec::new(),
            birth: None,
            slot: None,
        };
        job.set_memory(memory_bytes)?;
        if job.v2 {
            // No swap: a job over its memory is killed, not paged out.
            let _ = write(&job.dirs[0].join("memory.swap.max"), "0");
            // An OOM kill takes the whole job, not one thread of it.
            let _ = write(&job.dirs[0].join("memory.oom.group"), "1");
        }
        job.set_pids(pids)?;
        if let Cgroups::V2 { born_in: true, .. } = self {
            job.birth = Some(open_dir(&job.dirs[0])?);
            return Ok(job);
        }
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
            birth: None,
            slot: Some(Baseline::default()),
        };
        job.set_memory(memory_bytes)?;
        // The spawning thread itself is a member of the pids group.
        job.set_pids(pids + 1)?;
        job.slot = Some(job.counters());
        Ok(job)
    }
}

/// The name of the leaf the worker's own processes move into on cgroup v2.
pub const WORKER_LEAF: &str = "sandq-worker";

/// Set up cgroup v2 below this process's own group (see the module doc).
fn v2(root: &Path, worker_tag: &str) -> Result<Cgroups, CgroupError> {
    let mut own = own_group(root)?;
    make_writable(root)?;
    // A worker already in a leaf (moved there by another worker of the same
    // container or unit, or started by a process that was) shares that
    // worker's group: nesting a leaf in the leaf would leave the new level
    // without controllers.
    if own.file_name().is_some_and(|n| n == WORKER_LEAF) {
        if let Some(parent) = own.parent().filter(|p| p.starts_with(root)) {
            own = parent.to_owned();
        }
    }
    // The real root has no `cgroup.type`; a cgroup namespace's root, a
    // container's view, is an ordinary group and has one.
    let at_real_root = own == root && !root.join("cgroup.type").exists();
    let wanted = ["memory", "pids"];
    let offered = fs::read_to_string(own.join("cgroup.controllers")).unwrap_or_default();
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|c| !offered.split_whitespace().any(|o| o == *c))
        .collect();
    if !missing.is_empty() {
        return Err(CgroupError::Unavailable(format!(
            "the {} controller(s) are not delegated to this worker's cgroup {} (it offers: {:?}): \
             run it in a container with its own cgroup namespace and a writable /sys/fs/cgroup, \
             or under a systemd unit with Delegate=yes",
            missing.join(" and "),
            own.display(),
            offered.trim()
        )));
    }
    // Each level hands memory and pids to the next one.
    if at_real_root {
        write(&own.join("cgroup.subtree_control"), "+memory +pids")?;
    } else {
        hand_controllers_down(&own)?;
    }
    let sandq = own.join("sandq");
    fs::create_dir_all(&sandq).map_err(io_err(&sandq))?;
    remove_stale(&sandq);
    write(&sandq.join("cgroup.subtree_control"), "+memory +pids")?;
    let base = sandq.join(worker_tag);
    fs::create_dir_all(&base).map_err(io_err(&base))?;
    write(&base.join("cgroup.subtree_control"), "+memory +pids")?;
    let born_in = probe_birth(&base);
    Ok(Cgroups::V2 { base, born_in })
}

/// Container runtimes (containerd and CRI-O under Kubernetes, Docker, podman
/// without `--privileged`) mount a private cgroup namespace's tree read-only.
/// The worker holds CAP_SYS_ADMIN for its jails anyway, so it remounts the
/// tree read-write, in its own mount namespace only. This widens nothing:
/// the namespace shows only the container's own subtree, and the kernel
/// (`nsdelegate`) still refuses writes to the limits of the namespace's
/// root, which the host set.
fn make_writable(root: &Path) -> Result<(), CgroupError> {
    use nix::mount::{mount, MsFlags};
    use nix::unistd::{access, AccessFlags};
    match access(root, AccessFlags::W_OK) {
        Err(nix::errno::Errno::EROFS) => {}
        _ => return Ok(()),
    }
    // Only a cgroup namespace's root (an ordinary group, so it has a
    // `cgroup.type`) is a container's private view. The real hierarchy
    // mounted read-only is the operator's choice, or the host's mount:
    // leave it alone and say what to do.
    if !root.join("cgroup.type").exists() {
        return Err(CgroupError::Unavailable(format!(
            "{} is mounted read-only: mount it read-write, or give the worker a \
             cgroup namespace of its own (the container default on cgroup v2)",
            root.display()
        )));
    }
    let keep = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    // A remount clears the read-only flag of both the mount and the
    // superblock; where the runtime made it a read-only bind instead, only
    // the bind's flag is to clear.
    mount(
        None::<&str>,
        root,
        None::<&str>,
        MsFlags::MS_REMOUNT | keep,
        None::<&str>,
    )
    .or_else(|_| {
        mount(
            None::<&str>,
            root,
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | keep,
            None::<&str>,
        )
    })
    .map_err(|e| {
        CgroupError::Unavailable(format!(
            "{} is mounted read-only and cannot be remounted read-write ({e}): \
                 give the container CAP_SYS_ADMIN, or mount the cgroup tree read-write",
            root.display()
        ))
    })?;
    tracing::info!(path = %root.display(), "remounted the cgroup tree read-write");
    Ok(())
}

/// This process's cgroup v2 group, from `/proc/self/cgroup` (`0::/path`,
/// relative to the cgroup namespace, as `/sys/fs/cgroup` shows it).
fn own_group(root: &Path) -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/cgroup");
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    let relative = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| {
            CgroupError::Unavailable("no cgroup v2 entry in /proc/self/cgroup".into())
        })?;
    let own = root.join(relative.trim().trim_start_matches('/'));
    if own.join("cgroup.procs").exists() {
        Ok(own)
    } else {
        Err(CgroupError::Unavailable(format!(
            "this worker's cgroup {} is not visible under {} (a container without its own cgroup namespace?)",
            relative.trim(),
            root.display()
        )))
    }
}

/// Empty `own` into its leaf and enable memory and pids for its children.
/// A process that lands in `own` meanwhile (a sibling started by a process
/// not yet moved, another worker of the same group starting) makes the
/// enable fail with EBUSY: empty it again and retry, a bounded number of
/// times.
fn hand_controllers_down(own: &Path) -> Result<(), CgroupError> {
    let control = own.join("cgroup.subtree_control");
    let mut tries = 0;
    loop {
        take_own_group(own)?;
        match fs::write(&control, "+memory +pids") {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 20 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10 * tries));
            }
            other => return other.map_err(io_err(&control)),
        }
    }
}

/// Move every process of `own` into its leaf `WORKER_LEAF`, so that `own`
/// holds none and may hand controllers to its children ("no internal
/// processes"). In a container these are the worker and its init; under a
/// systemd unit, the unit's processes. A process that exits meanwhile is
/// skipped.
fn take_own_group(own: &Path) -> Result<(), CgroupError> {
    let leaf = own.join(WORKER_LEAF);
    if !leaf.exists() {
        fs::create_dir(&leaf).map_err(io_err(&leaf))?;
    }
    let procs = own.join("cgroup.procs");
    let target = leaf.join("cgroup.procs");
    let listed = fs::read_to_string(&procs).map_err(io_err(&procs))?;
    for pid in listed.split_whitespace() {
        match fs::write(&target, pid) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            other => other.map_err(io_err(&target))?,
        }
    }
    Ok(())
}

/// Open a group's directory, for `CLONE_INTO_CGROUP`.
fn open_dir(dir: &Path) -> Result<std::os::fd::OwnedFd, CgroupError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)
        .map_err(io_err(dir))?;
    Ok(file.into())
}

/// Whether the kernel starts a child in a given group: clone one into a
/// scratch group under `base` (it exits at once).
fn probe_birth(base: &Path) -> bool {
    let probe = base.join("probe");
    if fs::create_dir(&probe).is_err() {
        return false;
    }
    let born = open_dir(&probe).is_ok_and(|dir| {
        super::spawn::probe_into(0, Some(std::os::fd::AsRawFd::as_raw_fd(&dir))).is_ok()
    });
    let _ = fs::remove_dir(&probe);
    born
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
    /// `cgroup.procs` of each directory, where the child is moved in after exec.
    procs: Vec<File>,
    /// The group's directory, where the child is born in it instead.
    birth: Option<std::os::fd::OwnedFd>,
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
    /// The directory to clone the child into (`CLONE_INTO_CGROUP`), where
    /// the kernel does that.
    pub fn birth_dir(&self) -> Option<std::os::fd::RawFd> {
        self.birth.as_ref().map(std::os::fd::AsRawFd::as_raw_fd)
    }

    /// Move process `pid` (all its threads) into the job's cgroup(s). A job
    /// in a slot, or born in its group, is there already (nothing to do).
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
        self.birth = None;
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
            Cgroups::V2 { base, .. } => vec![base.clone()],
            Cgroups::V1 { memory, pids } => vec![memory.clone(), pids.clone()],
        };
        for dir in dirs {
            remove_tree(&dir);
            // The `sandq` group above, if no other worker uses it.
            if let Some(parent) = dir.parent() {
                let _ = fs::remove_dir(parent);
            }
        }
    }
}

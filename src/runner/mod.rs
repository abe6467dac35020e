//! The parent side of a run: prepare, spawn, supervise, classify. No Redis.
//!
//! [`Runner::run`] is blocking and runs on a thread of its own for the whole
//! job (the child's death signal is tied to the thread that cloned it). One
//! `poll` loop on that thread serves everything the job needs: stdin in,
//! stdout/stderr out (each capped), the seccomp listener (naming and stopping
//! violations), the pidfd (exit) and the wall-clock deadline.
//!
//! A user's code failing is not an error here: it is an [`Outcome`] with a
//! status. [`RunError`] is for the sandbox failing to start the job.

pub mod egress;
pub mod pool;
mod prescript;
mod supervise;

use crate::job::{Job, Language, Status, Violation};
use crate::sandbox::rootfs::RootMode;
use crate::sandbox::spawn::{self, ChildPlan, RootPlan};
use crate::sandbox::Sandbox;
use nix::fcntl::OFlag;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::unistd::pipe2;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

pub use supervise::Usage;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("no free sandbox uid (more jobs than slots)")]
    NoUid,
    #[error("preparing the job's scratch dir: {0}")]
    Scratch(#[from] crate::sandbox::rootfs::RootError),
    #[error("creating the job's cgroup: {0}")]
    Cgroup(#[from] crate::sandbox::cgroup::CgroupError),
    #[error("{step}: {source}")]
    Io {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Spawn(#[from] spawn::SpawnError),
    #[error("the sandboxed interpreter did not start: {0}")]
    Handshake(String),
    #[error("this host gives jobs no network namespace, so network jobs cannot be isolated from the worker's network; they are refused")]
    NoNetworkIsolation,
}

fn io(step: &'static str) -> impl FnOnce(std::io::Error) -> RunError {
    move |source| RunError::Io { step, source }
}

fn nix_io(step: &'static str) -> impl FnOnce(nix::Error) -> RunError {
    move |e| RunError::Io {
        step,
        source: e.into(),
    }
}

/// Per-run options that are not part of the job.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Cap per stream, in bytes.
    pub output_limit: usize,
    /// Learning mode: let unlisted syscalls through and record them.
    pub learn: bool,
    /// A fd that turns readable (or hangs up) when the job must be stopped
    /// (the worker's shutdown kill switch).
    pub cancel: Option<std::os::fd::RawFd>,
    /// Where jobs with network may connect (through the egress relay).
    pub egress: std::sync::Arc<egress::EgressPolicy>,
}

/// How a run ended, with everything the result reports.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: Status,
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    pub stdout: String,
    pub stderr: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub error: Option<String>,
    pub violation: Option<Violation>,
    /// Wall time from handing the job over (exec done, or the code written
    /// to a pre-started interpreter) to its exit.
    pub duration: Duration,
    /// From clone to exec done (for a pre-started interpreter: when it was
    /// started, ahead of the job).
    pub spawn_duration: Duration,
    pub usage: Usage,
    /// Learning mode: unlisted syscalls the job made, in first-seen order.
    pub unlisted: Vec<String>,
    /// Stopped through `RunOptions::cancel`: the result means nothing.
    pub cancelled: bool,
}

/// Runs jobs in a prepared [`Sandbox`].
pub struct Runner<'a> {
    pub sandbox: &'a Sandbox,
}

/// A NUL-free C string from Rust text (paths and fixed flags).
fn cstring(s: impl Into<Vec<u8>>) -> Result<CString, RunError> {
    CString::new(s).map_err(|e| RunError::Io {
        step: "building argv",
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
    })
}

fn rlimit(cur: u64, max: u64) -> libc::rlimit {
    libc::rlimit {
        rlim_cur: cur,
        rlim_max: max,
    }
}

/// What an interpreter is started for.
pub struct StartSpec<'a> {
    pub language: Language,
    pub network: bool,
    pub memory_mb: u64,
    pub timeout_ms: u64,
    /// `(preload, code)` rendered into the script (a cold start), or `None`
    /// for an interpreter started ahead of its job, which reads them from
    /// fd 3 when the job arrives (the warm pool).
    pub code: Option<(&'a str, &'a str)>,
}

/// A locked-down interpreter, exec done, waiting on fd 3 (or reading it).
pub struct Started {
    child: spawn::Spawned,
    listener: OwnedFd,
    relay: Option<OwnedFd>,
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
    /// Write end of fd 3.
    payload: OwnedFd,
    rendered: prescript::Rendered,
    cgroup: Option<crate::sandbox::cgroup::JobCgroup>,
    // Dropped after the cgroup and the process: the scratch dir is emptied,
    // then the uid goes back to the pool.
    scratch: crate::sandbox::rootfs::Scratch,
    pub language: Language,
    pub network: bool,
    pub memory_mb: u64,
    /// Started without code (the warm pool): the code goes on fd 3.
    pub pre_started: bool,
    spawn_duration: Duration,
}

impl Started {
    /// Whether the interpreter is still alive (a pre-started one may have
    /// been killed from outside while it waited).
    pub fn alive(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.child.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd on the stack, zero timeout.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n == 0
    }

    /// Kill and reap it (a discarded pool entry).
    pub fn discard(self) {
        supervise::kill_and_reap(&self.child);
    }
}

impl Runner<'_> {
    /// Run one job from start to end in a freshly started interpreter.
    pub fn run(&self, job: &Job, opts: &RunOptions) -> Result<Finished, RunError> {
        let started = self.start(&StartSpec {
            language: job.language,
            network: job.enable_network,
            memory_mb: job.memory_mb,
            timeout_ms: job.timeout_ms,
            code: Some((&job.preload, &job.code)),
        })?;
        self.finish(started, job, opts)
    }

    /// Start a locked-down interpreter: everything up to and including exec.
    pub fn start(&self, spec: &StartSpec<'_>) -> Result<Started, RunError> {
        let sb = self.sandbox;
        if spec.network && !sb.net_namespace {
            return Err(RunError::NoNetworkIsolation);
        }
        let t0 = Instant::now();
        let lease = sb.uids.lease().ok_or(RunError::NoUid)?;
        let (uid, gid) = (lease.uid, lease.uid);
        // Holds the uid from here on, and gives it back once its files are gone.
        let scratch = sb.root.scratch(lease)?;
        let memory_bytes = spec.memory_mb * 1024 * 1024;
        let cgroup = match (&sb.cgroups, &sb.slots) {
            (Some(c), Some(_)) => Some(c.job_in_slot(uid, memory_bytes, sb.config.pids_max)?),
            (Some(c), None) => {
                let name = format!("job-{:016x}", rand::random::<u64>());
                Some(c.create(&name, memory_bytes, sb.config.pids_max)?)
            }
            (None, _) => None,
        };

        // The script goes into the job's scratch dir; the key (and, for a
        // pre-started interpreter, the code) onto fd 3 later.
        let (preload, code) = spec.code.unwrap_or(("", ""));
        let rendered = prescript::render(
            spec.language,
            uid,
            gid,
            spec.network,
            &sb.python_path,
            preload,
            code,
        );
        let ext = match spec.language {
            Language::Python3 => "py",
            Language::Nodejs => "js",
        };
        let script_name = format!(".sandq-{:016x}.{ext}", rand::random::<u64>());
        let host_script = scratch.path.join(&script_name);
        std::fs::write(&host_script, rendered.script.as_bytes())
            .map_err(io("writing the prescript"))?;
        std::fs::set_permissions(&host_script, std::fs::Permissions::from_mode(0o400))
            .map_err(io("chmod prescript"))?;
        nix::unistd::chown(&host_script, Some(uid.into()), Some(gid.into()))
            .map_err(nix_io("chown prescript"))?;

        let (key_r, key_w) = pipe2(OFlag::O_CLOEXEC).map_err(nix_io("key pipe"))?;
        let (stdin_r, stdin_w) = pipe2(OFlag::O_CLOEXEC).map_err(nix_io("stdin pipe"))?;
        let (stdout_r, stdout_w) = pipe2(OFlag::O_CLOEXEC).map_err(nix_io("stdout pipe"))?;
        let (stderr_r, stderr_w) = pipe2(OFlag::O_CLOEXEC).map_err(nix_io("stderr pipe"))?;
        let (err_r, err_w) = pipe2(OFlag::O_CLOEXEC).map_err(nix_io("error pipe"))?;
        let (ctl_parent, ctl_child) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(nix_io("control socket"))?;

        // argv and envp: fixed, and nothing of the worker's environment.
        let pivot = sb.root.mode == RootMode::Pivot;
        let workdir = if pivot {
            cstring("/tmp")?
        } else {
            scratch.c_path.clone()
        };
        let script_in_root = if pivot {
            format!("/tmp/{script_name}")
        } else {
            host_script.to_string_lossy().into_owned()
        };
        let program = cstring(sb.interpreter(spec.language).as_os_str().as_encoded_bytes())?;
        let mut args: Vec<CString> = vec![program.clone()];
        let mut env: Vec<CString> = vec![
            cstring("LANG=C.UTF-8")?,
            cstring("HOME=/tmp")?,
            cstring("TMPDIR=/tmp")?,
            cstring("PATH=/usr/local/bin:/usr/bin:/bin")?,
            cstring(format!("USER=sandbox{uid}"))?,
            cstring(format!("LOGNAME=sandbox{uid}"))?,
        ];
        if spec.network {
            // The only way out: the egress relay on the job's own loopback.
            let proxy = format!("http://127.0.0.1:{}", egress::PROXY_PORT);
            for var in [
                "http_proxy",
                "https_proxy",
                "HTTP_PROXY",
                "HTTPS_PROXY",
                "ALL_PROXY",
                "all_proxy",
            ] {
                env.push(cstring(format!("{var}={proxy}"))?);
            }
        }
        match spec.language {
            Language::Python3 => {
                // -S: no `site` at start-up; the prescript sets the same
                // sys.path and builtins itself (see prescript/python.py).
                for a in ["-I", "-S", "-B", "-X", "utf8"] {
                    args.push(cstring(a)?);
                }
                // One BLAS thread: the pids limit counts threads.
                env.push(cstring("OPENBLAS_NUM_THREADS=1")?);
            }
            Language::Nodejs => {
                // V8's heap gets most of the job's memory; the rest is code,
                // buffers and the runtime itself, and the cgroup has the last word.
                args.push(cstring(format!(
                    "--max-old-space-size={}",
                    node_heap_mb(spec.memory_mb)
                ))?);
                args.push(cstring("--disable-proto=delete")?);
                // No V8 background threads: they cost start-up and exit time
                // on small machines and count against the job's pids limit.
                args.push(cstring("--v8-pool-size=0")?);
                env.push(cstring("UV_USE_IO_URING=0")?);
                env.push(cstring("UV_THREADPOOL_SIZE=2")?);
            }
        }
        args.push(cstring(script_in_root)?);
        let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = env.iter().map(|a| a.as_ptr()).collect();
        envp.push(std::ptr::null());

        let cpu_s = cpu_limit_s(spec.timeout_ms);
        let nproc = sb.config.pids_max + if cgroup.is_some() { 8 } else { 0 };
        let fsize = sb.config.scratch_mb * 1024 * 1024;
        let mut rlimits = vec![
            // SIGXCPU at the soft limit, SIGKILL one second later.
            (libc::RLIMIT_CPU, rlimit(cpu_s, cpu_s + 1)),
            (libc::RLIMIT_FSIZE, rlimit(fsize, fsize)),
            (
                libc::RLIMIT_NOFILE,
                rlimit(sb.config.nofile, sb.config.nofile),
            ),
            (libc::RLIMIT_CORE, rlimit(0, 0)),
            // The uid is this job's alone, so this is a per-job process cap;
            // a little above the cgroup's, so that where both exist the
            // cgroup (which reports hitting it) is the one that stops a bomb.
            (libc::RLIMIT_NPROC, rlimit(nproc, nproc)),
        ];
        if cgroup.is_none() && spec.language == Language::Python3 {
            // Without a memory cgroup, the address space is the only memory
            // bound (Node cannot start under one; it keeps its heap flag).
            let bytes = memory_bytes + 64 * 1024 * 1024;
            rlimits.push((libc::RLIMIT_AS, rlimit(bytes, bytes)));
        }

        let root_plan = if pivot {
            let ns = sb.mount_ns.get(&uid).ok_or_else(|| RunError::Io {
                step: "the uid's mount namespace",
                source: std::io::ErrorKind::NotFound.into(),
            })?;
            RootPlan::Join { ns: ns.as_raw_fd() }
        } else {
            RootPlan::None {
                scratch: &scratch.c_path,
            }
        };
        // No job shares the host's network: a job with network gets a
        // namespace of its own whose only interface is `lo` with the egress
        // relay on it; the others join one empty namespace (see spawn, step 0).
        // A mount namespace is joined (the uid's), never made per job: see
        // spawn, step 1c.
        let mut namespaces = sb.namespaces & !(libc::CLONE_NEWNS as u64);
        let mut join = Vec::with_capacity(2);
        match (&sb.shared_netns, spec.network) {
            (Some(netns), false) => join.push((netns.as_raw_fd(), libc::CLONE_NEWNET)),
            _ if sb.net_namespace => namespaces |= libc::CLONE_NEWNET as u64,
            _ => {}
        }
        if let Some(ipcns) = &sb.shared_ipcns {
            join.push((ipcns.as_raw_fd(), libc::CLONE_NEWIPC));
            namespaces &= !(libc::CLONE_NEWIPC as u64);
        }
        let landlock = sb
            .landlock
            .as_ref()
            .and_then(|(abi, exec)| exec.get(&spec.language).map(|files| (*abi, files)))
            .map(|(abi, files)| {
                let writable = if pivot {
                    c"/tmp"
                } else {
                    scratch.c_path.as_c_str()
                };
                crate::sandbox::landlock::Plan::new(abi, files, writable)
            });
        let filter = sb.filters.get(spec.language, spec.network);
        let fprog = filter.fprog();
        let plan = ChildPlan {
            program: &program,
            argv: &argv,
            envp: &envp,
            stdin: stdin_r.as_raw_fd(),
            stdout: stdout_w.as_raw_fd(),
            stderr: stderr_w.as_raw_fd(),
            key: key_r.as_raw_fd(),
            control: ctl_child.as_raw_fd(),
            error: err_w.as_raw_fd(),
            namespaces,
            cgroup: cgroup.as_ref().and_then(|c| c.birth_dir()),
            join: &join,
            root: root_plan,
            workdir: &workdir,
            hostname: b"sandbox",
            relay_port: spec.network.then_some(egress::PROXY_PORT),
            rlimits: &rlimits,
            uid,
            gid,
            landlock: landlock.as_ref(),
            filter: &fprog,
        };

        tracing::debug!(
            prepare_ms = t0.elapsed().as_secs_f64() * 1e3,
            "start: prepared"
        );
        let spawned_at = Instant::now();
        // Cloned from the uid's slot thread where there is one: the child is
        // then born in its cgroup, and shares the worker's memory until its
        // exec, which that thread waits for while this one lets it through
        // (see sandbox::slots). Elsewhere, a fork-style clone from here.
        let pidfd = std::sync::atomic::AtomicI32::new(-1);
        let pending = sb
            .slots
            .as_ref()
            .and_then(|slots| slots.begin(uid, &plan, &pidfd));
        // Our copies of the child's ends must go once it has its own, or we
        // never see EOF.
        let child_ends = (stdin_r, stdout_w, stderr_w, key_r, ctl_child, err_w);
        let (approved, child) = match pending {
            Some(pending) => {
                let approved = supervise::approve_exec(&ctl_parent, &err_r);
                if approved.is_err() {
                    // Make sure the child ends short of exec: its listener
                    // is closed already (approve_exec), its control socket
                    // goes now, and it is killed if it exists yet.
                    drop(ctl_parent);
                    supervise::kill_raw(pidfd.load(std::sync::atomic::Ordering::Acquire));
                }
                // Also keeps `plan` alive for as long as the child may read it.
                let child = pending.wait();
                drop(child_ends);
                (approved, child?)
            }
            None => {
                let child = spawn::spawn(&plan)?;
                drop(child_ends);
                (supervise::approve_exec(&ctl_parent, &err_r), child)
            }
        };
        let handover = match approved.and_then(|h| supervise::confirm_exec(&err_r).map(|()| h)) {
            Ok(h) => h,
            Err(e) => {
                supervise::kill_and_reap(&child);
                return Err(e);
            }
        };
        // Into the job's cgroup where the child was not born in it (kernels
        // before 5.7 on cgroup v2): the job's code comes on fd 3 only after
        // this (see sandbox::spawn, step 4). A no-op otherwise.
        if let Some(cg) = &cgroup {
            if let Err(e) = cg.attach(child.pid) {
                supervise::kill_and_reap(&child);
                return Err(e.into());
            }
        }
        tracing::debug!(
            exec_ms = spawned_at.elapsed().as_secs_f64() * 1e3,
            "start: exec done"
        );
        Ok(Started {
            child,
            listener: handover.listener,
            relay: handover.relay,
            stdin: stdin_w,
            stdout: stdout_r,
            stderr: stderr_r,
            payload: key_w,
            rendered,
            cgroup,
            scratch,
            language: spec.language,
            network: spec.network,
            memory_mb: spec.memory_mb,
            pre_started: spec.code.is_none(),
            spawn_duration: spawned_at.elapsed(),
        })
    }

    /// Give `job` to a started interpreter and supervise it to the end. For
    /// a pre-started one, the job's memory limit is set on its cgroup first;
    /// the timeout and output caps are the supervisor's anyway. Its CPU-time
    /// rlimit stays the one it started with (the worker's longest timeout):
    /// changing another process's limits needs CAP_SYS_RESOURCE, which
    /// container runtimes often withhold, and the wall-clock timeout is the
    /// per-job bound.
    pub fn finish(&self, s: Started, job: &Job, opts: &RunOptions) -> Result<Finished, RunError> {
        let sb = self.sandbox;
        let t_limits = Instant::now();
        let payload = if s.pre_started {
            s.rendered.payload(&job.preload, &job.code)
        } else {
            s.rendered.key_line()
        };
        if s.pre_started {
            if let Some(cg) = &s.cgroup {
                cg.set_memory(job.memory_mb * 1024 * 1024)?;
            }
        }
        let _relay = s
            .relay
            .map(|fd| egress::Relay::start(std::net::TcpListener::from(fd), opts.egress.clone()));
        let handed_at = Instant::now();
        let deadline = handed_at + Duration::from_millis(job.timeout_ms);
        let capture = supervise::Supervisor {
            child: &s.child,
            listener: s.listener,
            inputs: vec![
                (s.payload, payload),
                (s.stdin, job.stdin.as_bytes().to_vec()),
            ],
            stdout: s.stdout,
            stderr: s.stderr,
            output_limit: opts.output_limit,
            deadline,
            learn: opts.learn,
            cancel: opts.cancel,
            cgroup: s.cgroup.as_ref(),
        }
        .run();
        let duration = handed_at.elapsed();
        // Read at exit_group, or now that the process is reaped.
        let cg = match capture.cgroup {
            Some(report) => report,
            None => s.cgroup.as_ref().map(|c| c.report()).unwrap_or_default(),
        };
        tracing::debug!(
            limits_ms = (handed_at - t_limits).as_secs_f64() * 1e3,
            run_ms = duration.as_secs_f64() * 1e3,
            exiting = capture.exiting,
            "finish timings"
        );
        let teardown = Teardown {
            child: capture.exiting.then_some(s.child),
            cgroup: s.cgroup,
            scratch: Some(s.scratch),
        };

        let mut usage = capture.usage;
        if let Some(peak) = cg.peak_memory_bytes {
            usage.max_rss_kb = usage.max_rss_kb.max(peak / 1024);
        }
        let outcome = classify(
            job,
            capture,
            cg,
            usage,
            duration,
            s.spawn_duration,
            sb.config.pids_max,
        );
        Ok(Finished { outcome, teardown })
    }
}

/// A finished run: its outcome, and what is left of it.
pub struct Finished {
    pub outcome: Outcome,
    pub teardown: Teardown,
}

/// What is left of a finished run: its process when it ended with
/// `exit_group` (still being torn down by the kernel), its cgroup, and its
/// scratch dir, which holds the uid. Dropping it waits for the process to be
/// gone, then removes the cgroup, empties the scratch dir and gives the uid
/// back, in that order; so the next job of that uid never meets anything of
/// this one. The wait can take milliseconds: drop it on a blocking thread,
/// while the result is on its way.
pub struct Teardown {
    child: Option<spawn::Spawned>,
    cgroup: Option<crate::sandbox::cgroup::JobCgroup>,
    scratch: Option<crate::sandbox::rootfs::Scratch>,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        let t = Instant::now();
        if let Some(child) = self.child.take() {
            // Past its exit_group already; the kill only makes sure.
            supervise::kill_and_reap(&child);
        }
        let reaped = t.elapsed();
        drop(self.cgroup.take());
        drop(self.scratch.take());
        tracing::debug!(
            reap_ms = reaped.as_secs_f64() * 1e3,
            cleanup_ms = (t.elapsed() - reaped).as_secs_f64() * 1e3,
            "teardown"
        );
    }
}

/// V8's old-space limit for a job's memory: three quarters of it.
pub fn node_heap_mb(memory_mb: u64) -> u64 {
    (memory_mb * 3 / 4).max(16)
}

/// RLIMIT_CPU's soft limit: the wall-clock timeout, rounded up, plus one
/// second. A job can only reach it with several busy threads.
fn cpu_limit_s(timeout_ms: u64) -> u64 {
    timeout_ms.div_ceil(1000) + 1
}

fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_else(|_| format!("SIG{sig}"))
}

/// Decide the status. The order matters: a violation or the worker's own kill
/// (output, timeout) explains a SIGKILL better than the signal itself.
fn classify(
    job: &Job,
    c: supervise::Captured,
    cg: crate::sandbox::cgroup::CgroupReport,
    usage: Usage,
    duration: Duration,
    spawn_duration: Duration,
    pids_max: u64,
) -> Outcome {
    let exit_code = c.exit_code;
    let signal = c.signal.map(signal_name);
    let stderr_text = String::from_utf8_lossy(&c.stderr).into_owned();
    let python_memory_error = job.language == Language::Python3
        && exit_code.is_some_and(|c| c != 0)
        && stderr_text
            .trim_end()
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("MemoryError"));
    let node_heap_error =
        job.language == Language::Nodejs && stderr_text.contains("JavaScript heap out of memory");
    let (status, error) = if let Some(v) = &c.violation {
        (
            Status::Violation,
            Some(format!(
                "blocked system call: {}",
                v.call.as_deref().unwrap_or(&v.syscall)
            )),
        )
    } else if c.output_limited {
        (
            Status::OutputLimit,
            Some(format!(
                "output exceeded the limit of {} bytes per stream; the job was stopped",
                c.output_limit
            )),
        )
    } else if c.timed_out {
        (
            Status::Timeout,
            Some(format!("timed out after {} ms", job.timeout_ms)),
        )
    } else if cg.oom_killed || python_memory_error || node_heap_error {
        (
            Status::MemoryLimit,
            Some(format!(
                "exceeded the memory limit of {} MiB",
                job.memory_mb
            )),
        )
    } else if c.signal == Some(libc::SIGXCPU)
        || (c.signal == Some(libc::SIGKILL) && usage.cpu_ms >= cpu_limit_s(job.timeout_ms) * 1000)
    {
        (
            Status::Timeout,
            Some("exceeded its CPU time limit".to_owned()),
        )
    } else if exit_code == Some(0) {
        (Status::Ok, None)
    } else if let Some(code) = exit_code {
        let why = if code == 125 {
            "the sandbox identity check failed".to_owned()
        } else if cg.pids_limit_hit {
            format!(
                "exited with code {code} after hitting the limit of {pids_max} processes/threads"
            )
        } else {
            format!("exited with code {code}")
        };
        (Status::Error, Some(why))
    } else {
        let sig = signal.clone().unwrap_or_default();
        (Status::Error, Some(format!("killed by {sig}")))
    };
    Outcome {
        status,
        exit_code,
        signal,
        stdout: String::from_utf8_lossy(&c.stdout).into_owned(),
        stderr: stderr_text,
        stdout_truncated: c.stdout_truncated,
        stderr_truncated: c.stderr_truncated,
        error,
        violation: c.violation,
        duration,
        spawn_duration,
        usage,
        unlisted: c.unlisted,
        cancelled: c.cancelled,
    }
}

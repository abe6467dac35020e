//! The spawn path: `clone3` into fresh namespaces, then one ordered lock-down,
//! then `execve` of the interpreter.
//!
//! Everything the child needs (C strings, argv/envp arrays, the BPF program, the
//! rlimit table, file descriptors) is prepared by the parent in a [`ChildPlan`].
//! The worker is a multithreaded process, so between the clone and `execve` the
//! child may only make raw, async-signal-safe system calls: no allocation, no
//! locks, no panics. Two clones lead to the same lock-down: [`spawn_shared`]
//! (`CLONE_VM | CLONE_VFORK`, from a uid's slot thread: the usual path) and
//! [`spawn`] (a fork-style `clone3`, where there are no slot threads). Each step that fails writes `(step, errno)` to the error
//! pipe and exits; the parent turns that into [`SpawnError::ChildStep`].
//!
//! The order of the lock-down, and why each step sits where it does:
//!
//! 0. the clone, with new pid and uts namespaces, and net and ipc ones unless
//!    shared ones are joined instead (step 1b): the interpreter is
//!    pid 1 of its own tree, so killing it kills everything it started, and
//!    it sees no host process or network interface. Jobs without network join
//!    one empty network namespace made at start-up instead of a new one each
//!    (creating and destroying a network namespace costs the kernel about a
//!    millisecond; those jobs cannot open a socket, so they have nothing to
//!    share in it).
//! 1. every signal handler back to the default, then an empty signal mask
//!    (ignored signals and the mask survive `execve`). Then (1b)
//!    join the shared empty network namespace (jobs without network) and IPC
//!    namespace (where no IPC call is allowed), and (1c) the
//!    mount namespace held for the job's uid ([`hold_mount_namespace`]): its
//!    root is the read-only runtime root, its `/tmp` the uid's scratch, and
//!    the host's root was detached from it when it was made. A new mount
//!    namespace per job cost three mount operations and two RCU grace
//!    periods (the old root's detach, and the namespace's teardown at exit),
//!    stalling every CPU; a job cannot change a mount namespace (no
//!    capabilities, no mount calls), only the files in its `/tmp`, which are
//!    removed before the uid runs anything else (`rootfs::Scratch`). Both
//!    before step 3, which closes the namespace fds.
//! 2. `setsid`: its own session and process group, so the worker can kill the
//!    group and the job has no controlling terminal.
//! 3. stdio and the key pipe onto fds 0-3, our control fds after them
//!    (close-on-exec), every other fd closed: no worker fd (Redis sockets,
//!    other jobs' pipes) reaches the interpreter, or even outlives this step.
//! 4. the cgroup (memory and pids limits) is not joined here: the child is
//!    born in it. On cgroup v1 it was cloned by its uid's slot thread, which
//!    lives in that uid's cgroup (`sandbox::slots`); on cgroup v2 `clone3`
//!    puts it into the job's group itself (`CLONE_INTO_CGROUP`), so nothing
//!    it allocates is ever charged elsewhere (v2 does not move charges with
//!    a process). Only where the kernel lacks that (before 5.7) does the
//!    parent move it in after exec, before handing over the job's code
//!    (`runner::Runner::start`).
//! 5. `chdir` to `/tmp` in that root (or to the scratch dir on the host
//!    filesystem, where the host gave us no mount namespace).
//! 6. hostname, in the new uts namespace.
//! 7. for jobs with network: `lo` up and a listening socket on 127.0.0.1:3128
//!    in the job's own network namespace (the egress relay's door, see
//!    `runner::egress`): needs CAP_NET_ADMIN, so before the drop.
//! 8. rlimits (CPU, file size, open files, core 0, address space, nproc): while
//!    root, so hard limits can be set to anything.
//! 9. `setgroups([])`, `setresgid`, `setresuid` to the job's own uid: this drops
//!    every capability. gid before uid, since after the uid drop we may not.
//! 10. `PR_SET_PDEATHSIG`: after the drop, because a credential change clears it.
//! 11. `PR_SET_NO_NEW_PRIVS`: required to load a filter unprivileged, and no
//!     setuid binary can regain anything.
//! 12. Landlock (where the kernel has it): read-only everywhere, read-write in
//!     /tmp (the scratch dir), execute only the interpreter and its ELF
//!     loader. Needs no_new_privs; after the root is final, so its paths hold.
//! 13. seccomp, last, with `SECCOMP_FILTER_FLAG_NEW_LISTENER`: the listener fd
//!     is sent to the worker and closed here. From now on only allowlisted
//!     calls run; the only calls left before exec (`sendmsg`, `close`) are
//!     allowed.
//! 14. `execve` of the interpreter: the filter traps it to the supervisor,
//!     which lets exactly this first one through and refuses every later one.

use std::ffi::CStr;
use std::os::fd::RawFd;

/// Declares `Step` and `Step::ALL` from one list, in lock-down order.
macro_rules! steps {
    ($($name:ident),+ $(,)?) => {
        /// Steps of the child, as reported through the error pipe.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(u32)]
        pub enum Step {
            $($name),+
        }

        impl Step {
            const ALL: &'static [Step] = &[$(Step::$name),+];
        }
    };
}

steps!(
    Signals,
    JoinNamespaces,
    Setsid,
    Fds,
    Root,
    Hostname,
    Network,
    Rlimits,
    Groups,
    Gid,
    Uid,
    DeathSignal,
    NoNewPrivs,
    Landlock,
    Seccomp,
    SendListener,
    Exec,
);

impl Step {
    fn from_u32(v: u32) -> Option<Step> {
        Step::ALL.get(v as usize).copied()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("clone3 failed: {0}")]
    Clone(#[source] std::io::Error),
    #[error("the sandboxed child failed at step {step:?}: {source}")]
    ChildStep {
        step: Step,
        #[source]
        source: std::io::Error,
    },
}

/// How the child enters its root.
pub enum RootPlan<'a> {
    /// Join the uid's mount namespace `ns` (see [`hold_mount_namespace`]).
    Join { ns: RawFd },
    /// No root at all (the host allowed no mounts): stay on the host fs in `scratch`.
    None { scratch: &'a CStr },
}

/// Everything the child needs, prepared by the parent before `clone3`.
pub struct ChildPlan<'a> {
    pub program: &'a CStr,
    /// Null-terminated.
    pub argv: &'a [*const libc::c_char],
    /// Null-terminated.
    pub envp: &'a [*const libc::c_char],
    pub stdin: RawFd,
    pub stdout: RawFd,
    pub stderr: RawFd,
    pub key: RawFd,
    /// Our end of the socket the listener fd is sent over.
    pub control: RawFd,
    /// Write end of the close-on-exec error pipe.
    pub error: RawFd,
    pub namespaces: u64,
    /// The job's cgroup v2 directory, for `CLONE_INTO_CGROUP`.
    pub cgroup: Option<RawFd>,
    /// Namespaces to join instead of creating them, as (fd, `CLONE_NEW*`):
    /// the empty network namespace of jobs without network (they cannot
    /// open sockets at all) and the empty IPC namespace (no IPC call is
    /// allowed).
    pub join: &'a [(RawFd, libc::c_int)],
    pub root: RootPlan<'a>,
    /// Working directory inside the root.
    pub workdir: &'a CStr,
    pub hostname: &'a [u8],
    /// For jobs with network: bring up `lo` in the job's network namespace
    /// and listen on 127.0.0.1:<port> there; the socket goes to the worker
    /// with the seccomp listener (see `runner::egress`).
    pub relay_port: Option<u16>,
    pub rlimits: &'a [(libc::__rlimit_resource_t, libc::rlimit)],
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    /// Landlock rules, when the kernel has it.
    pub landlock: Option<&'a super::landlock::Plan<'a>>,
    pub filter: &'a libc::sock_fprog,
}

/// The kernel's `struct clone_args` (`CLONE_ARGS_SIZE_VER2`, with `cgroup`;
/// older kernels accept it as long as `cgroup` is 0).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `CLONE_INTO_CGROUP` (Linux 5.7), not in every libc.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// A started child: its pid and a pidfd that polls readable when it exits.
pub struct Spawned {
    pub pid: libc::pid_t,
    pub pidfd: std::os::fd::OwnedFd,
}

/// Clone the child and run the lock-down in it. Returns in the parent only.
///
/// The caller must make sure the supervisor answers the child's first `execve`
/// notification; see `runner`.
pub fn spawn(plan: &ChildPlan<'_>) -> Result<Spawned, SpawnError> {
    let mut pidfd: RawFd = -1;
    let into = plan.cgroup.map_or(0, |_| CLONE_INTO_CGROUP);
    let args = CloneArgs {
        flags: plan.namespaces | libc::CLONE_PIDFD as u64 | into,
        pidfd: &mut pidfd as *mut RawFd as u64,
        exit_signal: libc::SIGCHLD as u64,
        cgroup: plan.cgroup.map_or(0, |fd| fd as u64),
        ..Default::default()
    };
    // SAFETY: the child branch below only makes raw syscalls on memory the
    // plan borrows, then execs or exits.
    match unsafe { clone3(&args) }.map_err(SpawnError::Clone)? {
        0 => {
            // SAFETY: we are the freshly cloned child; child_main never returns.
            unsafe { child_main(plan) }
        }
        pid => Ok(Spawned {
            pid,
            // SAFETY: the kernel wrote a fresh pidfd that nothing else owns.
            pidfd: unsafe { std::os::fd::FromRawFd::from_raw_fd(pidfd) },
        }),
    }
}

/// Clone the child sharing this process's memory and suspend the calling
/// thread until the child has called `execve` or exited (`CLONE_VM |
/// CLONE_VFORK`, as `posix_spawn` does): nothing of the worker's address
/// space is copied, then torn down at exec, and the worker's threads take no
/// copy-on-write faults afterwards (about 0.5 ms of CPU per job). The child
/// runs on `stack` and only reads `plan`; what it writes of shared memory is
/// the suspended thread's errno, which that thread reads only after a failed
/// call of its own.
///
/// The calling thread cannot answer the child's `execve` notification: it is
/// suspended. Another thread must (see `sandbox::slots`), and `pidfd` gets
/// the child's pidfd as soon as the child exists, so that thread can kill it.
/// The calling thread must block every signal (see step 1).
pub fn spawn_shared(
    plan: &ChildPlan<'_>,
    stack: &mut [u8],
    pidfd: &std::sync::atomic::AtomicI32,
) -> Result<Spawned, SpawnError> {
    extern "C" fn child(plan: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `plan` is the ChildPlan passed to clone below, alive in the
        // shared memory until the caller resumes; child_main never returns.
        unsafe { child_main(&*(plan as *const ChildPlan<'_>)) }
    }
    let flags = plan.namespaces as libc::c_int
        | libc::CLONE_VM
        | libc::CLONE_VFORK
        | libc::CLONE_PIDFD
        | libc::SIGCHLD;
    // The stack grows down from the top of `stack`, kept 16-byte aligned.
    let top = (stack.as_mut_ptr() as usize + stack.len()) & !15;
    // SAFETY: `child` runs on `stack`, which nothing else uses; it only makes
    // raw syscalls and reads `plan`, which outlives the suspension; the pidfd
    // is written where `pidfd` points (CLONE_PIDFD uses the parent_tid slot).
    let pid = unsafe {
        libc::clone(
            child,
            top as *mut libc::c_void,
            flags,
            plan as *const ChildPlan<'_> as *mut libc::c_void,
            pidfd.as_ptr(),
        )
    };
    if pid == -1 {
        return Err(SpawnError::Clone(std::io::Error::last_os_error()));
    }
    let fd = pidfd.load(std::sync::atomic::Ordering::Acquire);
    Ok(Spawned {
        pid,
        // SAFETY: the kernel wrote a fresh pidfd that nothing else owns.
        pidfd: unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) },
    })
}

/// `clone3` with `args` (no CLONE_VM: a fork of the address space): 0 in the
/// child, the child's pid in the parent.
///
/// # Safety
/// In the child of a multithreaded process, the caller's child branch may
/// only make async-signal-safe raw syscalls, then exec or exit.
unsafe fn clone3(args: &CloneArgs) -> Result<libc::pid_t, std::io::Error> {
    // SAFETY: `args` is a live clone_args of the size passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if ret == -1 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret as libc::pid_t)
    }
}

/// Check that the host lets us clone with `flags`: the child exits at once.
pub fn probe(flags: u64) -> Result<(), std::io::Error> {
    probe_into(flags, None)
}

/// The same, the child born in the cgroup v2 group `cgroup` (an fd of its
/// directory), to learn whether the kernel has `CLONE_INTO_CGROUP`.
pub fn probe_into(flags: u64, cgroup: Option<RawFd>) -> Result<(), std::io::Error> {
    let args = CloneArgs {
        flags: flags | cgroup.map_or(0, |_| CLONE_INTO_CGROUP),
        exit_signal: libc::SIGCHLD as u64,
        cgroup: cgroup.map_or(0, |fd| fd as u64),
        ..Default::default()
    };
    // SAFETY: the child branch only calls _exit.
    match unsafe { clone3(&args) }? {
        // SAFETY: in the child; _exit is async-signal-safe.
        0 => unsafe { libc::_exit(0) },
        pid => {
            let mut status = 0;
            // SAFETY: reaping the child we just created.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            Ok(())
        }
    }
}

/// A namespace of kind `flag` (e.g. `CLONE_NEWNET`) kept alive by an open fd:
/// a child is cloned into a new one, the namespace is opened through /proc,
/// and the child is killed.
pub fn hold_namespace(flag: u64, proc_name: &str) -> Result<std::os::fd::OwnedFd, std::io::Error> {
    let args = CloneArgs {
        flags: flag,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    // SAFETY: the child branch only waits for a signal (pause is
    // async-signal-safe) until the parent kills it.
    match unsafe { clone3(&args) }? {
        0 => loop {
            // SAFETY: in the child: pause until the parent's SIGKILL.
            unsafe { libc::pause() };
        },
        pid => open_namespace_and_kill(pid, proc_name, Ok(())),
    }
}

/// Open `/proc/<pid>/ns/<proc_name>` of a namespace-holding child unless
/// `ready` says it failed, then kill and reap the child either way.
fn open_namespace_and_kill(
    pid: libc::pid_t,
    proc_name: &str,
    ready: Result<(), std::io::Error>,
) -> Result<std::os::fd::OwnedFd, std::io::Error> {
    let opened = ready.and_then(|()| {
        std::fs::File::open(format!("/proc/{pid}/ns/{proc_name}")).map(std::os::fd::OwnedFd::from)
    });
    // SAFETY: kill and reap the child we just created.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
    }
    opened
}

/// A mount namespace for one uid's jobs, kept alive by an open fd: a child is
/// cloned into a new mount namespace, binds `scratch` onto `root_tmp`,
/// `pivot_root`s into `root` and detaches the old root (so no path leads back
/// to the host), reports on a pipe and is killed. Made once per uid at
/// start-up; jobs join it (step 1c).
pub fn hold_mount_namespace(
    root: &CStr,
    root_tmp: &CStr,
    scratch: &CStr,
) -> Result<std::os::fd::OwnedFd, std::io::Error> {
    let (report_r, report_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let report = std::os::fd::AsRawFd::as_raw_fd(&report_w);
    let args = CloneArgs {
        flags: libc::CLONE_NEWNS as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    // SAFETY: the child branch only makes raw syscalls on the C strings
    // borrowed above (alive in its copy of the address space), then pauses
    // until killed or exits.
    match unsafe { clone3(&args) }? {
        // SAFETY: in the child: raw mount calls, write, pause, _exit only.
        0 => unsafe {
            let ok = libc::mount(
                scratch.as_ptr(),
                root_tmp.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ) == 0
                && libc::chdir(root.as_ptr()) == 0
                // pivot_root(".", "."): the old root ends up stacked on the
                // new one and is detached at once.
                && libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) == 0
                && libc::umount2(c".".as_ptr(), libc::MNT_DETACH) == 0
                && libc::chdir(c"/".as_ptr()) == 0;
            let errno = if ok { 0 } else { *libc::__errno_location() };
            libc::write(report, (&errno as *const i32).cast(), 4);
            loop {
                libc::pause();
            }
        },
        pid => {
            drop(report_w);
            let mut buf = [0u8; 4];
            let got = nix::unistd::read(&report_r, &mut buf);
            let ready = match (got, i32::from_ne_bytes(buf)) {
                (Ok(4), 0) => Ok(()),
                (Ok(4), errno) => Err(std::io::Error::from_raw_os_error(errno)),
                _ => Err(std::io::Error::other("the namespace helper died")),
            };
            open_namespace_and_kill(pid, "mnt", ready)
        }
    }
}

/// Decode what the child wrote to the error pipe, if anything.
pub fn decode_error(buf: &[u8]) -> Option<SpawnError> {
    if buf.len() < 8 {
        return None;
    }
    let step = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
    Some(SpawnError::ChildStep {
        step: Step::from_u32(step).unwrap_or(Step::Exec),
        source: std::io::Error::from_raw_os_error(errno),
    })
}

/// Report a failed step to the parent and exit. Async-signal-safe.
unsafe fn fail(error: RawFd, step: Step) -> ! {
    // SAFETY: __errno_location is thread-local storage of the only thread left.
    let errno = unsafe { *libc::__errno_location() };
    let mut msg = [0u8; 8];
    msg[..4].copy_from_slice(&(step as u32).to_ne_bytes());
    msg[4..].copy_from_slice(&errno.to_ne_bytes());
    // SAFETY: plain write of a stack buffer, then exit; nothing else runs.
    // The raw `exit` of this, the child's only thread, ends the process like
    // `_exit` would; but `_exit` is `exit_group`, which once the filter is
    // loaded (step 13) parks for a supervisor that is not listening yet.
    unsafe {
        libc::write(error, msg.as_ptr().cast(), msg.len());
        libc::syscall(libc::SYS_exit, 127);
        libc::_exit(127)
    }
}

/// Check a raw call's return value; on -1 report the step and exit.
/// Only used inside `child_main`'s unsafe block.
macro_rules! step {
    ($error:expr, $step:expr, $call:expr) => {
        if $call == -1 {
            fail($error, $step)
        }
    };
}

/// The child side of the lock-down, steps 1-14 of the module doc.
///
/// # Safety
/// Must only be called in a child freshly created by `clone3` from `spawn`.
unsafe fn child_main(plan: &ChildPlan<'_>) -> ! {
    // SAFETY: (the whole body) every call below is a raw syscall or a libc wrapper
    // that is async-signal-safe; all pointers come from `plan`, whose memory the
    // parent keeps alive and which this forked copy of the address space holds.
    unsafe {
        // The error pipe's fd; it moves in step 3.
        let mut err = plan.error;

        // 1. Signals: every handler back to the default first (a handler of
        // the worker must never run here, least of all in a child that shares
        // its memory; a shared-memory clone comes from a thread that blocks
        // every signal, so none can arrive before this), then unblock. glibc
        // refuses its two internal signals; they have no handler to reset.
        for sig in 1..65 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        step!(
            err,
            Step::Signals,
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut())
        );

        // 1b. The shared empty namespaces.
        for &(ns, kind) in plan.join {
            step!(err, Step::JoinNamespaces, libc::setns(ns, kind));
        }

        // 1c. The uid's mount namespace: root and cwd become its root.
        if let RootPlan::Join { ns } = plan.root {
            step!(
                err,
                Step::JoinNamespaces,
                libc::setns(ns, libc::CLONE_NEWNS)
            );
        }

        // 2. Session and process group.
        step!(err, Step::Setsid, libc::setsid());

        // 3. Fds. The clone copied every fd of the worker, including other
        // jobs' pipes: close them now, not at exec, or those jobs wait for an
        // EOF until this child has exec'd. Keep stdio and the key as 0-3, and
        // our control fds as 4.. (close-on-exec), moving each through a high
        // number first since a source may itself be one of the targets.
        let wanted = [
            plan.stdin,
            plan.stdout,
            plan.stderr,
            plan.key,
            plan.control,
            plan.error,
        ];
        let mut high = [-1 as RawFd; 6];
        for (i, fd) in wanted.iter().enumerate() {
            high[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 100);
            step!(err, Step::Fds, high[i]);
        }
        for (target, fd) in high.iter().enumerate() {
            step!(err, Step::Fds, libc::dup2(*fd, target as RawFd));
            // dup2 clears close-on-exec; only stdio and the key keep it off.
            if target > 3 {
                step!(
                    err,
                    Step::Fds,
                    libc::fcntl(target as RawFd, libc::F_SETFD, libc::FD_CLOEXEC)
                );
            }
        }
        err = 5;
        let control: RawFd = 4;
        step!(
            err,
            Step::Fds,
            libc::syscall(libc::SYS_close_range, 6u32, u32::MAX, 0u32) as i32
        );

        // 5. Working directory.
        match plan.root {
            RootPlan::Join { .. } => {
                step!(err, Step::Root, libc::chdir(plan.workdir.as_ptr()));
            }
            RootPlan::None { scratch } => {
                step!(err, Step::Root, libc::chdir(scratch.as_ptr()));
            }
        }

        // 6. Hostname.
        if plan.namespaces & libc::CLONE_NEWUTS as u64 != 0 {
            step!(
                err,
                Step::Hostname,
                libc::sethostname(plan.hostname.as_ptr().cast(), plan.hostname.len())
            );
        }

        // 7. The egress relay's socket, in the job's network namespace.
        let mut relay: RawFd = -1;
        if let Some(port) = plan.relay_port {
            relay = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            step!(err, Step::Network, relay);
            let mut ifr: libc::ifreq = std::mem::zeroed();
            ifr.ifr_name[0] = b'l' as libc::c_char;
            ifr.ifr_name[1] = b'o' as libc::c_char;
            ifr.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            step!(
                err,
                Step::Network,
                libc::ioctl(relay, libc::SIOCSIFFLAGS, &ifr)
            );
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: port.to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
                },
                sin_zero: [0; 8],
            };
            step!(
                err,
                Step::Network,
                libc::bind(
                    relay,
                    (&addr as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t
                )
            );
            step!(err, Step::Network, libc::listen(relay, 64));
        }

        // 8. Rlimits.
        for (resource, limit) in plan.rlimits {
            step!(err, Step::Rlimits, libc::setrlimit(*resource, limit));
        }

        // 9. Identity: groups, then gid, then uid (which drops all capabilities).
        // Raw syscalls, not the libc wrappers: glibc's setxid wrappers signal
        // every thread it knows of and wait for them under a lock, and in this
        // cloned child those threads do not exist (a deadlock seen under load).
        step!(
            err,
            Step::Groups,
            libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) as i32
        );
        step!(
            err,
            Step::Gid,
            libc::syscall(libc::SYS_setresgid, plan.gid, plan.gid, plan.gid) as i32
        );
        step!(
            err,
            Step::Uid,
            libc::syscall(libc::SYS_setresuid, plan.uid, plan.uid, plan.uid) as i32
        );

        // 10. Die with the worker.
        step!(
            err,
            Step::DeathSignal,
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong)
        );

        // 11. No new privileges, ever.
        step!(
            err,
            Step::NoNewPrivs,
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0)
        );

        // 12. Landlock: reads anywhere in the (read-only) root, writes only in
        // the scratch dir, execute only the interpreter and its loader.
        if let Some(ll) = plan.landlock {
            if super::landlock::restrict_self(ll) == -1 {
                fail(err, Step::Landlock);
            }
        }

        // 13. Seccomp, with a listener for the worker's supervisor.
        let listener = libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            plan.filter as *const libc::sock_fprog,
        ) as RawFd;
        step!(err, Step::Seccomp, listener);
        if send_fds(control, listener, relay) == -1 {
            // Also the parent-alive check: if the worker died before step 9,
            // its end of the socket is gone and this fails.
            fail(err, Step::SendListener);
        }
        libc::close(listener);
        if relay != -1 {
            libc::close(relay);
        }

        // 14. Exec.
        libc::execve(
            plan.program.as_ptr(),
            plan.argv.as_ptr(),
            plan.envp.as_ptr(),
        );
        fail(err, Step::Exec)
    }
}

/// Send `fd` (and `extra` unless -1) with SCM_RIGHTS, using only the stack.
/// Returns -1 on error.
///
/// # Safety
/// Async-signal-safe; `sock` must be a connected unix socket.
unsafe fn send_fds(sock: RawFd, fd: RawFd, extra: RawFd) -> isize {
    #[repr(C, align(8))]
    struct Cmsg([u8; 64]);
    let mut buf = Cmsg([0; 64]);
    let mut byte = [b'L'];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let fds = [fd, extra];
    let count = if extra == -1 { 1 } else { 2 };
    let bytes = (count * std::mem::size_of::<RawFd>()) as u32;
    // SAFETY: pointer arithmetic and stores within `buf`, sized above CMSG_SPACE(8).
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = buf.0.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(bytes) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(bytes) as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast::<RawFd>(), count);
        libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_errors_name_their_step() {
        for step in Step::ALL {
            let mut buf = [0u8; 8];
            buf[..4].copy_from_slice(&(*step as u32).to_ne_bytes());
            buf[4..].copy_from_slice(&libc::EPERM.to_ne_bytes());
            match decode_error(&buf) {
                Some(SpawnError::ChildStep { step: got, source }) => {
                    assert_eq!(got, *step);
                    assert_eq!(source.raw_os_error(), Some(libc::EPERM));
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(decode_error(&[1, 2, 3]).is_none());
    }
}

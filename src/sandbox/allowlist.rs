//! The seccomp allowlists, as reviewed data: one entry per system call with the reason it is allowed.
//!
//! How the lists were made: every call below was seen in `strace -f` traces (all threads) of
//! Debian's `/usr/bin/python3` (3.11, `-I -B`, and `-I -B -X utf8` through the prescript) and
//! `/usr/bin/node` (v20, `--max-old-space-size`, with and without `UV_USE_IO_URING=0`) on x86_64,
//! run with an empty environment and with the worker's own environment, as an unprivileged uid
//! that has no passwd entry, from a scratch directory, with stdin, stdout and stderr on pipes.
//! The workloads: an empty script, printing, 200 KB of output, reading stdin, the common standard
//! modules (json, re, datetime, decimal, zoneinfo, hashlib, uuid, csv, ...), threads and a thread
//! pool, asyncio, `time.sleep`, sqlite (in memory and on a file), numpy with one BLAS thread,
//! creating/reading/listing/renaming/deleting files and directories in the working directory,
//! `tempfile`, `shutil`, `os.urandom`, signals to self, `os.abort`, an uncaught exception,
//! `sys.exit(3)`; for Node the same plus crypto, Buffer, URL, timers and promises, a 1e6-element
//! array, fs streams, `copyFileSync`, a worker thread, zlib, heap exhaustion and `process.exit(3)`;
//! and, for NETWORK only, TCP to a local server, HTTP GET/POST, UDP, `getaddrinfo`/`dns.lookup`
//! and `fetch`. A call goes in COMMON when both runtimes make it (or the child itself needs it
//! between loading the filter and exec), in PYTHON or NODEJS when only one does.
//!
//! Deliberately absent, so that any attempt is a reported violation: `fork`, `vfork` and `clone`
//! without `CLONE_THREAD` (no new processes: `os.fork`, `subprocess`, `child_process` die here),
//! `execve`/`execveat` after the one that starts the interpreter, `wait4`/`waitid` (there are no
//! children to reap), `ptrace` and `process_vm_readv`/`process_vm_writev`, `mount`, `umount2`,
//! `unshare`, `setns`, `chroot`, `pivot_root`, `bpf`, `keyctl`/`add_key`/`request_key`,
//! `perf_event_open`, `userfaultfd`, `io_uring_enter`/`io_uring_register` (setup is answered
//! ENOSYS below), `kexec_load`/`kexec_file_load`, `init_module`/`finit_module`/`delete_module`,
//! the setuid family (`setuid`, `setgid`, `setreuid`, `setresuid`, `setresgid`, `setgroups`,
//! `setfsuid`, `setfsgid`), `listen`/`accept`/`accept4` (jobs are clients, never servers),
//! `memfd_create`, `personality`, `seccomp`, clock and host setters; `dup2` and `close_range`,
//! which only the child of a `subprocess`/`child_process` spawn made; `sigaltstack`, never seen.
//! `clone`, `clone3`, `execve` and `execveat` appear in no table: they have their own rules.
//!
//! Sockets are allowed by argument, not by name: `socket` (network jobs only) and `socketpair`
//! (Python) carry rules on the address family, type and protocol ([`SocketRule`]). Network jobs
//! get TCP and UDP over IPv4 and IPv6 and unix sockets; jobs without network only the quiet
//! refusals of [`SOCKET_OFFLINE`]; every other family is a violation whose report names it. The
//! same traces with `strace -f -e socket,socketpair` showed what the clients open: Python's
//! `urllib`, `http.client`, `asyncio.open_connection` and `getaddrinfo`, Node's `net`, `http`,
//! `https`, `fetch`, `dgram` and `dns.lookup` use `AF_INET`/`AF_INET6` with `SOCK_STREAM`
//! (protocol 0 or `IPPROTO_TCP`) and `SOCK_DGRAM` (0 or `IPPROTO_UDP`), `AF_UNIX` for glibc's
//! nscd probe, and `AF_NETLINK`/`NETLINK_ROUTE` for `getaddrinfo` with `AI_ADDRCONFIG` (Node's
//! `dns.lookup`, from its thread pool), which copes with a refusal.
//!
//! Known gaps, kept out on purpose:
//! - Python with `HOME` unset resolves the home directory through `getpwuid()`, and so does
//!   `pwd.getpwuid`/`getpass.getuser()`/Node's `os.userInfo()`: glibc first probes nscd with
//!   `socket(AF_UNIX)` + `connect`, and for a uid absent from `/etc/passwd` nss_systemd then adds
//!   `prctl(PR_CAPBSET_READ)`, `readlinkat` and `rt_sigprocmask`. The job environment sets `HOME`,
//!   with which none of this happens at start-up, so neither `socket` nor `prctl` is listed here.
//! - ctypes: importing it needs nothing new, but a callback (`CFUNCTYPE`) makes libffi call
//!   `statfs` and map an anonymous writable-and-executable page (allowed under `mmap` already).
//!   `statfs` stays out, so ctypes callbacks are a violation.

/// A system call the filter allows, and why.
pub struct Entry {
    /// The name as libseccomp resolves it on the build architecture.
    pub name: &'static str,
    /// One line: what needs it.
    pub why: &'static str,
    /// Empty: allowed with any arguments. Otherwise only the socket
    /// arguments these rules list are answered; any other call is a violation.
    pub only: &'static [SocketRule],
}

const fn allow(name: &'static str, why: &'static str) -> Entry {
    Entry {
        name,
        why,
        only: &[],
    }
}

/// `socket`/`socketpair`, allowed only with the arguments `only` lists.
const fn allow_only(name: &'static str, why: &'static str, only: &'static [SocketRule]) -> Entry {
    Entry { name, why, only }
}

/// How a `socket` or `socketpair` call with these arguments is answered.
///
/// The arguments are plain integers, copied by the kernel when the call is
/// made, so the filter sees exactly what the kernel would act on.
pub struct SocketRule {
    /// Address families (argument 0), each answered alike.
    pub families: &'static [i32],
    /// The socket type (argument 1, with `SOCK_NONBLOCK`/`SOCK_CLOEXEC`
    /// masked off, as the kernel does), or any.
    pub kind: Option<i32>,
    /// The protocols (argument 2); empty for any.
    pub protocols: &'static [i32],
    /// `None`: allowed; `Some(errno)`: refused quietly with it.
    pub errno: Option<i32>,
    /// One line: what needs it.
    pub why: &'static str,
}

/// The socket types a `kind` is compared on: the kernel ignores the flag bits above.
pub const SOCK_TYPE_MASK: u64 = 0xf;

/// glibc's `getaddrinfo` with `AI_ADDRCONFIG` (Node's `net.connect`,
/// `http.get` and `fetch` by name) asks the kernel which address families
/// have interfaces with a `NETLINK_ROUTE` socket. Refused, glibc assumes both
/// IPv4 and IPv6 (`__check_pf`) and the lookup goes on; allowed, it would see
/// only the job's loopback, which does not count, and `localhost` with
/// `AF_INET` would not resolve at all. Listing interfaces
/// (`os.networkInterfaces()`, `socket.if_nameindex()`) fails with the errno.
const NETLINK_ROUTE_QUIET: SocketRule = SocketRule {
    families: &[libc::AF_NETLINK],
    kind: None,
    protocols: &[libc::NETLINK_ROUTE],
    errno: Some(libc::EAFNOSUPPORT),
    why: "getaddrinfo with AI_ADDRCONFIG lists interfaces; refused, glibc assumes IPv4 and IPv6",
};

/// `socket` for jobs with network: TCP and UDP over IPv4 and IPv6, and
/// unix-domain sockets. Every other family (`AF_VSOCK` reaches the
/// hypervisor past the namespace, `AF_PACKET`, `AF_ALG`, `AF_KEY`,
/// `AF_XDP`, other netlink protocols, ...), raw and packet sockets,
/// and any other protocol (`IPPROTO_MPTCP`, SCTP, ICMP "ping" sockets) is a
/// violation: each is kernel code no client here needs, and a family whose
/// module is not loaded would have the kernel load it.
pub const SOCKET_NETWORK: &[SocketRule] = &[
    SocketRule {
        families: &[libc::AF_UNIX],
        kind: None,
        protocols: &[],
        errno: None,
        why: "glibc probes nscd before hosts and passwd lookups (connect then finds no socket in the root)",
    },
    SocketRule {
        families: &[libc::AF_INET, libc::AF_INET6],
        kind: Some(libc::SOCK_STREAM),
        protocols: &[0, libc::IPPROTO_TCP],
        errno: None,
        why: "TCP clients (0 from libuv and socket.socket(), IPPROTO_TCP from create_connection)",
    },
    SocketRule {
        families: &[libc::AF_INET, libc::AF_INET6],
        kind: Some(libc::SOCK_DGRAM),
        protocols: &[0, libc::IPPROTO_UDP],
        errno: None,
        why: "UDP: glibc's resolver, c-ares, dgram, socket.SOCK_DGRAM",
    },
    NETLINK_ROUTE_QUIET,
];

/// `socket` for jobs without network: nothing is allowed; these two are
/// refused quietly, anything else is a violation.
pub const SOCKET_OFFLINE: &[SocketRule] = &[
    SocketRule {
        families: &[libc::AF_UNIX],
        kind: None,
        protocols: &[],
        errno: Some(libc::EACCES),
        why: "glibc probes nscd on passwd and hosts lookups (getpwuid, os.userInfo, gethostbyname) and falls back to the files",
    },
    NETLINK_ROUTE_QUIET,
];

/// `socketpair`: unix-domain pairs only (`AF_TIPC` also makes pairs).
const SOCKETPAIR_UNIX: &[SocketRule] = &[SocketRule {
    families: &[libc::AF_UNIX],
    kind: None,
    protocols: &[],
    errno: None,
    why: "a connected pair of the job's own; reaches nothing outside",
}];

/// Needed by every interpreter: loader, memory, files in the runtime root, time, signals, threads' futexes.
pub const COMMON: &[Entry] = &[
    allow("access", "the dynamic loader checks /etc/ld.so.preload"),
    allow(
        "arch_prctl",
        "the dynamic loader sets the thread pointer (ARCH_SET_FS)",
    ),
    allow("brk", "malloc's main heap"),
    allow("chdir", "os.chdir/process.chdir inside the job's own root"),
    allow(
        "chmod",
        "os.chmod, shutil.copy/copy2 and fs.chmodSync on job files",
    ),
    allow(
        "clock_getres",
        "time.get_clock_info, process.hrtime resolution",
    ),
    allow(
        "close",
        "closing files; also the child's last call before exec",
    ),
    allow(
        "clock_gettime",
        "CPU clocks (time.process_time, process.cpuUsage) are never in the vDSO, and every clock leaves it where the clocksource is hpet or acpi_pm",
    ),
    allow("epoll_create1", "asyncio's selector and libuv's event loop"),
    allow("epoll_ctl", "asyncio's selector and libuv's event loop"),
    allow(
        "epoll_wait",
        "asyncio's selector; libuv before 1.45 (Node 18, as Debian 12 ships it) waits here, not in epoll_pwait",
    ),
    allow(
        "exit",
        "a thread ending (Python threads, V8 and libuv workers)",
    ),
    allow(
        "exit_group",
        "the process ending; parked for the supervisor, which takes the exit status there and lets it through",
    ),
    allow("fchdir", "os.fchdir; stays inside the pivoted root"),
    allow(
        "fcntl",
        "fd flags (CLOEXEC, O_NONBLOCK) and sqlite's file locks",
    ),
    allow("futex", "locks and condition variables between threads"),
    allow(
        "getcwd",
        "both runtimes resolve the script path at start-up",
    ),
    allow(
        "getdents64",
        "listing directories: module search, os.listdir, fs.readdirSync",
    ),
    allow(
        "geteuid",
        "Node's secure-getenv check at start-up; sqlite on a file",
    ),
    allow(
        "getgid",
        "the prescript's identity check; Node's secure-getenv check",
    ),
    allow(
        "getpid",
        "asyncio checks its loop's owner; Node at start-up and process.pid",
    ),
    allow(
        "getppid",
        "os.getppid (0: the parent is outside the job's pid namespace)",
    ),
    allow(
        "getrandom",
        "hash seeds, os.urandom, crypto.randomBytes, V8's seeds",
    ),
    allow(
        "getrusage",
        "resource.getrusage, process.cpuUsage/resourceUsage: own usage",
    ),
    allow(
        "getsockname",
        "asyncio's self-pipe socketpair; Node's socket.address()",
    ),
    allow(
        "gettimeofday",
        "time.time and Date.now leave the vDSO where the clocksource is hpet or acpi_pm",
    ),
    allow(
        "gettid",
        "thread ids at start-up and in the thread libraries",
    ),
    allow(
        "getuid",
        "the prescript's identity check; Node's secure-getenv check",
    ),
    allow(
        "ioctl",
        "TCGETS (isatty), FIONBIO, FIOCLEX, FIONREAD on own fds",
    ),
    allow(
        "kill",
        "os.kill(os.getpid()) and process.kill(process.pid): signals to self",
    ),
    allow(
        "link",
        "os.link/fs.linkSync in the scratch dir (other filesystems: EXDEV)",
    ),
    allow(
        "lseek",
        "Python's io probes every fd; glibc rereads /etc/hosts and passwd",
    ),
    allow(
        "madvise",
        "freeing memory (MADV_DONTNEED), MADV_DONTFORK on V8 pages",
    ),
    allow(
        "mkdir",
        "os.mkdir, tempfile.mkdtemp, fs.mkdirSync in the scratch dir",
    ),
    allow(
        "mmap",
        "the dynamic loader, malloc arenas, thread stacks, V8's heap",
    ),
    allow(
        "mprotect",
        "the loader's RELRO, thread stack guards, V8's code pages",
    ),
    allow(
        "mremap",
        "glibc realloc of large blocks (growing lists, bytes, buffers)",
    ),
    allow("munmap", "releasing mappings"),
    allow(
        "newfstatat",
        "stat/fstat through glibc: module search, os.stat, fs.statSync",
    ),
    allow("openat", "opening libraries, modules and job files"),
    allow(
        "pipe2",
        "os.pipe; libuv's signal pipe and worker_threads message ports",
    ),
    allow(
        "pread64",
        "the dynamic loader reads ELF headers; libuv's fs reads",
    ),
    allow(
        "prlimit64",
        "reading RLIMIT_STACK and RLIMIT_NOFILE at start-up",
    ),
    allow("read", "stdin, files and pipes"),
    allow(
        "readlink",
        "resolving the interpreter's own path (/usr/bin/python3, /proc/self/exe)",
    ),
    allow("readlinkat", "os.readlink on job files; glibc realpath"),
    allow("rename", "os.rename/shutil.move and fs.renameSync"),
    allow(
        "rmdir",
        "os.rmdir, TemporaryDirectory cleanup, fs.rmdirSync",
    ),
    allow(
        "rseq",
        "glibc registers restartable sequences for each thread",
    ),
    allow(
        "rt_sigaction",
        "signal handlers: Python's SIGINT, Node's and libuv's handlers",
    ),
    allow(
        "rt_sigprocmask",
        "signal masks around thread creation and abort()",
    ),
    allow("rt_sigreturn", "returning from any signal handler"),
    allow(
        "sched_getaffinity",
        "glibc pthread_getattr_np (V8 finds its stack); os.sched_getaffinity",
    ),
    allow(
        "sendmsg",
        "the child sends the listener fd between filter load and exec; Node UDP",
    ),
    allow(
        "set_robust_list",
        "glibc registers each thread's robust futex list",
    ),
    allow("set_tid_address", "glibc start-up and each new thread"),
    allow(
        "symlink",
        "os.symlink/fs.symlinkSync in the scratch dir (the job's own files)",
    ),
    allow(
        "sysinfo",
        "glibc qsort sizes its buffer by physical memory (both at start-up)",
    ),
    allow(
        "tgkill",
        "abort() on fatal errors (V8 heap exhaustion, os.abort), signal.raise_signal",
    ),
    allow(
        "time",
        "glibc's time() where the vDSO cannot answer (clocksource hpet or acpi_pm)",
    ),
    allow("times", "os.times: the job's own CPU times"),
    allow(
        "uname",
        "kernel version checks at start-up (Python, V8), os.uname, os.hostname()",
    ),
    allow(
        "unlink",
        "deleting files: os.remove, fs.unlinkSync, the prescript removing itself",
    ),
    allow("write", "stdout, stderr, files and pipes"),
];

/// Only Python needs these.
pub const PYTHON: &[Entry] = &[
    allow("clock_nanosleep", "time.sleep"),
    allow("fdatasync", "sqlite3 committing to a database file"),
    allow("fsync", "os.fsync on a job file"),
    allow("pwrite64", "sqlite3 writing pages of a database file"),
    allow(
        "sendfile",
        "shutil.copyfile's in-kernel copy between two files",
    ),
    allow_only(
        "socketpair",
        "asyncio's self-pipe; a connected pair, reaches nothing outside",
        SOCKETPAIR_UNIX,
    ),
    allow("truncate", "os.truncate on a path"),
    allow("unlinkat", "shutil.rmtree and TemporaryDirectory cleanup"),
    allow(
        "utimensat",
        "os.utime, shutil.copy2/copystat copying timestamps",
    ),
];

/// Only Node.js needs these.
pub const NODEJS: &[Entry] = &[
    allow(
        "capget",
        "secure-getenv check at start-up: ignores env when capabilities are held",
    ),
    allow("copy_file_range", "fs.copyFileSync/fs.copyFile"),
    allow("epoll_pwait", "libuv's event loop"),
    allow("eventfd2", "libuv wakes its loop from worker threads"),
    allow("fchmod", "fs.copyFileSync copies the mode; fs.fchmod"),
    allow("fstat", "libuv stats open fds (stdio, fs.fstat)"),
    allow(
        "ftruncate",
        "fs.copyFileSync truncates the target; fs.ftruncate",
    ),
    allow(
        "getegid",
        "secure-getenv check at start-up compares real and effective gid",
    ),
    allow(
        "sched_yield",
        "V8's spinning locks under contention (GC threads)",
    ),
    allow("statx", "libuv's stat: fs.statSync, module resolution"),
    allow(
        "writev",
        "fs write streams and sockets flush queued chunks at once",
    ),
];

/// Sockets and name resolution: only when the job asks for network and the worker allows it.
pub const NETWORK: &[Entry] = &[
    allow(
        "bind",
        "Node's dgram binds UDP sockets to an ephemeral port before sending",
    ),
    allow(
        "connect",
        "TCP connections, connected UDP, glibc's resolver",
    ),
    allow(
        "getpeername",
        "Node's socket.remoteAddress, Python's getpeername",
    ),
    allow("getsockopt", "SO_ERROR after a non-blocking connect"),
    allow(
        "poll",
        "Python socket timeouts and glibc's resolver waiting for replies",
    ),
    allow("recvfrom", "socket.recv, c-ares and glibc resolver replies"),
    allow("recvmsg", "Node's dgram receiving datagrams"),
    allow(
        "sendmmsg",
        "glibc's resolver sends the A and AAAA queries together",
    ),
    allow("sendto", "socket.send/sendto, c-ares queries"),
    allow("setsockopt", "TCP_NODELAY and keep-alive on client sockets"),
    allow("shutdown", "Node's socket.end() half-closes the connection"),
    allow_only(
        "socket",
        "creating TCP and UDP sockets, by family, type and protocol",
        SOCKET_NETWORK,
    ),
];

/// Calls the interpreters probe and cope without: answered with this errno instead of killing the job.
pub const QUIET_DENY: &[(&str, i32, &str)] = &[
    (
        "clone3",
        38, /* ENOSYS */
        "glibc's pthread_create falls back to clone, which gets the CLONE_THREAD rule",
    ),
    (
        "io_uring_setup",
        38, /* ENOSYS */
        "libuv falls back to epoll and its thread pool",
    ),
    (
        "listxattr",
        95, /* ENOTSUP */
        "shutil.copy2/copystat skip extended attributes on ENOTSUP",
    ),
    (
        "pkey_alloc",
        38, /* ENOSYS */
        "V8 probes memory protection keys and works without them",
    ),
];

/// System V IPC and POSIX message queue calls: none is allowed by default, so
/// jobs can create nothing in an IPC namespace and may share one empty
/// namespace. An operator who allows any of these gets one per job.
pub const IPC: &[&str] = &[
    "ipc",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedsend",
    "mq_unlink",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
];

/// Whether an `--allow-syscall` entry (plain, or `x86:`/`x32:` prefixed) is
/// an IPC call.
pub fn is_ipc(name: &str) -> bool {
    let bare = name.rsplit(':').next().unwrap_or(name);
    IPC.iter()
        .any(|ipc| bare == *ipc || bare.strip_suffix("_time64") == Some(ipc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipc_calls_are_recognized_in_every_spelling() {
        for name in [
            "shmget",
            "x86:semop",
            "x32:msgrcv",
            "semtimedop_time64",
            "ipc",
        ] {
            assert!(is_ipc(name), "{name}");
        }
        for name in ["sendmsg", "getpid", "x86:getpid", "mq_", "shm"] {
            assert!(!is_ipc(name), "{name}");
        }
        let allowed = COMMON.iter().chain(PYTHON).chain(NODEJS).chain(NETWORK);
        assert!(
            allowed.clone().all(|e| !is_ipc(e.name)),
            "no IPC call is allowed by default, which is what lets jobs share an IPC namespace"
        );
    }
}

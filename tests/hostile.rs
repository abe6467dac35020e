//! Hostile code: each case is a small attack with its exact expected outcome,
//! and each is followed by a harmless job that must still succeed (the worker
//! survives every one). Real worker, real Redis, real kernel; no mocks.
//!
//! The raw syscall numbers and the machine code below are x86_64.
#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

mod common;
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The first line of the sandbox's own /etc/passwd (the host's root has a shell).
const SANDBOX_ROOT_LINE: &str = "root:x:0:0:root:/root:/usr/sbin/nologin\n";
/// Per-stream output cap (the worker's default).
const OUTPUT_LIMIT: usize = 1024 * 1024;
/// Largest stdin a job may carry.
const MAX_STDIN: usize = 8 * 1024 * 1024;

#[derive(Clone, Copy, Debug)]
enum Stream {
    Stdout,
    Stderr,
}

enum Expect {
    /// `ok`, exit code 0, stdout exactly this.
    Stdout(&'static str),
    /// `error`, exit code 1, stderr containing this.
    Error(&'static str),
    /// `violation` naming this syscall and its number.
    Violation(&'static str, i64),
    /// A `violation` of `socket` or `socketpair` whose error spells the call
    /// with its arguments, e.g. `socket(AF_VSOCK, SOCK_STREAM, 0)`.
    SocketViolation(&'static str),
    /// `timeout` by the wall clock, soon after the deadline.
    Timeout,
    MemoryLimit,
    /// `output_limit` with this stream cut at the cap.
    OutputLimit(Stream),
    /// `rejected` with an error containing this.
    Rejected(&'static str),
    /// One of these exact outcomes: only for calls whose place in the
    /// allowlist is a policy choice, where both answers keep the job inside.
    AnyOf(Vec<Expect>),
    Custom(fn(&Value) -> Result<(), String>),
}

struct Case {
    name: &'static str,
    job: Value,
    expect: Expect,
}

impl Case {
    fn timeout(mut self, ms: u64) -> Case {
        self.job["timeout_ms"] = json!(ms);
        self
    }
    fn memory(mut self, mb: u64) -> Case {
        self.job["memory_mb"] = json!(mb);
        self
    }
    fn stdin(mut self, s: String) -> Case {
        self.job["stdin"] = json!(s);
        self
    }
    fn network(mut self) -> Case {
        self.job["enable_network"] = json!(true);
        self
    }
}

fn python(name: &'static str, code: impl Into<String>, expect: Expect) -> Case {
    Case {
        name,
        job: json!({"language": "python3", "code": code.into(), "timeout_ms": 5000}),
        expect,
    }
}

fn nodejs(name: &'static str, code: impl Into<String>, expect: Expect) -> Case {
    Case {
        name,
        job: json!({"language": "nodejs", "code": code.into(), "timeout_ms": 5000}),
        expect,
    }
}

/// A raw syscall through ctypes that must never return.
fn raw_syscall(name: &'static str, nr: i64) -> Case {
    python(
        name,
        format!(
            "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n\
             r = libc.syscall({nr}, 0, 0, 0, 0, 0)\nprint('UNREACHED', r, ctypes.get_errno())"
        ),
        Expect::Violation(name, nr),
    )
}

/// Python that runs `hex` as machine code from an executable anonymous mapping.
fn machine_code(hex: &str) -> String {
    format!(
        "import ctypes, mmap\n\
         m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n\
         m.write(bytes.fromhex('{hex}'))\n\
         f = ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(m)))\n\
         print('UNREACHED', f())"
    )
}

/// A process spawn through a library: stopped at the pipe it sets up first
/// (pipe2 is not in the Python allowlist), or else at the fork itself.
fn spawn_stopped(fork_nr: i64) -> Expect {
    let fork = if fork_nr == 58 { "vfork" } else { "clone" };
    Expect::AnyOf(vec![
        Expect::Violation("pipe2", 293),
        Expect::Violation(fork, fork_nr),
    ])
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

fn expect_status(r: &Value, status: &str) -> Result<(), String> {
    if r["status"] == status {
        Ok(())
    } else {
        Err(format!("expected status {status}"))
    }
}

fn check(expect: &Expect, r: &Value, job: &Value) -> Result<(), String> {
    if s(&r["stdout"]).contains("UNREACHED") {
        return Err("code after the blocked call ran".into());
    }
    match expect {
        Expect::Stdout(out) => {
            expect_status(r, "ok")?;
            if r["exit_code"] != 0 || s(&r["stdout"]) != *out {
                return Err(format!("expected exit 0 and stdout {out:?}"));
            }
        }
        Expect::Error(needle) => {
            expect_status(r, "error")?;
            if r["exit_code"] != 1 || !s(&r["stderr"]).contains(needle) {
                return Err(format!("expected exit 1 and stderr containing {needle:?}"));
            }
        }
        Expect::Violation(name, nr) => check_violation(r, name, *nr, name)?,
        Expect::SocketViolation(call) => {
            let (name, nr) = if call.starts_with("socketpair(") {
                ("socketpair", 53)
            } else {
                ("socket", 41)
            };
            check_violation(r, name, nr, call)?
        }
        Expect::Timeout => {
            expect_status(r, "timeout")?;
            // The job was pushed with its timeout stretched by the time
            // scale; so is the slack.
            let limit = scaled_ms(job["timeout_ms"].as_u64().unwrap_or(5000));
            let slack = scaled_ms(1500);
            let took = r["duration_ms"].as_u64().unwrap_or(u64::MAX);
            if r["signal"] != "SIGKILL" || took < limit || took > limit + slack {
                return Err(format!(
                    "expected SIGKILL between {limit} and {} ms",
                    limit + slack
                ));
            }
        }
        Expect::MemoryLimit => {
            expect_status(r, "memory_limit")?;
            let mb = job["memory_mb"].as_u64().unwrap_or(256);
            if s(&r["error"]) != format!("exceeded the memory limit of {mb} MiB") {
                return Err("expected the memory limit in the error".into());
            }
        }
        Expect::OutputLimit(stream) => {
            expect_status(r, "output_limit")?;
            let (cut, other) = match stream {
                Stream::Stdout => ("stdout", "stderr"),
                Stream::Stderr => ("stderr", "stdout"),
            };
            let len = s(&r[cut]).len();
            if r[format!("{cut}_truncated")] != true || r[format!("{other}_truncated")] != false {
                return Err(format!("expected only {cut} truncated"));
            }
            if len != OUTPUT_LIMIT {
                return Err(format!(
                    "expected {cut} cut at exactly {OUTPUT_LIMIT} bytes, got {len}"
                ));
            }
        }
        Expect::Rejected(needle) => {
            expect_status(r, "rejected")?;
            if !s(&r["error"]).contains(needle) {
                return Err(format!("expected error containing {needle:?}"));
            }
        }
        Expect::AnyOf(options) => {
            let errors: Vec<String> = options
                .iter()
                .filter_map(|e| check(e, r, job).err())
                .collect();
            if errors.len() == options.len() {
                return Err(format!("none of: {}", errors.join(" / ")));
            }
        }
        Expect::Custom(f) => f(r)?,
    }
    Ok(())
}

/// `violation` of syscall `name` (number `nr`), SIGKILL, and an error that
/// spells `call`.
fn check_violation(r: &Value, name: &str, nr: i64, call: &str) -> Result<(), String> {
    expect_status(r, "violation")?;
    let want = json!({"syscall": name, "number": nr});
    if r["violation"] != want {
        return Err(format!("expected violation {want}"));
    }
    if s(&r["error"]) != format!("blocked system call: {call}") || r["signal"] != "SIGKILL" {
        return Err(format!("expected error naming {call} and SIGKILL"));
    }
    Ok(())
}

/// The result without its bulk: streams cut to their last 300 characters.
fn summary(r: &Value) -> String {
    let mut r = r.clone();
    for k in ["stdout", "stderr"] {
        let text = s(&r[k]);
        let cut: String = text
            .chars()
            .rev()
            .take(300)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if cut.len() < text.len() {
            r[k] = json!(format!("[{} bytes] ...{cut}", text.len()));
        }
    }
    for k in [
        "id",
        "worker",
        "attempt",
        "language",
        "cpu_ms",
        "max_rss_kb",
    ] {
        if let Some(o) = r.as_object_mut() {
            o.remove(k);
        }
    }
    r.to_string()
}

/// Run every case, each followed by `print('ok')`; fail once, listing every miss.
fn run_cases(c: &mut redis::Connection, w: &mut Worker, cases: Vec<Case>) {
    let mut failures = Vec::new();
    for case in &cases {
        let r = run_job(c, &w.prefix, case.job.clone());
        if let Err(why) = check(&case.expect, &r, &case.job) {
            let network = if case.job["enable_network"] == true {
                " (network)"
            } else {
                ""
            };
            failures.push(format!(
                "{}{network}: {why}; got {}",
                case.name,
                summary(&r)
            ));
        }
        let after = py(c, &w.prefix, "print('ok')");
        if after["status"] != "ok" || after["stdout"] != "ok\n" {
            failures.push(format!(
                "{}: the next harmless job failed: {}",
                case.name,
                summary(&after)
            ));
        }
    }
    assert!(w.alive(), "the worker died; log:\n{}", w.log());
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

#[test]
fn secrets_and_host_paths_are_out_of_reach() {
    let Some(mut c) = redis() else { return };
    let p = prefix("hostile-secrets");
    let mut w = Worker::start(&p, &["--concurrency", "2"]);
    let host_cwd = std::env::current_dir().unwrap().display().to_string();
    let worker_paths = json!([
        "/run/sandq",
        "/run",
        "/root",
        "/home",
        "/var",
        "/proc",
        "/sys",
        "/work",
        BIN,
        host_cwd
    ]);
    let cases = vec![
        python(
            "read /etc/shadow",
            "print(open('/etc/shadow').read())\nprint('UNREACHED')",
            Expect::Error("FileNotFoundError: [Errno 2] No such file or directory: '/etc/shadow'"),
        ),
        python(
            "read /proc/1/environ (no /proc)",
            "print(open('/proc/1/environ').read())",
            Expect::Error("FileNotFoundError: [Errno 2] No such file or directory: '/proc/1/environ'"),
        ),
        python(
            "read the worker binary",
            format!("open({BIN:?}, 'rb').read()"),
            Expect::Error("FileNotFoundError: [Errno 2] No such file or directory"),
        ),
        python(
            "worker state, home dirs and host paths do not exist",
            format!("import os\nprint([p for p in {worker_paths} if os.path.lexists(p)])"),
            Expect::Stdout("[]\n"),
        ),
        python(
            "listing / shows only the runtime root",
            "import os\ntop = set(os.listdir('/'))\n\
             print(sorted(top - {'tmp', 'etc', 'dev', 'usr', 'bin', 'lib', 'lib64', 'sbin'}), \
             {'tmp', 'etc', 'dev', 'usr'} <= top, os.path.exists('/home'), os.path.exists('/root'))",
            Expect::Stdout("[] True False False\n"),
        ),
        python(
            "walking the whole tree finds no host directory",
            "import os\nhost = {'home', 'root', 'proc', 'sys', 'run', 'var', 'work', 'mnt', 'opt', 'srv', 'boot', 'media'}\n\
             seen = []\nfor d, dirs, _ in os.walk('/'):\n    if d == '/':\n        dirs.remove('usr')\n    seen.append(d)\n\
             print(len(seen) > 3, [d for d in seen if d.split('/')[1] in host])",
            Expect::Stdout("True []\n"),
        ),
        python(
            "/etc holds no secrets",
            "import os\nprint(sorted(set(os.listdir('/etc')) & {'shadow', 'gshadow', 'shadow-', 'sudoers', \
             'ssh', 'machine-id', 'environment', 'sandq', 'redis', 'passwd-'}))",
            Expect::Stdout("[]\n"),
        ),
        python(
            "/etc/passwd is the sandbox's own: root and job accounts, no shells",
            "lines = open('/etc/passwd').read().splitlines()\n\
             job = lambda l: l.startswith('sandbox') and l.endswith(':sandq job:/tmp:/usr/sbin/nologin')\n\
             print(lines[0], [l for l in lines[1:] if not job(l)])",
            Expect::Stdout("root:x:0:0:root:/root:/usr/sbin/nologin []\n"),
        ),
        python(
            "/dev holds four harmless devices",
            "import os\nprint(sorted(os.listdir('/dev')))",
            Expect::Stdout("['null', 'random', 'urandom', 'zero']\n"),
        ),
        python(
            "the prescript is gone and the key fd is closed",
            "import os\nprint(os.listdir('/tmp'))\ntry:\n    os.read(3, 1)\nexcept OSError as e:\n    print(e.errno)",
            Expect::Stdout("[]\n9\n"),
        ),
        python(
            "identity: own uid and gid from the range, own hostname",
            "import os\nu = os.getuid()\nprint(10000 <= u <= 10999, os.getgid() == u, os.geteuid() == u, \
             os.uname().nodename, open('/etc/hostname').read().strip())",
            Expect::Stdout("True True True sandbox sandbox\n"),
        ),
    ];
    run_cases(&mut c, &mut w, cases);
}

#[test]
fn writes_links_and_root_escapes_fail() {
    let Some(mut c) = redis() else { return };
    let p = prefix("hostile-fs");
    let mut w = Worker::start(&p, &["--concurrency", "2"]);
    let cases = vec![
        python(
            "write under /usr",
            "open('/usr/lib/evil', 'w').write('x')",
            Expect::Error("OSError: [Errno 30] Read-only file system: '/usr/lib/evil'"),
        ),
        python(
            "overwrite /etc/passwd",
            "open('/etc/passwd', 'w').write('root::0:0::/:/bin/sh')",
            Expect::Error("OSError: [Errno 30] Read-only file system: '/etc/passwd'"),
        ),
        python(
            "mkdir in /",
            "import os\nos.mkdir('/evil')",
            Expect::Error("OSError: [Errno 30] Read-only file system: '/evil'"),
        ),
        python(
            "create a device-dir file",
            "open('/dev/evil', 'w').write('x')",
            Expect::Error("OSError: [Errno 30] Read-only file system: '/dev/evil'"),
        ),
        python(
            "escape scratch with ..",
            "open('/tmp/../../evil', 'w').write('x')",
            Expect::Error("OSError: [Errno 30] Read-only file system: '/tmp/../../evil'"),
        ),
        python(
            "open the interpreter for writing",
            "open('/usr/bin/python3', 'r+b')",
            Expect::Error("PermissionError: [Errno 13] Permission denied: '/usr/bin/python3'"),
        ),
        python(
            "symlink to /etc/passwd, then read it",
            "import os\nos.symlink('/etc/passwd', 'p')\nprint(open('p').readline(), end='')",
            Expect::AnyOf(vec![Expect::Violation("symlink", 88), Expect::Stdout(SANDBOX_ROOT_LINE)]),
        ),
        python(
            "hard link to a file under /usr",
            "import os\ntry:\n    os.link('/usr/bin/python3', 'h')\n    print('UNREACHED linked')\n\
             except OSError as e:\n    print('refused' if e.errno in (1, 18) else e)",
            Expect::AnyOf(vec![Expect::Violation("link", 86), Expect::Stdout("refused\n")]),
        ),
        python(
            "chdir('..') fifty times stays in the sandbox root",
            "import os\nfor _ in range(50):\n    os.chdir('..')\n\
             print(os.getcwd(), os.stat('.').st_ino == os.stat('/').st_ino, sorted(os.listdir('.')) == sorted(os.listdir('/')))",
            Expect::AnyOf(vec![
                Expect::Violation("chdir", 80),
                Expect::Stdout("/ True True\n"),
            ]),
        ),
        python(
            "os.chroot",
            "import os\nos.chroot('/tmp')\nprint('UNREACHED')",
            Expect::Violation("chroot", 161),
        ),
        python(
            "fchdir to a fd opened on / then climb",
            "import os\nfd = os.open('/', os.O_RDONLY)\nos.fchdir(fd)\nfor _ in range(20):\n    os.chdir('..')\n\
             print(os.getcwd(), sorted(os.listdir('.')) == sorted(os.listdir('/')))",
            Expect::AnyOf(vec![Expect::Violation("fchdir", 81), Expect::Stdout("/ True\n")]),
        ),
        python(
            "open_tree on / (detached mount copy)",
            "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n\
             print('UNREACHED', libc.syscall(428, -100, b'/', 1 | 0x80000), ctypes.get_errno())",
            Expect::Violation("open_tree", 428),
        ),
        python(
            "openat2 on /.. with an open_how",
            "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nhow = (ctypes.c_uint64 * 3)(0, 0, 0)\n\
             print('UNREACHED', libc.syscall(437, -100, b'/..', ctypes.byref(how), 24), ctypes.get_errno())",
            Expect::Violation("openat2", 437),
        ),
        python(
            "load a shared object written to scratch (noexec)",
            "import ctypes\n\
             open('/tmp/evil.so', 'wb').write(open('/usr/lib/x86_64-linux-gnu/libm.so.6', 'rb').read())\n\
             ctypes.CDLL('/tmp/evil.so')",
            Expect::Error("OSError: /tmp/evil.so: failed to map segment from shared object"),
        ),
        python(
            "map a scratch file executable",
            "import mmap, os\nfd = os.open('/tmp/x', os.O_RDWR | os.O_CREAT)\nos.write(fd, b'\\xc3' * 4096)\n\
             mmap.mmap(fd, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)",
            Expect::Error("PermissionError: [Errno 1] Operation not permitted"),
        ),
    ];
    run_cases(&mut c, &mut w, cases);
}

fn thread_bomb_stops(r: &Value) -> Result<(), String> {
    expect_status(r, "error")?;
    if !s(&r["stderr"]).contains("RuntimeError: can't start new thread") {
        return Err("expected RuntimeError: can't start new thread".into());
    }
    // The threads sleep 30 s: the job must end when the main thread fails.
    if r["duration_ms"].as_u64().unwrap_or(u64::MAX) > scaled_ms(5000) {
        return Err("the job hung after the thread limit".into());
    }
    Ok(())
}

#[test]
fn resource_bombs_are_contained() {
    let Some(mut c) = redis() else { return };
    let p = prefix("hostile-bombs");
    let mut w = Worker::start(&p, &["--concurrency", "2"]);
    let cases = vec![
        python("fork bomb", "import os\nwhile True:\n    os.fork()", Expect::Violation("clone", 56)),
        python(
            "thread bomb (1000 threads, pids max 64)",
            "import threading, time\nfor _ in range(1000):\n    \
             threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\nprint('UNREACHED')",
            Expect::Custom(thread_bomb_stops),
        )
        .timeout(10_000),
        python(
            "bytearray of 4 GiB",
            "b = bytearray(4 * 1024 ** 3)\nprint('UNREACHED', len(b))",
            Expect::MemoryLimit,
        )
        .memory(128),
        python(
            "list growth loop",
            "l = []\nwhile True:\n    l.append('x' * 10 ** 6 + str(len(l)))",
            Expect::MemoryLimit,
        )
        .memory(128)
        .timeout(10_000),
        python(
            "unbounded recursion with the limit lifted",
            "import sys\nsys.setrecursionlimit(10 ** 9)\ndef f(n):\n    return f(n + 1) + 1\nf(0)",
            Expect::MemoryLimit,
        )
        .memory(128)
        .timeout(10_000),
        python(
            "fill scratch with one file",
            "f = open('/tmp/big', 'wb')\nchunk = b'x' * (1 << 20)\nwhile True:\n    f.write(chunk)\n    f.flush()",
            Expect::Error("OSError: [Errno 27] File too large"),
        )
        .timeout(10_000),
        python(
            "fill scratch with many files",
            "chunk = b'x' * (1 << 20)\ni = 0\nwhile True:\n    with open('/tmp/f%d' % i, 'wb') as f:\n        \
             f.write(chunk)\n    i += 1",
            Expect::Error("OSError: [Errno 28] No space left on device"),
        )
        .timeout(10_000),
        python(
            "exhaust scratch inodes",
            "i = 0\nwhile True:\n    open('/tmp/e%d' % i, 'wb').close()\n    i += 1",
            Expect::Error("OSError: [Errno 28] No space left on device: '/tmp/e"),
        )
        .timeout(10_000),
        python(
            "stdout flood",
            "import sys\nfor _ in range(4):\n    sys.stdout.write('o' * (1 << 20))\n    sys.stdout.flush()",
            Expect::OutputLimit(Stream::Stdout),
        ),
        python(
            "stderr flood",
            "import sys\nfor _ in range(4):\n    sys.stderr.write('e' * (1 << 20))\n    sys.stderr.flush()",
            Expect::OutputLimit(Stream::Stderr),
        ),
        python(
            "fd exhaustion",
            "fds = [open('/dev/null') for _ in range(100000)]",
            Expect::Error("OSError: [Errno 24] Too many open files: '/dev/null'"),
        ),
        python(
            "raise the hard rlimits",
            "import resource\nfor r in (resource.RLIMIT_NOFILE, resource.RLIMIT_CPU, resource.RLIMIT_FSIZE):\n    \
             try:\n        resource.setrlimit(r, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n        \
             print('UNREACHED', r)\n    except ValueError as e:\n        print(e)",
            Expect::Stdout("not allowed to raise maximum limit\n".repeat(3).leak()),
        ),
        python("infinite loop", "while True:\n    pass", Expect::Timeout).timeout(1000),
        python(
            "ignore SIGTERM and every catchable signal, then loop",
            "import signal\nfor s in signal.valid_signals():\n    try:\n        signal.signal(s, signal.SIG_IGN)\n    \
             except (OSError, ValueError):\n        pass\nwhile True:\n    pass",
            Expect::Timeout,
        )
        .timeout(1000),
        python("sleep past the deadline", "import time\ntime.sleep(100)", Expect::Timeout).timeout(1000),
        python(
            "close stdout and stderr, then loop",
            "import os\nos.close(1)\nos.close(2)\nwhile True:\n    pass",
            Expect::Timeout,
        )
        .timeout(1000),
    ];
    run_cases(&mut c, &mut w, cases);
}

#[test]
fn dangerous_syscalls_are_named_violations() {
    let Some(mut c) = redis() else { return };
    let p = prefix("hostile-syscalls");
    let mut w = Worker::start(&p, &["--concurrency", "2"]);
    let mut cases: Vec<Case> = [
        ("ptrace", 101),
        ("mount", 165),
        ("umount2", 166),
        ("unshare", 272),
        ("setns", 308),
        ("keyctl", 250),
        ("add_key", 248),
        ("bpf", 321),
        ("perf_event_open", 298),
        ("userfaultfd", 323),
        ("reboot", 169),
        ("init_module", 175),
        ("finit_module", 313),
        ("kexec_load", 246),
        ("pivot_root", 155),
        ("process_vm_readv", 310),
        ("process_vm_writev", 311),
        ("open_by_handle_at", 304),
        ("capset", 126),
        ("fork", 57),
        ("vfork", 58),
        ("execveat", 322),
        // No IPC call: jobs share one empty IPC namespace (see the next test).
        ("shmget", 29),
        ("semget", 64),
        ("msgget", 68),
        ("mq_open", 240),
    ]
    .into_iter()
    .map(|(name, nr)| raw_syscall(name, nr))
    .collect();
    cases.extend([
        // Quiet denials: the runtimes probe these and fall back.
        python(
            "io_uring_setup is quietly refused",
            "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(libc.syscall(425, 1, 0), ctypes.get_errno())",
            Expect::Stdout("-1 38\n"),
        ),
        python(
            "clone3 is quietly refused",
            "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint(libc.syscall(435, 0, 0), ctypes.get_errno())",
            Expect::Stdout("-1 38\n"),
        ),
        python(
            "clone with CLONE_THREAD plus CLONE_NEWNS: the filter refuses namespace flags",
            "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n\
             print(libc.syscall(56, 0x10000 | 0x800 | 0x100 | 0x20000, 0, 0, 0, 0), ctypes.get_errno())",
            Expect::Violation("clone", 56),
        ),
        python("os.setuid(0)", "import os\nos.setuid(0)\nprint('UNREACHED')", Expect::Violation("setuid", 105)),
        python("os.setgid(0)", "import os\nos.setgid(0)\nprint('UNREACHED')", Expect::Violation("setgid", 106)),
        python("os.setgroups([0])", "import os\nos.setgroups([0])", Expect::Violation("setgroups", 116)),
        python("os.setresuid(0, 0, 0)", "import os\nos.setresuid(0, 0, 0)", Expect::Violation("setresuid", 117)),
        python("os.execv /bin/sh", "import os\nos.execv('/bin/sh', ['sh', '-c', 'id'])", Expect::Violation("execve", 59)),
        python(
            "execve through ctypes",
            "import ctypes\nctypes.CDLL(None).execve(b'/bin/sh', None, None)\nprint('UNREACHED')",
            Expect::Violation("execve", 59),
        ),
        python("os.system", "import os\nprint('UNREACHED', os.system('id'))", Expect::Violation("clone", 56)),
        python("os.popen", "import os\nprint('UNREACHED', os.popen('id').read())", spawn_stopped(58)),
        python("subprocess.run", "import subprocess\nsubprocess.run(['id'])", spawn_stopped(58)),
        python(
            "os.posix_spawn",
            "import os\nprint('UNREACHED', os.posix_spawn('/usr/bin/id', ['id'], {}))",
            Expect::Violation("clone", 56),
        ),
        python(
            "multiprocessing.Process",
            "import multiprocessing\np = multiprocessing.Process(target=print, args=('UNREACHED',))\np.start()\np.join()",
            spawn_stopped(56),
        ),
        python("pty.spawn /bin/sh", "import pty\npty.spawn('/bin/sh')", Expect::Error("OSError: out of pty devices")),
        python(
            "fork by the syscall instruction from JIT code",
            machine_code("b8390000000f05c3"),
            Expect::Violation("fork", 57),
        ),
        python("i386 ABI through int 0x80", machine_code("b814000000cd80c3"), Expect::Violation("x86:getpid", 20)),
        python("x32 ABI syscall number", machine_code("b8270000400f05c3"), Expect::Violation("x32:getpid", 0x4000_0027)),
        python(
            "kill(-1, SIGKILL): nothing else in the pid namespace",
            "import os, signal\nprint(os.getpid(), flush=True)\nos.kill(-1, signal.SIGKILL)",
            Expect::Error("ProcessLookupError: [Errno 3] No such process"),
        ),
        python(
            "kill(getppid(), 9): the parent is outside, pid 0 is our own group",
            "import os\nprint('ppid', os.getppid(), flush=True)\nos.kill(os.getppid(), 9)\nprint('survived')",
            Expect::AnyOf(vec![
                Expect::Violation("getppid", 110),
                Expect::Stdout("ppid 0\nsurvived\n"),
            ]),
        ),
        python(
            "kill(1, SIGKILL) from inside: pid 1 is the job itself",
            "import os\nos.kill(1, 9)\nprint(os.getpid(), 'survived')",
            Expect::Stdout("1 survived\n"),
        ),
        python(
            "connect to Redis with network off",
            "import socket\ns = socket.create_connection(('127.0.0.1', 6379), timeout=2)\nprint('UNREACHED')",
            Expect::SocketViolation("socket(AF_INET, SOCK_STREAM, IPPROTO_TCP)"),
        ),
    ]);
    run_cases(&mut c, &mut w, cases);
}

#[test]
fn concurrent_jobs_cannot_see_each_other() {
    let Some(mut c) = redis() else { return };
    let p = prefix("hostile-neighbours");
    let mut w = Worker::start(&p, &["--concurrency", "2"]);
    let secret = format!("secret-{:016x}", rand::random::<u64>());
    let first = json!({
        "id": format!("first-{:08x}", rand::random::<u32>()),
        "language": "python3",
        "timeout_ms": 10_000,
        "code": format!(
            "import os, time\nopen('/tmp/secret.txt', 'w').write('{secret}')\nprint(os.getuid(), flush=True)\n\
             time.sleep({})\nprint(sorted(os.listdir('/tmp')), open('/tmp/secret.txt').read())",
            3.0 * time_scale()
        ),
    });
    push(&mut c, &p, &first);
    std::thread::sleep(scaled(Duration::from_millis(700)));
    let started = Instant::now();
    let probe = "import os\nprint(os.getuid())\nprint(sorted(os.listdir('/tmp')))\n\
                 found = []\nfor d, dirs, files in os.walk('/'):\n    \
                 if d == '/':\n        dirs.remove('usr')\n    found += [os.path.join(d, f) for f in files if 'secret' in f]\n\
                 print(found)";
    let second = py(&mut c, &p, probe);
    assert!(
        started.elapsed() < scaled(Duration::from_millis(2000)),
        "the probe ran after the first job"
    );
    let first = result(&mut c, &p, s(&first["id"]), Duration::from_secs(20));
    assert_status(&first, "ok");
    assert_status(&second, "ok");
    let first_out: Vec<&str> = s(&first["stdout"]).lines().collect();
    let second_out: Vec<&str> = s(&second["stdout"]).lines().collect();
    assert_eq!(first_out[1], format!("['secret.txt'] {secret}"), "{first}");
    assert_eq!(
        second_out[1..],
        ["[]", "[]"],
        "the second job saw the first one's files: {second}"
    );
    assert!(!s(&second["stdout"]).contains(&secret));
    assert_ne!(first_out[0], second_out[0], "two running jobs shared a uid");
    run_cases(&mut c, &mut w, Vec::new());
}

fn host_redis_is_unreachable(r: &Value) -> Result<(), String> {
    let out = s(&r["stdout"]);
    if out.contains("PONG") {
        return Err("a job reached the worker's own Redis on the host loopback".into());
    }
    if r["status"] == "violation" || (r["status"] == "ok" && out.starts_with("refused ")) {
        Ok(())
    } else {
        Err("expected the connection to fail".into())
    }
}

#[test]
fn network_jobs_cannot_reach_host_services() {
    let Some(mut c) = redis() else { return };
    let p = prefix("hostile-net");
    let mut w = Worker::start(&p, &["--concurrency", "2", "--allow-network", "true"]);
    let url = redis_url();
    let hostport = url
        .trim_start_matches("redis://")
        .split(['/', '@'])
        .next()
        .unwrap_or("");
    let port: u16 = hostport
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(6379);
    // Raw libc calls: the probe depends on socket and connect only.
    let code = format!(
        "import ctypes, os, struct\nlibc = ctypes.CDLL(None, use_errno=True)\nfd = libc.socket(2, 1, 0)\n\
         addr = struct.pack('=H', 2) + struct.pack('>H', {port}) + bytes([127, 0, 0, 1]) + bytes(8)\n\
         if libc.connect(fd, addr, len(addr)) != 0:\n    print('refused', ctypes.get_errno())\nelse:\n    \
         os.write(fd, b'PING\\r\\n')\n    print(os.read(fd, 100))"
    );
    let cases = vec![
        python(
            "connect to the host Redis with enable_network",
            code,
            Expect::Custom(host_redis_is_unreachable),
        )
        .network(),
        python(
            "network jobs still cannot fork",
            "import os\nos.fork()\nprint('UNREACHED')",
            Expect::Violation("clone", 56),
        )
        .network(),
    ];
    run_cases(&mut c, &mut w, cases);
}

/// `socket(family, kind, protocol)` from Python, to be refused and named.
fn socket_refused(call: &'static str, family: i64, kind: i64, protocol: i64) -> Case {
    python(
        call,
        format!("import socket\ns = socket.socket({family}, {kind}, {protocol})\nprint('UNREACHED', s.fileno())"),
        Expect::SocketViolation(call),
    )
}

/// `socketpair(family, kind, protocol)` from Python, to be refused and named.
fn socketpair_refused(call: &'static str, family: i64, kind: i64) -> Case {
    python(
        call,
        format!("import socket\np = socket.socketpair({family}, {kind}, 0)\nprint('UNREACHED', p)"),
        Expect::SocketViolation(call),
    )
}

/// A socket the filter refuses quietly: the job sees this errno and goes on.
fn socket_quiet(
    name: &'static str,
    family: i64,
    kind: i64,
    protocol: i64,
    errno: &'static str,
) -> Case {
    python(
        name,
        format!(
            "import socket\ntry:\n    socket.socket({family}, {kind}, {protocol})\n    print('UNREACHED')\n\
             except OSError as e:\n    print(e.errno)"
        ),
        Expect::Stdout(errno),
    )
}

/// Families, types and protocols outside the network profile (TCP and UDP
/// over IPv4 and IPv6, unix sockets): refused with network and without.
fn refused_everywhere() -> Vec<Case> {
    vec![
        // A channel to the hypervisor, past the namespace and the relay.
        socket_refused("socket(AF_VSOCK, SOCK_STREAM, 0)", 40, 1, 0),
        socket_refused("socket(AF_VSOCK, SOCK_DGRAM, 0)", 40, 2, 0),
        // Netlink other than the route probe: socket diagnostics, uevents, audit.
        socket_refused("socket(AF_NETLINK, SOCK_RAW, 4)", 16, 3, 4),
        socket_refused("socket(AF_NETLINK, SOCK_DGRAM, 15)", 16, 2, 15),
        socket_refused("socket(AF_NETLINK, SOCK_RAW, 9)", 16, 3, 9),
        // ETH_P_ALL in network byte order.
        socket_refused("socket(AF_PACKET, SOCK_RAW, 768)", 17, 3, 768),
        socket_refused("socket(AF_PACKET, SOCK_DGRAM, 768)", 17, 2, 768),
        socket_refused("socket(AF_ALG, SOCK_SEQPACKET, 0)", 38, 5, 0),
        socket_refused("socket(AF_KEY, SOCK_RAW, 2)", 15, 3, 2),
        socket_refused("socket(AF_BLUETOOTH, SOCK_RAW, 1)", 31, 3, 1),
        socket_refused("socket(AF_XDP, SOCK_RAW, 0)", 44, 3, 0),
        socket_refused("socket(AF_TIPC, SOCK_RDM, 0)", 30, 4, 0),
        socket_refused("socket(AF_RDS, SOCK_SEQPACKET, 0)", 21, 5, 0),
        socket_refused("socket(AF_CAN, SOCK_RAW, 1)", 29, 3, 1),
        socket_refused("socket(AF_SMC, SOCK_STREAM, 0)", 43, 1, 0),
        socket_refused("socket(AF_KCM, SOCK_DGRAM, 0)", 41, 2, 0),
        socket_refused("socket(AF_UNSPEC, SOCK_STREAM, 0)", 0, 1, 0),
        socket_refused("socket(family 46, SOCK_STREAM, 0)", 46, 1, 0),
        // IPv4 and IPv6 beyond plain TCP and UDP.
        socket_refused("socket(AF_INET, SOCK_STREAM, IPPROTO_MPTCP)", 2, 1, 262),
        socket_refused("socket(AF_INET6, SOCK_STREAM, IPPROTO_MPTCP)", 10, 1, 262),
        socket_refused("socket(AF_INET, SOCK_RAW, IPPROTO_ICMP)", 2, 3, 1),
        socket_refused("socket(AF_INET, SOCK_RAW, IPPROTO_RAW)", 2, 3, 255),
        socket_refused("socket(AF_INET6, SOCK_RAW, IPPROTO_ICMPV6)", 10, 3, 58),
        socket_refused("socket(AF_INET, SOCK_PACKET, 768)", 2, 10, 768),
        socket_refused("socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)", 2, 2, 1),
        socket_refused("socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP)", 2, 1, 132),
        socket_refused("socket(AF_INET, SOCK_SEQPACKET, IPPROTO_SCTP)", 2, 5, 132),
        socket_refused("socket(AF_INET6, SOCK_DGRAM, IPPROTO_UDPLITE)", 10, 2, 136),
        socket_refused("socket(AF_INET, SOCK_DGRAM, IPPROTO_TCP)", 2, 2, 6),
        socketpair_refused("socketpair(AF_TIPC, SOCK_DGRAM, 0)", 30, 2),
        socketpair_refused("socketpair(AF_INET, SOCK_STREAM, 0)", 2, 1),
        // Through libc directly, and with the upper half of the family set:
        // the filter compares 64 bits, so that matches no rule either.
        python(
            "raw socket(AF_VSOCK) through ctypes",
            "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint('UNREACHED', libc.socket(40, 1, 0))",
            Expect::SocketViolation("socket(AF_VSOCK, SOCK_STREAM, 0)"),
        ),
        python(
            "socket(AF_UNIX) with the family's upper 32 bits set",
            "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n\
             print('UNREACHED', libc.syscall(41, ctypes.c_long(0x100000001), 1, 0))",
            Expect::SocketViolation("socket(argument 0x100000001)"),
        ),
        // The one netlink socket glibc opens by itself gets a quiet errno.
        socket_quiet("socket(AF_NETLINK, NETLINK_ROUTE) is EAFNOSUPPORT", 16, 3, 0, "97\n"),
    ]
}

#[test]
fn socket_families_outside_the_profile_are_named_violations() {
    let Some(mut c) = redis() else { return };
    let p = prefix("hostile-sockets");
    let mut w = Worker::start(&p, &["--concurrency", "2", "--allow-network", "true"]);
    let mut cases = refused_everywhere();
    cases.extend(refused_everywhere().into_iter().map(Case::network));
    // Without network even TCP and UDP are refused, and named.
    cases.extend([
        socket_refused("socket(AF_INET, SOCK_STREAM, 0)", 2, 1, 0),
        socket_refused("socket(AF_INET, SOCK_DGRAM, IPPROTO_UDP)", 2, 2, 17),
        socket_refused("socket(AF_INET6, SOCK_STREAM, IPPROTO_TCP)", 10, 1, 6),
        socket_refused("socket(AF_INET6, SOCK_DGRAM, 0)", 10, 2, 0),
        // glibc's nscd probe: a quiet EACCES, then it reads the files.
        socket_quiet("socket(AF_UNIX) without network is EACCES", 1, 1, 0, "13\n"),
        python(
            "getaddrinfo with AI_ADDRCONFIG and getpwuid without network",
            "import socket, pwd, os\n\
             print(socket.getaddrinfo('localhost', 80, socket.AF_INET, socket.SOCK_STREAM, 0, socket.AI_ADDRCONFIG)[0][4], \
             socket.gethostbyname('sandbox'), pwd.getpwuid(os.getuid()).pw_dir)",
            Expect::Stdout("('127.0.0.1', 80) 127.0.0.1 /tmp\n"),
        ),
        python(
            "asyncio's socketpair without network",
            "import asyncio\nasync def main():\n    await asyncio.sleep(0)\n    return 'loop ran'\nprint(asyncio.run(main()))",
            Expect::Stdout("loop ran\n"),
        ),
    ]);
    run_cases(&mut c, &mut w, cases);
}

/// What a network job does with sockets, each step printing one line.
const NETWORK_CLIENTS: &str = r#"import asyncio, http.client, socket
# TCP through the relay: it answers 403 for a private address.
c = http.client.HTTPConnection('127.0.0.1', 3128, timeout=5)
c.request('GET', 'http://10.0.0.1/')
print('tcp', c.getresponse().status)
async def relay():
    r, w = await asyncio.open_connection('localhost', 3128)
    w.write(b'GET http://10.0.0.1/ HTTP/1.0\r\n\r\n')
    line = await r.readline()
    w.close()
    return line.split()[1].decode()
print('asyncio', asyncio.run(relay()))
# UDP over IPv4 loopback, and IPv6 sockets of both kinds.
a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
a.bind(('127.0.0.1', 0))
socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP).sendto(b'datagram', a.getsockname())
print('udp', a.recv(100).decode())
socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
socket.socket(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP).close()
print('ipv6 sockets')
# Names: the hosts file with AI_ADDRCONFIG (glibc's netlink probe is refused
# quietly), and the resolver's UDP path, which finds no server here.
print('dns', socket.getaddrinfo('localhost', 80, socket.AF_INET, socket.SOCK_STREAM, 0, socket.AI_ADDRCONFIG)[0][4][0], socket.gethostbyname('sandbox'))
try:
    socket.getaddrinfo('sandq-no-such-name.example', 80)
except socket.gaierror:
    print('resolver ran')
# Unix sockets: a connected pair, and a path nobody listens on.
x, y = socket.socketpair()
x.sendall(b'pair')
print('socketpair', y.recv(10).decode())
u = socket.socket(socket.AF_UNIX)
try:
    u.connect('/tmp/nobody')
except OSError as e:
    print('unix', e.errno)
"#;

#[test]
fn network_jobs_keep_tcp_udp_dns_and_unix_sockets() {
    let Some(mut c) = redis() else { return };
    let p = prefix("hostile-net-clients");
    let mut w = Worker::start(&p, &["--concurrency", "1", "--allow-network", "true"]);
    let cases = vec![python(
        "TCP, asyncio, UDP, IPv6, DNS, socketpair and AF_UNIX with network",
        NETWORK_CLIENTS,
        Expect::Stdout(
            "tcp 403\nasyncio 403\nudp datagram\nipv6 sockets\ndns 127.0.0.1 127.0.0.1\nresolver ran\n\
             socketpair pair\nunix 2\n",
        ),
    )
    .network()
    .timeout(15_000)];
    run_cases(&mut c, &mut w, cases);
}

#[test]
fn an_operator_allowed_socket_takes_any_family() {
    let Some(mut c) = redis() else { return };
    let p = prefix("hostile-socket-extra");
    // `--allow-syscall socket` is the operator's explicit choice: the family
    // rules are lifted, even for jobs without network.
    let mut w = Worker::start(&p, &["--concurrency", "1", "--allow-syscall", "socket"]);
    let cases = vec![
        python(
            "socket(AF_VSOCK) and socket(AF_INET) pass the filter",
            "import socket\nout = []\nfor family, kind in ((40, 1), (2, 1), (10, 2)):\n    try:\n        \
             socket.socket(family, kind).close()\n        out.append('made')\n    except OSError as e:\n        \
             out.append(e.errno)\nprint(out)",
            // 97: this machine has no vsock transport (the filter let it through).
            Expect::AnyOf(vec![
                Expect::Stdout("['made', 'made', 'made']\n"),
                Expect::Stdout("[97, 'made', 'made']\n"),
            ]),
        ),
        // socketpair keeps its own rule: unix pairs only.
        socketpair_refused("socketpair(AF_TIPC, SOCK_DGRAM, 0)", 30, 2),
    ];
    run_cases(&mut c, &mut w, cases);
}

/// Python that opens socketpairs until its fd limit, then writes into both
/// ends of each until the kernel refuses more (`%RAISE%`: after asking for the
/// largest send buffer) or `%TARGET%` bytes are held, and prints how many
/// sockets it made and the kernel memory their queues hold (SIOCOUTQ: the
/// truesize of data sent and not yet read).
const FILL_SOCKETPAIRS: &str = r#"import fcntl, os, socket, struct
pairs = []
try:
    while True:
        pairs.append(socket.socketpair())
except OSError:
    pass
socks = [s for p in pairs for s in p]
chunk = b'x' * 65536
held = 0
for s in socks:
    if %RAISE%:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 30)
    s.setblocking(False)
    while held < %TARGET%:
        try:
            os.write(s.fileno(), chunk)
        except BlockingIOError:
            break
    held = sum(struct.unpack('i', fcntl.ioctl(t.fileno(), 0x5411, b'\0' * 4))[0] for t in socks)
print(len(socks), held)
"#;

fn fill_socketpairs(name: &'static str, target: u64, raise: bool, expect: Expect) -> Case {
    let code = FILL_SOCKETPAIRS
        .replace("%TARGET%", &target.to_string())
        .replace("%RAISE%", if raise { "True" } else { "False" });
    python(name, code, expect).timeout(20_000)
}

/// The sockets and bytes a fill job printed.
fn filled(r: &Value) -> Result<(u64, u64), String> {
    expect_status(r, "ok")?;
    let nums: Vec<u64> = s(&r["stdout"])
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    match nums[..] {
        [sockets, held] => Ok((sockets, held)),
        _ => Err("expected two numbers".into()),
    }
}

/// Every socketpair the fd limit allows, filled with the default send
/// buffers: the kernel's own cap, sockets x 1.5 x net.core.wmem_default (a
/// buffer may overshoot by one message), holds, and the figure is large
/// enough that a 32 MiB job could not hold it besides the interpreter.
fn all_pairs_within_the_kernel_cap(r: &Value) -> Result<(), String> {
    let (sockets, held) = filled(r)?;
    let wmem_default: u64 = std::fs::read_to_string("/proc/sys/net/core/wmem_default")
        .map_err(|e| e.to_string())?
        .trim()
        .parse()
        .map_err(|_| "wmem_default is not a number".to_owned())?;
    if !(200..=252).contains(&sockets) {
        return Err(format!(
            "expected up to 252 sockets (RLIMIT_NOFILE 256), got {sockets}"
        ));
    }
    let cap = sockets * wmem_default * 3 / 2;
    if held > cap || held < 40 << 20 {
        return Err(format!(
            "expected between 40 MiB and {cap} bytes held, got {held}"
        ));
    }
    Ok(())
}

fn sixteen_mib_held(r: &Value) -> Result<(), String> {
    let (_, held) = filled(r)?;
    if held < 16 << 20 {
        return Err(format!("expected at least 16 MiB held, got {held}"));
    }
    Ok(())
}

#[test]
fn socket_buffers_count_against_the_memory_limit() {
    let Some(mut c) = redis() else { return };
    let p = prefix("hostile-sockbuf");
    let mut w = Worker::start(&p, &["--concurrency", "1", "--allow-network", "true"]);
    let everything = u64::MAX;
    let cases = vec![
        // Unix socket buffers are kernel memory charged to the job's memory
        // cgroup: with them the job passes its limit though its own heap is
        // a few MiB, and the cgroup ends it.
        fill_socketpairs(
            "fill socketpairs in 32 MiB",
            everything,
            false,
            Expect::MemoryLimit,
        )
        .memory(32),
        fill_socketpairs(
            "16 MiB of socket buffers fit in 32 MiB",
            16 << 20,
            false,
            Expect::Custom(sixteen_mib_held),
        )
        .memory(32),
        fill_socketpairs(
            "every socketpair filled, in 128 MiB",
            everything,
            false,
            Expect::Custom(all_pairs_within_the_kernel_cap),
        )
        .memory(128),
        // With network, setsockopt raises each buffer to 2 x wmem_max (at
        // least 416 KiB): 252 of them pass 64 MiB on any host, and are charged.
        fill_socketpairs(
            "raised send buffers in 64 MiB",
            everything,
            true,
            Expect::MemoryLimit,
        )
        .memory(64)
        .network(),
    ];
    run_cases(&mut c, &mut w, cases);
}

#[test]
fn stdin_and_output_edge_cases() {
    let Some(mut c) = redis() else { return };
    let p = prefix("hostile-io");
    let mut w = Worker::start(&p, &["--concurrency", "2"]);
    let cases = vec![
        python(
            "8 MiB of stdin read fully",
            "import sys\nprint(len(sys.stdin.buffer.read()))",
            Expect::Stdout("8388608\n"),
        )
        .stdin("s".repeat(MAX_STDIN)),
        python(
            "stdin over the 8 MiB limit",
            "print('UNREACHED')",
            Expect::Rejected("field `stdin`"),
        )
        .stdin("s".repeat(MAX_STDIN + 1)),
        python(
            "stdin never read, job exits",
            "print('ignored')",
            Expect::Stdout("ignored\n"),
        )
        .stdin("z".repeat(4 * 1024 * 1024)),
        python(
            "non-UTF-8 bytes on stdout",
            "import sys\nsys.stdout.buffer.write(b'\\xff\\xfe ok')",
            Expect::Stdout("\u{FFFD}\u{FFFD} ok"),
        ),
        python(
            "NUL and a cut multi-byte sequence",
            "import sys\nsys.stdout.buffer.write(b'a\\x00b\\xe2\\x82')",
            Expect::Stdout("a\u{0}b\u{FFFD}"),
        ),
    ];
    run_cases(&mut c, &mut w, cases);
}

#[test]
fn nodejs_hostile() {
    let Some(mut c) = redis() else { return };
    let p = prefix("hostile-node");
    let mut w = Worker::start(&p, &["--concurrency", "2"]);
    let cases = vec![
        nodejs("node starts", "console.log('hi')", Expect::Stdout("hi\n")),
        nodejs(
            "child_process.execSync('id')",
            "console.log('UNREACHED', require('child_process').execSync('id').toString())",
            Expect::AnyOf(vec![
                // libuv makes the child's stdio pipes with socketpair, then forks.
                Expect::SocketViolation("socketpair(AF_UNIX, SOCK_STREAM, 0)"),
                Expect::Violation("clone", 56),
            ]),
        ),
        nodejs(
            "read /etc/shadow",
            "require('fs').readFileSync('/etc/shadow')",
            Expect::Error("ENOENT: no such file or directory, open '/etc/shadow'"),
        ),
        nodejs(
            "process.kill(1, 'SIGKILL')",
            "process.kill(1, 'SIGKILL'); console.log(process.pid, 'survived')",
            Expect::Stdout("1 survived\n"),
        ),
        nodejs(
            "write under /usr",
            "require('fs').writeFileSync('/usr/evil', 'x')",
            Expect::Error("EROFS: read-only file system, open '/usr/evil'"),
        ),
        nodejs(
            "listing / shows only the runtime root",
            "const top = require('fs').readdirSync('/');\n\
             const allowed = ['tmp', 'etc', 'dev', 'usr', 'bin', 'lib', 'lib64', 'sbin'];\n\
             console.log(top.filter((d) => !allowed.includes(d)).length, top.includes('tmp'))",
            Expect::Stdout("0 true\n"),
        ),
        nodejs(
            "array growth",
            "const a = [];\nwhile (true) a.push(new Array(1e6).fill(1.5));",
            Expect::MemoryLimit,
        )
        .memory(128)
        .timeout(10_000),
        nodejs("while(true){}", "while (true) {}", Expect::Timeout).timeout(1000),
        nodejs(
            "connect to Redis with network off",
            "require('net').connect(6379, '127.0.0.1').on('connect', () => console.log('UNREACHED'))",
            Expect::SocketViolation("socket(AF_INET, SOCK_STREAM, 0)"),
        ),
    ];
    run_cases(&mut c, &mut w, cases);
}

#[test]
fn allowed_ipc_calls_get_each_job_its_own_ipc_namespace() {
    let Some(mut c) = redis() else { return };
    let p = prefix("hostile-ipc");
    let _w = Worker::start(
        &p,
        &["--concurrency", "1", "--allow-syscall", "shmget,shmctl"],
    );
    let shm = |flags: &str| {
        format!(
            "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n\
             print(libc.shmget(4242, 4096, {flags}) >= 0, ctypes.get_errno())"
        )
    };
    // IPC_CREAT | 0o600: made in this job's namespace...
    let r = py(&mut c, &p, &shm("0o1600"));
    assert_status(&r, "ok");
    assert_eq!(r["stdout"], "True 0\n");
    // ...and gone with it: the next job cannot find the key (ENOENT).
    let r = py(&mut c, &p, &shm("0"));
    assert_status(&r, "ok");
    assert_eq!(r["stdout"], "False 2\n");
}

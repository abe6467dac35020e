//! The warm pool end to end: a real worker with pre-started interpreters, real
//! Redis, and the pool's hit and miss counters on /metrics to prove which path
//! each job took. With `--concurrency 1` and a pool that is waited on until it
//! is full before every job, a warm hit is deterministic.

mod common;
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const PY: &str = "python3";
const NODE: &str = "nodejs";

/// The text of /metrics, waiting up to 10 s for the endpoint to listen.
fn scrape(port: u16) -> String {
    match http_get_when_up(port, "/metrics", scaled(Duration::from_secs(10))) {
        (200, body) => body,
        (status, body) => panic!("GET /metrics: {status} {body:.200}"),
    }
}

/// The value of `name{language="..."}` in a scrape.
fn sample(text: &str, name: &str, language: &str) -> f64 {
    let head = format!("{name}{{language=\"{language}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&head))
        .unwrap_or_else(|| panic!("no {head:?} in /metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// The command name an interpreter of `language` runs under.
fn comm_prefix(language: &str) -> &'static str {
    match language {
        PY => "python",
        NODE => "node",
        other => panic!("unknown language {other}"),
    }
}

/// Children of `parent`: (pid, comm, state, wchan).
fn children(parent: u32) -> Vec<(i32, String, char, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split at the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_owned();
        let mut rest = stat[close + 1..].split_whitespace();
        let state = rest.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid: u32 = rest.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        if ppid != parent {
            continue;
        }
        let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
        out.push((pid, comm, state, wchan));
    }
    out
}

/// A process that is gone or a zombie (dead, not yet reaped).
fn dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_none_or(|s| s == "Z" || s == "X"),
    }
}

/// A worker with a warm pool, its metrics port and a Redis connection.
struct Pooled {
    w: Worker,
    port: u16,
    p: String,
    c: redis::Connection,
    size: usize,
}

impl Pooled {
    fn start(name: &str, size: usize) -> Option<Pooled> {
        let c = redis()?;
        let p = prefix(name);
        let n = size.to_string();
        let (w, port) = Worker::start_with_metrics(&p, &["--concurrency", "1", "--pool-size", &n]);
        Some(Pooled {
            w,
            port,
            p,
            c,
            size,
        })
    }

    fn pid(&self) -> u32 {
        self.w.child.as_ref().unwrap().id()
    }

    /// Pre-started interpreters of `language` waiting for their job: the
    /// worker's children of that name, asleep reading a pipe (fd 3).
    fn idle(&self, language: &str) -> Vec<i32> {
        let name = comm_prefix(language);
        let mut pids: Vec<i32> = children(self.pid())
            .into_iter()
            .filter(|(_, comm, state, wchan)| {
                comm.starts_with(name) && *state == 'S' && wchan.contains("pipe_read")
            })
            .map(|(pid, ..)| pid)
            .collect();
        pids.sort_unstable();
        pids
    }

    /// Wait until the pool of `language` is full again; returns its pids.
    fn wait_full(&self, language: &str) -> Vec<i32> {
        let deadline = Instant::now() + scaled(Duration::from_secs(20));
        loop {
            let idle = self.idle(language);
            if idle.len() == self.size {
                return idle;
            }
            assert!(
                Instant::now() < deadline,
                "the {language} pool did not refill to {} (idle: {idle:?}, children: {:?}); log:\n{}",
                self.size,
                children(self.pid()),
                self.w.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// (hits, misses) for `language`.
    fn counters(&self, language: &str) -> (f64, f64) {
        let text = scrape(self.port);
        (
            sample(&text, "sandq_pool_hits_total", language),
            sample(&text, "sandq_pool_misses_total", language),
        )
    }

    fn gauge(&self, language: &str) -> f64 {
        sample(&scrape(self.port), "sandq_pool_size", language)
    }

    fn run(&mut self, job: Value) -> Value {
        let r = run_job(&mut self.c, &self.p, job);
        assert_ne!(r["status"], "internal_error", "{r}; log:\n{}", self.w.log());
        r
    }

    /// Run `job` once the pool is full; assert it was a hit.
    fn warm(&mut self, job: Value) -> Value {
        let language = job["language"].as_str().unwrap_or(PY).to_owned();
        self.wait_full(&language);
        let before = self.counters(&language);
        let r = self.run(job.clone());
        let after = self.counters(&language);
        assert_eq!(
            (after.0 - before.0, after.1 - before.1),
            (1.0, 0.0),
            "expected a pool hit for {job}: {r}"
        );
        r
    }

    /// Run `job` with the pool full; assert it took the cold path (a miss)
    /// and left the waiting interpreters alone.
    fn cold(&mut self, job: Value) -> Value {
        let language = job["language"].as_str().unwrap_or(PY).to_owned();
        let waiting = self.wait_full(&language);
        let before = self.counters(&language);
        let r = self.run(job.clone());
        let after = self.counters(&language);
        assert_eq!(
            (after.0 - before.0, after.1 - before.1),
            (0.0, 1.0),
            "expected a pool miss for {job}: {r}"
        );
        assert_eq!(
            self.idle(&language),
            waiting,
            "a waiting interpreter was used"
        );
        r
    }
}

fn stdout(r: &Value) -> &str {
    r["stdout"]
        .as_str()
        .unwrap_or_else(|| panic!("no stdout: {r}"))
}

#[track_caller]
fn assert_ok_stdout(r: &Value, expected: &str) {
    assert_status(r, "ok");
    assert_eq!(stdout(r), expected, "{r}");
}

// ---------------------------------------------------------------------------
// One job per process
// ---------------------------------------------------------------------------

#[test]
fn pool_python_process_serves_exactly_one_job() {
    let Some(mut t) = Pooled::start("pool-py-once", 1) else {
        return;
    };
    let first = t.wait_full(PY);
    let a = t.warm(json!({
        "language": PY,
        "code": "import os, sys, json, builtins\n\
                 open('/tmp/sandq-leak.txt', 'w').write('leak')\n\
                 open('leak-cwd.txt', 'w').write('leak')\n\
                 os.environ['SANDQ_LEAK'] = '1'\n\
                 json.sandq_marker = 1\n\
                 builtins.sandq_leak = 1\n\
                 sys.modules['sandq_leak_module'] = json\n\
                 sys.path.insert(0, '/tmp/sandq-leak-path')\n\
                 print(os.path.exists('/tmp/sandq-leak.txt'), 'SANDQ_LEAK' in os.environ,\n\
                       hasattr(json, 'sandq_marker'), 'sandq_leak_module' in sys.modules)",
    }));
    assert_ok_stdout(&a, "True True True True\n");
    // The interpreter that ran A is gone, not back in the pool.
    let second = t.wait_full(PY);
    assert!(first.iter().all(|&pid| dead(pid)), "{first:?} still alive");
    assert!(
        second.iter().all(|pid| !first.contains(pid)),
        "{first:?} -> {second:?}"
    );

    let b = t.warm(json!({
        "language": PY,
        "code": "import os, sys, json, builtins\n\
                 print(os.path.exists('/tmp/sandq-leak.txt'), os.path.exists('leak-cwd.txt'),\n\
                       'SANDQ_LEAK' in os.environ, hasattr(json, 'sandq_marker'),\n\
                       hasattr(builtins, 'sandq_leak'), 'sandq_leak_module' in sys.modules,\n\
                       '/tmp/sandq-leak-path' in sys.path)\n\
                 print(sorted(os.listdir('/tmp')))",
    }));
    assert_ok_stdout(&b, "False False False False False False False\n[]\n");
    t.wait_full(PY);
    assert!(
        second.iter().all(|&pid| dead(pid)),
        "{second:?} still alive"
    );
    assert_eq!(t.counters(PY), (2.0, 0.0));
}

#[test]
fn pool_node_process_serves_exactly_one_job() {
    let Some(mut t) = Pooled::start("pool-node-once", 1) else {
        return;
    };
    let first = t.wait_full(NODE);
    let a = t.warm(json!({
        "language": NODE,
        "code": "const fs = require('fs');\n\
                 fs.writeFileSync('/tmp/sandq-leak.txt', 'leak');\n\
                 globalThis.leak = 1;\n\
                 process.env.SANDQ_LEAK = '1';\n\
                 fs.sandqMarker = 1;\n\
                 Array.prototype.sandqLeak = 1;\n\
                 console.log(fs.existsSync('/tmp/sandq-leak.txt'), globalThis.leak,\n\
                             process.env.SANDQ_LEAK, fs.sandqMarker, [].sandqLeak);",
    }));
    assert_ok_stdout(&a, "true 1 1 1 1\n");
    let second = t.wait_full(NODE);
    assert!(first.iter().all(|&pid| dead(pid)), "{first:?} still alive");
    assert!(
        second.iter().all(|pid| !first.contains(pid)),
        "{first:?} -> {second:?}"
    );

    let b = t.warm(json!({
        "language": NODE,
        "code": "const fs = require('fs');\n\
                 console.log(fs.existsSync('/tmp/sandq-leak.txt'), typeof globalThis.leak,\n\
                             'SANDQ_LEAK' in process.env, 'sandqMarker' in fs,\n\
                             typeof [].sandqLeak, JSON.stringify(fs.readdirSync('/tmp')));",
    }));
    assert_ok_stdout(&b, "false undefined false false undefined []\n");
    t.wait_full(NODE);
    assert!(
        second.iter().all(|&pid| dead(pid)),
        "{second:?} still alive"
    );
    assert_eq!(t.counters(NODE), (2.0, 0.0));
}

// ---------------------------------------------------------------------------
// Limits on the warm path
// ---------------------------------------------------------------------------

#[test]
fn pool_python_warm_path_enforces_limits() {
    let Some(mut t) = Pooled::start("pool-py-limits", 1) else {
        return;
    };

    t.wait_full(PY);
    let started = Instant::now();
    let r = t.warm(json!({"language": PY, "code": "while True: pass", "timeout_ms": 1000}));
    let took = started.elapsed();
    assert_status(&r, "timeout");
    assert_eq!(r["signal"], "SIGKILL");
    assert_eq!(
        r["error"],
        format!("timed out after {} ms", scaled_ms(1000))
    );
    assert!(
        took < scaled(Duration::from_secs(2)),
        "result after {took:?}"
    );

    let r = t.warm(json!({"language": PY, "code": "b = bytearray(1024**3)", "memory_mb": 64}));
    assert_status(&r, "memory_limit");
    // The interpreters start with the default 256 MiB: the job's own limit
    // is set on the waiting process, lower and higher.
    let r = t.warm(json!({
        "language": PY,
        "code": "b = bytearray(150 * 1024**2)\nprint(len(b))",
        "memory_mb": 64,
    }));
    assert_status(&r, "memory_limit");
    let r = t.warm(json!({
        "language": PY,
        "code": "b = bytearray(350 * 1024**2)\nprint(len(b))",
        "memory_mb": 512,
    }));
    assert_ok_stdout(&r, "367001600\n");
    let r = t.warm(json!({"language": PY, "code": "print('x' * 3_000_000)"}));
    assert_status(&r, "output_limit");
    assert_eq!(r["stdout_truncated"], true);
    let n = stdout(&r).len();
    assert!(n <= 1024 * 1024 && n > 1000, "{n} bytes of stdout");

    let r = t.warm(json!({"language": PY, "code": "import socket; socket.socket()"}));
    assert_status(&r, "violation");
    assert_eq!(r["violation"]["syscall"], "socket");
    assert_eq!(r["violation"]["number"], 41);
    assert_eq!(
        r["error"],
        "blocked system call: socket(AF_INET, SOCK_STREAM, 0)"
    );

    let r = t.warm(json!({
        "language": PY,
        "code": "import sys; print(sys.stdin.read().upper(), end='')",
        "stdin": "echo me\n",
    }));
    assert_ok_stdout(&r, "ECHO ME\n");

    let r = t.warm(json!({
        "language": PY,
        "preload": "X = 40\ndef f():\n    return X + 2\n",
        "code": "print(f())",
    }));
    assert_ok_stdout(&r, "42\n");

    let r = t.warm(json!({
        "language": PY,
        "code": "def f():\n    raise ValueError('boom')\nf()",
    }));
    assert_status(&r, "error");
    assert_eq!(r["exit_code"], 1);
    let stderr = r["stderr"].as_str().unwrap();
    assert!(stderr.contains("Traceback"), "{stderr}");
    assert!(stderr.contains("File \"<code>\", line 3"), "{stderr}");
    assert!(stderr.contains("ValueError: boom"), "{stderr}");
    assert!(
        !stderr.contains(".sandq-"),
        "prescript frames leaked: {stderr}"
    );

    assert_ok_stdout(
        &t.warm(json!({"language": PY, "code": "print('after')"})),
        "after\n",
    );
    assert_eq!(t.counters(PY).1, 0.0, "no job took the cold path");
}

/// The CPU limit (RLIMIT_CPU: the job's timeout rounded up, plus 1 s) is set
/// on a waiting interpreter with prlimit(2), which needs CAP_SYS_RESOURCE for
/// a process of another uid; without it the call fails and the job keeps the
/// limit the interpreter started with (the default timeout's).
#[test]
fn pool_python_warm_path_keeps_the_longest_cpu_limit() {
    let Some(mut t) = Pooled::start("pool-py-cpu", 1) else {
        return;
    };
    // A pre-started interpreter carries the CPU limit of the worker's longest
    // timeout (60 s -> 61 s soft, 62 s hard), so no job is cut short by it;
    // each job's own bound is its wall-clock timeout.
    for (timeout_ms, limit) in [(1000, "(61, 62)"), (20_000, "(61, 62)")] {
        let r = t.warm(json!({
            "language": PY,
            "code": "import resource\nprint(resource.getrlimit(resource.RLIMIT_CPU))",
            "timeout_ms": timeout_ms,
        }));
        assert_ok_stdout(&r, &format!("{limit}\n"));
    }
}

#[test]
fn pool_node_warm_path_enforces_limits() {
    let Some(mut t) = Pooled::start("pool-node-limits", 1) else {
        return;
    };

    t.wait_full(NODE);
    let started = Instant::now();
    let r = t.warm(json!({"language": NODE, "code": "while (true) {}", "timeout_ms": 1000}));
    let took = started.elapsed();
    assert_status(&r, "timeout");
    assert_eq!(r["signal"], "SIGKILL");
    assert_eq!(
        r["error"],
        format!("timed out after {} ms", scaled_ms(1000))
    );
    assert!(
        took < scaled(Duration::from_secs(2)),
        "result after {took:?}"
    );

    let r = t.warm(json!({
        "language": NODE,
        "code": "const s = require('net').connect(6379, '127.0.0.1');\n\
                 s.on('connect', () => console.log('UNREACHED'));\n\
                 s.on('error', (e) => console.log('error', e.code));",
    }));
    assert_status(&r, "violation");
    assert_eq!(r["violation"]["syscall"], "socket");
    assert_eq!(r["violation"]["number"], 41);
    assert_eq!(r["stdout"], "");

    let r = t.warm(json!({
        "language": NODE,
        "preload": "globalThis.base = 40;",
        "code": "let s = ''; process.stdin.on('data', (d) => s += d);\n\
                 process.stdin.on('end', () => console.log(base + 2, s.trim()));",
        "stdin": "echo me\n",
    }));
    assert_ok_stdout(&r, "42 echo me\n");
    assert_eq!(t.counters(NODE).1, 0.0, "no job took the cold path");
}

// ---------------------------------------------------------------------------
// Recovery, pool off, jobs the pool cannot serve
// ---------------------------------------------------------------------------

#[test]
fn pool_recovers_after_its_interpreters_are_killed() {
    let Some(mut t) = Pooled::start("pool-killed", 2) else {
        return;
    };
    let mut killed = t.wait_full(PY);
    killed.extend(t.wait_full(NODE));
    for &pid in &killed {
        // SAFETY: kill(2) on a pid we just read as the worker's child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill {pid}");
    }
    let deadline = Instant::now() + scaled(Duration::from_secs(5));
    while !killed.iter().all(|&pid| dead(pid)) {
        assert!(Instant::now() < deadline, "{killed:?} did not die");
        std::thread::sleep(Duration::from_millis(5));
    }

    // Right away: whatever path they take, the jobs succeed.
    let before = (t.counters(PY), t.counters(NODE));
    assert_ok_stdout(&t.run(json!({"language": PY, "code": "print(1)"})), "1\n");
    assert_ok_stdout(
        &t.run(json!({"language": NODE, "code": "console.log(2)"})),
        "2\n",
    );
    let ids: Vec<String> = (0..3).map(|i| format!("j-killed-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        push(
            &mut t.c,
            &t.p,
            &json!({"id": id, "language": PY, "code": format!("print({i})")}),
        );
    }
    for (i, id) in ids.iter().enumerate() {
        let r = result(&mut t.c, &t.p, id, Duration::from_secs(30));
        assert_ok_stdout(&r, &format!("{i}\n"));
    }
    let after = (t.counters(PY), t.counters(NODE));
    let total = |(h, m): (f64, f64)| h + m;
    assert_eq!(
        total(after.0) - total(before.0),
        4.0,
        "{before:?} -> {after:?}"
    );
    assert_eq!(
        total(after.1) - total(before.1),
        1.0,
        "{before:?} -> {after:?}"
    );

    // Refilled, with new interpreters, and serving warm again.
    let deadline = Instant::now() + scaled(Duration::from_secs(10));
    while t.gauge(PY) != 2.0 || t.gauge(NODE) != 2.0 {
        assert!(Instant::now() < deadline, "pool size gauge not back to 2");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut refilled = t.wait_full(PY);
    refilled.extend(t.wait_full(NODE));
    assert!(
        refilled.iter().all(|pid| !killed.contains(pid)),
        "{killed:?} -> {refilled:?}"
    );
    assert_ok_stdout(
        &t.warm(json!({"language": PY, "code": "print('warm')"})),
        "warm\n",
    );
    assert_ok_stdout(
        &t.warm(json!({"language": NODE, "code": "console.log('warm')"})),
        "warm\n",
    );
}

#[test]
fn pool_size_zero_runs_every_job_cold() {
    let Some(mut t) = Pooled::start("pool-off", 0) else {
        return;
    };
    for (language, code) in [
        (PY, "print('cold')"),
        (PY, "print('cold')"),
        (NODE, "console.log('cold')"),
    ] {
        let before = t.counters(language);
        assert!(
            t.idle(language).is_empty(),
            "an interpreter waits with the pool off"
        );
        let r = t.run(json!({"language": language, "code": code}));
        assert_ok_stdout(&r, "cold\n");
        let after = t.counters(language);
        assert_eq!(
            (after.0 - before.0, after.1 - before.1),
            (0.0, 1.0),
            "expected a miss for {language}"
        );
    }
    assert_eq!(t.counters(PY), (0.0, 2.0));
    assert_eq!(t.counters(NODE), (0.0, 1.0));
    assert_eq!(t.gauge(PY), 0.0);
    assert_eq!(t.gauge(NODE), 0.0);
}

#[test]
fn pool_node_with_non_default_memory_runs_cold() {
    let Some(mut t) = Pooled::start("pool-node-mem", 1) else {
        return;
    };
    let heap = "console.log(require('v8').getHeapStatistics().heap_size_limit >> 20)";
    // 512 MiB: V8's heap flag must say so, which a waiting interpreter
    // (started for 256 MiB) cannot.
    let r = t.cold(json!({"language": NODE, "code": heap, "memory_mb": 512}));
    assert_status(&r, "ok");
    let big: u64 = stdout(&r).trim().parse().unwrap();
    // The default takes the waiting one, with the smaller heap.
    let r = t.warm(json!({"language": NODE, "code": heap, "memory_mb": 256}));
    assert_status(&r, "ok");
    let default: u64 = stdout(&r).trim().parse().unwrap();
    assert!(
        big > default + 100,
        "heap limit {big} MiB at 512 vs {default} MiB at 256"
    );
}

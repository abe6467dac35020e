//! Test harness: a real `sandq worker` process against the real Redis, each
//! test under a key prefix of its own (deleted afterwards, never FLUSH*).
#![allow(dead_code)]

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_sandq");

pub fn redis_url() -> String {
    std::env::var("SANDQ_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A connection to the test Redis. In CI a missing Redis fails the test; on a
/// developer machine it skips it (returns None) with a note.
pub fn redis() -> Option<redis::Connection> {
    let client = redis::Client::open(redis_url()).expect("valid redis url");
    match client.get_connection_with_timeout(Duration::from_secs(2)) {
        Ok(c) => Some(c),
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true and Redis at {} is unreachable: {e}", redis_url())
        }
        Err(e) => {
            eprintln!("skipping: Redis at {} unreachable: {e}", redis_url());
            None
        }
    }
}

/// How much slower than this machine the tests run: `SANDQ_TEST_TIME_SCALE`
/// (default 1). A slow guest (an emulated VM runs jobs 3-30x slower) sets it,
/// and every job timeout and every wall-clock bound of the harness is
/// multiplied by it, so a test judges behaviour, not the host's speed.
pub fn time_scale() -> f64 {
    std::env::var("SANDQ_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 1.0)
        .unwrap_or(1.0)
}

/// `d` stretched by [`time_scale`].
pub fn scaled(d: Duration) -> Duration {
    d.mul_f64(time_scale())
}

/// A job's `timeout_ms` of `ms` as the worker sees it: stretched by
/// [`time_scale`].
pub fn scaled_ms(ms: u64) -> u64 {
    (ms as f64 * time_scale()) as u64
}

/// A job's `timeout_ms` (or the worker's default, 5 s) stretched by
/// [`time_scale`]; jobs are left untouched at scale 1.
fn scale_job_timeout(job: &Value) -> Value {
    let scale = time_scale();
    if scale == 1.0 || !job.is_object() {
        return job.clone();
    }
    let mut job = job.clone();
    let t = job
        .get("timeout_ms")
        .and_then(|v| v.as_u64())
        .unwrap_or(5000);
    job["timeout_ms"] = json!(scaled_ms(t));
    job
}

/// A local TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// A prefix no other test or run shares.
pub fn prefix(name: &str) -> String {
    format!(
        "sandq-test:{name}:{}:{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// A running worker; killed (SIGKILL) and its keys deleted when dropped.
pub struct Worker {
    pub child: Option<Child>,
    pub prefix: String,
    pub id: String,
    pub log: Arc<Mutex<String>>,
    cleanup: bool,
}

impl Worker {
    pub fn start(prefix: &str, args: &[&str]) -> Worker {
        Self::start_with_id(prefix, &format!("w-{:08x}", rand::random::<u32>()), args)
    }

    pub fn start_with_id(prefix: &str, id: &str, args: &[&str]) -> Worker {
        Self::spawn(&redis_url(), prefix, id, "off", args)
    }

    /// A worker against the Redis at `redis`, with the given id.
    pub fn start_on(redis: &str, prefix: &str, id: &str, args: &[&str]) -> Worker {
        Self::spawn(redis, prefix, id, "off", args)
    }

    /// A worker serving /metrics, /healthz and /readyz on a free local port.
    pub fn start_with_metrics(prefix: &str, args: &[&str]) -> (Worker, u16) {
        Self::start_with_metrics_on(&redis_url(), prefix, args)
    }

    /// The same, against the Redis at `redis`.
    pub fn start_with_metrics_on(redis: &str, prefix: &str, args: &[&str]) -> (Worker, u16) {
        let port = free_port();
        let id = format!("w-{:08x}", rand::random::<u32>());
        let addr = format!("127.0.0.1:{port}");
        (Self::spawn(redis, prefix, &id, &addr, args), port)
    }

    fn spawn(redis: &str, prefix: &str, id: &str, metrics_addr: &str, args: &[&str]) -> Worker {
        let mut cmd = Command::new(BIN);
        cmd.arg("worker")
            .args(["--redis", redis, "--prefix", prefix, "--worker-id", id])
            .args(["--metrics-addr", metrics_addr])
            .args(args)
            .env("SANDQ_LOG", "info")
            .env_remove("SANDQ_CONFIG")
            // No wait for a last scrape at exit (the drop below allows 5 s);
            // a test of the linger passes --metrics-linger-ms, which wins.
            .env("SANDQ_METRICS_LINGER_MS", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start sandq worker");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("waiting for jobs") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let worker = Worker {
            child: Some(child),
            prefix: prefix.to_owned(),
            id: id.to_owned(),
            log: log.clone(),
            cleanup: true,
        };
        if rx.recv_timeout(scaled(Duration::from_secs(30))).is_err() {
            panic!("worker did not start; log:\n{}", log.lock().unwrap());
        }
        worker
    }

    /// Keep the prefix's keys when this handle goes (another worker follows).
    pub fn keep_keys(mut self) -> Self {
        self.cleanup = false;
        self
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child's pid; no memory is involved.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// Wait for the process to exit; returns its exit code.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // SIGTERM first, so the worker removes its cgroups and deregisters.
        self.signal(libc::SIGTERM);
        if self.wait(scaled(Duration::from_secs(5))).is_none() {
            if let Some(c) = self.child.as_mut() {
                let _ = c.kill();
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        if self.cleanup {
            delete_prefix(&self.prefix);
        }
    }
}

/// Delete every key under `prefix:` (SCAN, never FLUSH).
pub fn delete_prefix(prefix: &str) {
    let Some(mut conn) = redis() else { return };
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query(&mut conn)
        .unwrap_or_default();
    for k in keys {
        let _: Result<(), _> = redis::cmd("DEL").arg(k).query(&mut conn);
    }
}

pub fn push(conn: &mut redis::Connection, prefix: &str, job: &Value) {
    let _: i64 = redis::cmd("RPUSH")
        .arg(format!("{prefix}:queue"))
        .arg(scale_job_timeout(job).to_string())
        .query(conn)
        .unwrap();
}

pub fn push_raw(conn: &mut redis::Connection, prefix: &str, raw: &str) {
    let _: i64 = redis::cmd("RPUSH")
        .arg(format!("{prefix}:queue"))
        .arg(raw)
        .query(conn)
        .unwrap();
}

/// BLPOP the result of `id`.
pub fn result(conn: &mut redis::Connection, prefix: &str, id: &str, timeout: Duration) -> Value {
    let timeout = scaled(timeout);
    let r: Option<(String, String)> = redis::cmd("BLPOP")
        .arg(format!("{prefix}:result:{id}"))
        .arg(timeout.as_secs_f64())
        .query(conn)
        .unwrap();
    let (_, json) = r.unwrap_or_else(|| panic!("no result for {id} within {timeout:?}"));
    serde_json::from_str(&json).unwrap()
}

/// Collect one result per id from the reply keys, then check nothing more came.
pub fn collect(
    conn: &mut redis::Connection,
    prefix: &str,
    ids: &[String],
    timeout: Duration,
) -> std::collections::HashMap<String, Value> {
    let deadline = Instant::now() + timeout;
    let mut got = std::collections::HashMap::new();
    for id in ids {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        let r = result(conn, prefix, id, left);
        got.insert(id.clone(), r);
    }
    // Exactly one: nothing left on any reply key.
    for id in ids {
        assert_eq!(
            llen(conn, &format!("{prefix}:result:{id}")),
            0,
            "a second result for {id}"
        );
    }
    got
}

/// Push one job and wait for its result.
pub fn run_job(conn: &mut redis::Connection, prefix: &str, mut job: Value) -> Value {
    let id = format!("j-{:016x}", rand::random::<u64>());
    job["id"] = json!(id);
    if job.get("language").is_none() {
        job["language"] = json!("python3");
    }
    push(conn, prefix, &job);
    let t = job
        .get("timeout_ms")
        .and_then(|v| v.as_u64())
        .unwrap_or(5000);
    result(conn, prefix, &id, Duration::from_millis(t + 30_000))
}

/// Python one-liner convenience.
pub fn py(conn: &mut redis::Connection, prefix: &str, code: &str) -> Value {
    run_job(conn, prefix, json!({"language": "python3", "code": code}))
}

pub fn node(conn: &mut redis::Connection, prefix: &str, code: &str) -> Value {
    run_job(conn, prefix, json!({"language": "nodejs", "code": code}))
}

/// The dead-letter entries under `prefix`, oldest first.
pub fn dead_letters(conn: &mut redis::Connection, prefix: &str) -> Vec<Value> {
    let entries: Vec<String> = redis::cmd("LRANGE")
        .arg(format!("{prefix}:dead"))
        .arg(0)
        .arg(-1)
        .query(conn)
        .unwrap();
    entries
        .iter()
        .map(|e| serde_json::from_str(e).expect("a dead-letter entry is JSON"))
        .collect()
}

pub fn llen(conn: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("LLEN").arg(key).query(conn).unwrap()
}

pub fn processing_total(conn: &mut redis::Connection, prefix: &str) -> i64 {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:processing:*"))
        .query(conn)
        .unwrap();
    keys.iter().map(|k| llen(conn, k)).sum()
}

/// Assert a status, printing the whole result when it differs.
#[track_caller]
pub fn assert_status(r: &Value, status: &str) {
    assert_eq!(
        r["status"],
        status,
        "unexpected result: {}",
        serde_json::to_string_pretty(r).unwrap()
    );
}

/// Processes killed when the test ends, even when it fails.
pub struct Procs(pub Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A redis-server of the test's own on a free port, with AOF (so it can be
/// killed and restarted with its data), for faults that must not touch the
/// shared Redis: kills, stalls, pauses, odd configuration.
pub struct OwnRedis {
    child: Option<Child>,
    pub port: u16,
    dir: std::path::PathBuf,
    extra: Vec<String>,
}

impl OwnRedis {
    /// Start one; `extra` are more `redis-server` options.
    pub fn start(extra: &[&str]) -> OwnRedis {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("sandq-redis-{port}-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = OwnRedis {
            child: None,
            port,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        r.restart();
        r
    }

    /// Start (again) on the same port with the same data.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while client
            .get_connection_with_timeout(Duration::from_millis(200))
            .is_err()
        {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: the data written so far stays in the AOF.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A plain HTTP/1.0 GET to 127.0.0.1:`port`: (status code, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Error, ErrorKind, Read, Write};
    let addr = ([127, 0, 0, 1], port).into();
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8(raw).map_err(|e| Error::new(ErrorKind::InvalidData, e))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| Error::new(ErrorKind::InvalidData, format!("no header end: {text:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| Error::new(ErrorKind::InvalidData, format!("no status: {head:?}")))?;
    Ok((status, body.to_owned()))
}

/// GET, waiting up to `limit` for the endpoint to start listening.
pub fn http_get_when_up(port: u16, path: &str, limit: Duration) -> (u16, String) {
    let deadline = Instant::now() + limit;
    loop {
        match http_get(port, path) {
            Ok(r) => return r,
            Err(e) if Instant::now() > deadline => panic!("GET {path} on port {port}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

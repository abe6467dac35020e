//! `sandq bench`: sandq against the bare interpreter, on this machine, now.
//!
//! Baseline: the interpreter spawned directly with an empty environment
//! (sequential median/p99, and throughput with one spawner per core). Then a
//! real worker process, started from this binary, measured end to end through
//! Redis (RPUSH of the job to BLPOP of its result): first cold (`--pool-size
//! 0`), then warm (the default pool). Ratios are sandq / bare. It only prints;
//! nothing here is asserted.

use crate::config::BenchArgs;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the worker did not start: {0}")]
    Worker(String),
    #[error("no result for a job within 30 s")]
    NoResult,
}

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> BenchError + '_ {
    move |source| BenchError::Io {
        what: what.to_owned(),
        source,
    }
}

/// Latency figures of one series, in ms.
#[derive(Debug, Clone, Copy, Default)]
struct Series {
    median: f64,
    p99: f64,
}

fn series(mut samples: Vec<Duration>) -> Series {
    if samples.is_empty() {
        return Series::default();
    }
    samples.sort();
    let at =
        |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    Series {
        median: at(0.5),
        p99: at(0.99),
    }
}

struct Snippet {
    language: &'static str,
    program: &'static str,
    args: &'static [&'static str],
    code: &'static str,
}

const SNIPPETS: [Snippet; 2] = [
    Snippet {
        language: "python3",
        program: "/usr/bin/python3",
        args: &["-c", "print(1)"],
        code: "print(1)",
    },
    Snippet {
        language: "nodejs",
        program: "/usr/bin/node",
        args: &["-e", "console.log(1)"],
        code: "console.log(1)",
    },
];

fn bare_once(s: &Snippet) -> Result<Duration, BenchError> {
    let t = Instant::now();
    let out = Command::new(s.program)
        .args(s.args)
        .env_clear()
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(io_err(s.program))?;
    if out.stdout != b"1\n" {
        return Err(BenchError::Io {
            what: format!(
                "{} printed {:?}",
                s.program,
                String::from_utf8_lossy(&out.stdout)
            ),
            source: std::io::ErrorKind::InvalidData.into(),
        });
    }
    Ok(t.elapsed())
}

/// Run `per_thread` iterations on each of `threads` threads; jobs per second.
fn throughput<F>(threads: usize, per_thread: usize, f: F) -> Result<f64, BenchError>
where
    F: Fn(usize) -> Result<(), BenchError> + Send + Sync + 'static,
{
    let f = Arc::new(f);
    let t = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let f = f.clone();
            std::thread::spawn(move || -> Result<(), BenchError> {
                for n in 0..per_thread {
                    f(i * per_thread + n)?;
                }
                Ok(())
            })
        })
        .collect();
    for h in handles {
        h.join()
            .map_err(|_| BenchError::Worker("a bench thread panicked".into()))??;
    }
    Ok((threads * per_thread) as f64 / t.elapsed().as_secs_f64())
}

/// A worker process started from this binary; stopped when dropped.
struct WorkerProc {
    child: Child,
}

impl WorkerProc {
    fn start(
        redis: &str,
        prefix: &str,
        concurrency: usize,
        pool: usize,
    ) -> Result<WorkerProc, BenchError> {
        let exe = std::env::current_exe().map_err(io_err("current exe"))?;
        let mut child = Command::new(exe)
            .args([
                "worker",
                "--redis",
                redis,
                "--prefix",
                prefix,
                "--metrics-addr",
                "off",
            ])
            .args([
                "--concurrency",
                &concurrency.to_string(),
                "--pool-size",
                &pool.to_string(),
            ])
            .env("SANDQ_LOG", "warn,sandq::worker=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io_err("starting the worker"))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| BenchError::Worker("no stderr".into()))?;
        let mut lines = BufReader::new(stderr).lines();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains("waiting for jobs") => break,
                Some(Ok(_)) if Instant::now() < deadline => continue,
                other => return Err(BenchError::Worker(format!("{other:?}"))),
            }
        }
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines.by_ref() {});
        Ok(WorkerProc { child })
    }

    fn rss_kb(&self) -> u64 {
        rss_of(self.child.id())
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// One job through Redis: RPUSH to BLPOP.
fn through_redis(
    conn: &mut redis::Connection,
    prefix: &str,
    language: &str,
    code: &str,
) -> Result<Duration, BenchError> {
    let id = uuid::Uuid::new_v4().to_string();
    let job = json!({"id": id, "language": language, "code": code});
    let t = Instant::now();
    redis::cmd("RPUSH")
        .arg(format!("{prefix}:queue"))
        .arg(job.to_string())
        .query::<i64>(conn)?;
    let r: Option<(String, String)> = redis::cmd("BLPOP")
        .arg(format!("{prefix}:result:{id}"))
        .arg(30)
        .query(conn)?;
    let elapsed = t.elapsed();
    let (_, result) = r.ok_or(BenchError::NoResult)?;
    if !result.contains("\"status\":\"ok\"") {
        return Err(BenchError::Worker(format!("a bench job failed: {result}")));
    }
    Ok(elapsed)
}

struct Line {
    name: String,
    seq: Series,
    rate: f64,
}

pub fn run(args: BenchArgs) -> Result<(), BenchError> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    println!(
        "sandq bench {} on {cores} cores, kernel {kernel}",
        env!("CARGO_PKG_VERSION")
    );
    println!(
        "sequential: {} runs per line (median, p99); throughput: {} parallel clients x {} runs",
        args.runs,
        args.parallel,
        args.runs / 2
    );
    let client = redis::Client::open(args.redis.as_str())?;
    let prefix = format!("sandq-bench:{}", std::process::id());
    let mut lines: Vec<Line> = Vec::new();
    let mut rss = Vec::new();

    for s in &SNIPPETS {
        // Baseline.
        let _ = bare_once(s)?;
        let mut samples = Vec::new();
        for _ in 0..args.runs {
            samples.push(bare_once(s)?);
        }
        let idx = SNIPPETS
            .iter()
            .position(|x| x.language == s.language)
            .unwrap_or(0);
        let rate = throughput(cores, args.runs / 2, move |_| {
            bare_once(&SNIPPETS[idx]).map(|_| ())
        })?;
        lines.push(Line {
            name: format!("{} bare spawn", s.language),
            seq: series(samples),
            rate,
        });
    }

    for (path, pool) in [("cold", 0usize), ("warm", cores)] {
        let worker = WorkerProc::start(&args.redis, &prefix, cores, pool)?;
        // Let the pool fill and the worker settle.
        std::thread::sleep(Duration::from_millis(1500));
        let idle = worker.rss_kb();
        let peak = Arc::new(AtomicU64::new(idle));
        for s in &SNIPPETS {
            let mut conn = client.get_connection()?;
            for _ in 0..3 {
                through_redis(&mut conn, &prefix, s.language, s.code)?;
            }
            let mut samples = Vec::new();
            for _ in 0..args.runs {
                samples.push(through_redis(&mut conn, &prefix, s.language, s.code)?);
                // A client that waits between jobs, on both paths, so that the
                // warm line measures a pool that keeps up (refilling takes one
                // cold start); the throughput lines measure it under load.
                std::thread::sleep(Duration::from_millis(60));
            }
            let seq = series(samples);
            let (prefix2, language, code) = (prefix.clone(), s.language, s.code);
            let pid = worker.child.id();
            let peak2 = peak.clone();
            // One connection per client thread, opened before the clock starts.
            let conns: Vec<Mutex<redis::Connection>> = (0..args.parallel)
                .map(|_| client.get_connection().map(Mutex::new))
                .collect::<Result<_, _>>()?;
            let per_client = args.runs / 2;
            let rate = throughput(args.parallel, per_client, move |n| {
                let mut c = conns[n / per_client.max(1)]
                    .lock()
                    .map_err(|_| BenchError::Worker("a bench thread panicked".into()))?;
                through_redis(&mut c, &prefix2, language, code)?;
                if n % 10 == 0 {
                    peak2.fetch_max(rss_of(pid), Ordering::Relaxed);
                }
                Ok(())
            })?;
            lines.push(Line {
                name: format!("{} sandq {path}", s.language),
                seq,
                rate,
            });
        }
        rss.push((path, idle, peak.load(Ordering::Relaxed)));
        drop(worker);
    }
    // Remove what the bench left (results are popped; done markers remain).
    if let Ok(mut conn) = client.get_connection() {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query(&mut conn)
            .unwrap_or_default();
        for k in keys {
            let _: Result<(), _> = redis::cmd("DEL").arg(k).query(&mut conn);
        }
    }

    println!();
    println!(
        "{:<24} {:>10} {:>10} {:>10} {:>12} {:>10}",
        "line", "median ms", "p99 ms", "x bare", "jobs/s", "x bare"
    );
    for l in &lines {
        let language = l.name.split_whitespace().next().unwrap_or_default();
        let bare = lines
            .iter()
            .find(|b| b.name == format!("{language} bare spawn"))
            .map(|b| (b.seq.median, b.rate))
            .unwrap_or((1.0, 1.0));
        println!(
            "{:<24} {:>10.2} {:>10.2} {:>10.2} {:>12.1} {:>10.2}",
            l.name,
            l.seq.median,
            l.seq.p99,
            l.seq.median / bare.0,
            l.rate,
            l.rate / bare.1
        );
    }
    println!();
    for (path, idle, peak) in rss {
        println!(
            "worker RSS ({path}): idle {:.1} MiB, under load {:.1} MiB",
            idle as f64 / 1024.0,
            peak as f64 / 1024.0
        );
    }
    println!("targets: cold python3 median <= 1.3x bare, throughput >= 0.85x bare, idle RSS <= 20 MiB; warm python3 <= 0.4x, warm nodejs <= 0.1x");
    Ok(())
}

/// Resident memory of a process, in KiB.
fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

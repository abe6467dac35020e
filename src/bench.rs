//! `sandq bench`: sandq against the bare interpreter, on this machine, now.
//!
//! Baseline: the interpreter spawned directly with an empty environment.
//! Against it, two real worker processes started from this binary, one cold
//! (`--pool-size 0`) and one warm (the default pool), measured end to end
//! through Redis (RPUSH of the job to BLPOP of its result). These machines'
//! speed drifts by tens of percent within a minute, so figures that are
//! compared are taken side by side: the sequential series interleave bare,
//! cold and warm one run at a time, and throughput alternates rounds of bare
//! spawning and of each path, each ratio taken within its round. Ratios are
//! sandq / bare. It only prints; nothing here is asserted.

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

/// One line of the table: a sequential series and a throughput, both taken
/// next to the bare line of the same language.
struct Line {
    name: String,
    seq: Series,
    rate: f64,
    /// Median over the rounds of this rate / the bare rate of the same round.
    rate_ratio: f64,
}

/// Throughput rounds per line: bare and sandq alternate, so every ratio
/// compares figures taken a few seconds apart (these machines' speed drifts).
const ROUNDS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// A path through sandq: a worker and where its jobs go.
struct Path {
    name: &'static str,
    worker: WorkerProc,
    prefix: String,
    peak_kb: Arc<AtomicU64>,
    idle_kb: u64,
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
    let per_round = (args.runs / 2 / ROUNDS).max(1);
    println!(
        "sequential: {} runs per line, bare, cold and warm interleaved (median, p99); \
         throughput: {ROUNDS} rounds of bare ({cores} spawners) then sandq ({} clients), {per_round} runs per spawner or client",
        args.runs, args.parallel
    );
    let client = redis::Client::open(args.redis.as_str())?;
    let base = format!("sandq-bench:{}", std::process::id());
    // Both workers run at once, so that each sequential sample of a path is
    // taken next to the others; only one is ever loaded.
    let mut paths = Vec::new();
    for (name, pool) in [("cold", 0usize), ("warm", cores)] {
        let prefix = format!("{base}:{name}");
        let worker = WorkerProc::start(&args.redis, &prefix, cores, pool)?;
        paths.push(Path {
            name,
            worker,
            prefix,
            peak_kb: Arc::new(AtomicU64::new(0)),
            idle_kb: 0,
        });
    }
    // Let the pools fill and the workers settle.
    std::thread::sleep(Duration::from_millis(1500));
    for path in &mut paths {
        path.idle_kb = path.worker.rss_kb();
        path.peak_kb.store(path.idle_kb, Ordering::Relaxed);
    }

    let mut lines: Vec<Line> = Vec::new();
    let mut conn = client.get_connection()?;
    for (idx, s) in SNIPPETS.iter().enumerate() {
        // Warm-up of every path, then the interleaved sequential series.
        let _ = bare_once(s)?;
        for path in &paths {
            for _ in 0..3 {
                through_redis(&mut conn, &path.prefix, s.language, s.code)?;
            }
        }
        let mut bare = Vec::new();
        let mut sandq: Vec<Vec<Duration>> = vec![Vec::new(); paths.len()];
        for run in 0..args.runs {
            // Each path takes each place in the order equally often: the
            // first run after the pause below is slower (cold caches).
            for turn in 0..=paths.len() {
                match (run + turn) % (paths.len() + 1) {
                    0 => bare.push(bare_once(s)?),
                    i => {
                        let path = &paths[i - 1];
                        let t = through_redis(&mut conn, &path.prefix, s.language, s.code)?;
                        sandq[i - 1].push(t);
                    }
                }
            }
            // A client that waits between jobs, so that the warm line
            // measures a pool that keeps up (refilling takes one cold start);
            // the throughput lines measure it under load.
            std::thread::sleep(Duration::from_millis(60));
        }

        // Throughput: rounds of bare, then each path.
        let mut bare_rates = Vec::new();
        let mut rates: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
        let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
        for _ in 0..ROUNDS {
            let bare_rate = throughput(cores, per_round, move |_| {
                bare_once(&SNIPPETS[idx]).map(|_| ())
            })?;
            bare_rates.push(bare_rate);
            for (i, path) in paths.iter().enumerate() {
                // One connection per client, opened before the clock starts.
                let conns: Vec<Mutex<redis::Connection>> = (0..args.parallel)
                    .map(|_| client.get_connection().map(Mutex::new))
                    .collect::<Result<_, _>>()?;
                let (prefix, language, code) = (path.prefix.clone(), s.language, s.code);
                let pid = path.worker.child.id();
                let peak = path.peak_kb.clone();
                let rate = throughput(args.parallel, per_round, move |n| {
                    let mut c = conns[n / per_round]
                        .lock()
                        .map_err(|_| BenchError::Worker("a bench thread panicked".into()))?;
                    through_redis(&mut c, &prefix, language, code)?;
                    if n % 10 == 0 {
                        peak.fetch_max(rss_of(pid), Ordering::Relaxed);
                    }
                    Ok(())
                })?;
                rates[i].push(rate);
                ratios[i].push(rate / bare_rate);
            }
        }
        lines.push(Line {
            name: format!("{} bare spawn", s.language),
            seq: series(bare),
            rate: median(bare_rates),
            rate_ratio: 1.0,
        });
        for (i, path) in paths.iter().enumerate() {
            lines.push(Line {
                name: format!("{} sandq {}", s.language, path.name),
                seq: series(std::mem::take(&mut sandq[i])),
                rate: median(std::mem::take(&mut rates[i])),
                rate_ratio: median(std::mem::take(&mut ratios[i])),
            });
        }
    }
    let rss: Vec<(&str, u64, u64)> = paths
        .iter()
        .map(|p| (p.name, p.idle_kb, p.peak_kb.load(Ordering::Relaxed)))
        .collect();
    drop(paths);
    // Remove what the bench left (results are popped; done markers remain).
    if let Ok(mut conn) = client.get_connection() {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{base}:*"))
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
            .map(|b| b.seq.median)
            .unwrap_or(1.0);
        println!(
            "{:<24} {:>10.2} {:>10.2} {:>10.2} {:>12.1} {:>10.2}",
            l.name,
            l.seq.median,
            l.seq.p99,
            l.seq.median / bare,
            l.rate,
            l.rate_ratio
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

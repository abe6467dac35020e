//! Hostile input and production faults on the queue side: a field Redis
//! cannot honour, errors retrying cannot fix, reply keys that are not lists,
//! results larger than Redis accepts, Redis stalls and outages, a frozen
//! worker, twin worker ids, a fast clock, Redis memory. Each test runs real
//! worker processes against a real Redis (its own redis-server where the test
//! kills, pauses or reconfigures it) and checks that every job gets exactly
//! one result, with the right verdict.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Beat every 200 ms, dead after 1 s.
const FAST: [&str; 4] = ["--heartbeat-ms", "200", "--heartbeat-ttl-ms", "1000"];

fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    base.iter().chain(extra).copied().collect()
}

fn text(r: &Value, field: &str) -> String {
    r[field].as_str().unwrap_or_default().to_owned()
}

fn strlen(c: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("STRLEN").arg(key).query(c).unwrap()
}

fn exists(c: &mut redis::Connection, key: &str) -> bool {
    redis::cmd("EXISTS").arg(key).query::<i64>(c).unwrap() == 1
}

/// SIGTERM: the worker exits 0 promptly (nothing wedged).
fn stops_cleanly(w: &mut Worker) {
    w.signal(libc::SIGTERM);
    assert_eq!(w.wait(Duration::from_secs(10)), Some(0), "{}", w.log());
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_field_redis_cannot_honour_is_rejected_and_the_worker_goes_on() {
    let Some(mut c) = redis() else { return };
    let p = prefix("ttl-range");
    let mut w = Worker::start(&p, &["--concurrency", "1"]);
    // Redis refuses an expiry this far out ("invalid expire time"): before,
    // the result's push failed and was retried forever, wedging the worker.
    let r = run_job(
        &mut c,
        &p,
        json!({"code": "print(1)", "result_ttl_s": 10_000_000_000_000_000u64}),
    );
    assert_status(&r, "rejected");
    assert!(text(&r, "error").contains("`result_ttl_s`"), "{r}");
    let r = py(&mut c, &p, "print(2)");
    assert_status(&r, "ok");
    assert_eq!(processing_total(&mut c, &p), 0);
    stops_cleanly(&mut w);
}

#[test]
fn redis_errors_that_retrying_cannot_fix_end_the_job_not_the_worker() {
    let Some(mut c) = redis() else { return };
    let p = prefix("wrongtype");
    // A key of sandq's own holding the wrong type: every HINCRBY on it fails
    // with WRONGTYPE, which no amount of waiting fixes.
    let _: () = redis::cmd("SET")
        .arg(format!("{p}:attempts"))
        .arg("not a hash")
        .query(&mut c)
        .unwrap();
    let mut w = Worker::start(&p, &["--concurrency", "1"]);
    let r = run_job(&mut c, &p, json!({"code": "print(1)"}));
    assert_status(&r, "internal_error");
    assert!(text(&r, "error").contains("WRONGTYPE"), "{r}");
    let dead = dead_letters(&mut c, &p);
    assert_eq!(dead.len(), 1, "one dead-letter entry: {dead:?}");
    assert_eq!(dead[0]["id"], r["id"]);
    assert!(text(&dead[0], "reason").contains("WRONGTYPE"));
    assert_eq!(processing_total(&mut c, &p), 0);

    // Once the key is repaired, jobs run again; the worker never stopped.
    let _: () = redis::cmd("DEL")
        .arg(format!("{p}:attempts"))
        .query(&mut c)
        .unwrap();
    assert_status(&py(&mut c, &p, "print(2)"), "ok");
    stops_cleanly(&mut w);
}

#[test]
fn a_reply_key_that_is_not_a_list_gets_a_rejection_on_the_default_key() {
    let Some(mut c) = redis() else { return };
    let p = prefix("reply-type");
    let _w = Worker::start(&p, &["--concurrency", "1"]);
    let set = |c: &mut redis::Connection, key: &str| {
        let _: () = redis::cmd("SET").arg(key).arg("mine").query(c).unwrap();
    };

    // Known before the run: not run, rejected on the default key.
    let key = format!("{p}:result:custom-1");
    set(&mut c, &key);
    push(
        &mut c,
        &p,
        &json!({"id": "j1", "language": "python3", "code": "print(1)", "reply_to": key}),
    );
    let r = result(&mut c, &p, "j1", Duration::from_secs(30));
    assert_status(&r, "rejected");
    assert!(text(&r, "error").contains(&key), "{r}");
    assert!(text(&r, "error").contains("not a list"), "{r}");
    assert!(
        !exists(&mut c, &format!("{p}:done:j1")),
        "a rejection is not remembered"
    );

    // Changed while the job ran: its result becomes a rejection on the
    // default key, and the id is not marked done.
    let key2 = format!("{p}:result:custom-2");
    push(
        &mut c,
        &p,
        &json!({"id": "j2", "language": "python3", "code": "import time\ntime.sleep(1.5)\nprint(2)", "reply_to": key2}),
    );
    wait_for("j2 taken", Duration::from_secs(10), || {
        processing_total(&mut c, &p) == 1
    });
    std::thread::sleep(Duration::from_millis(300));
    set(&mut c, &key2);
    let r = result(&mut c, &p, "j2", Duration::from_secs(30));
    assert_status(&r, "rejected");
    assert!(text(&r, "error").contains(&key2), "{r}");
    assert!(!exists(&mut c, &format!("{p}:done:j2")));
    let kept: String = redis::cmd("GET").arg(&key2).query(&mut c).unwrap();
    assert_eq!(kept, "mine", "the producer's key is left as it was");

    // The corrected job may reuse the id.
    let key3 = format!("{p}:result:custom-3");
    push(
        &mut c,
        &p,
        &json!({"id": "j1", "language": "python3", "code": "print(3)", "reply_to": key3}),
    );
    let (_, json): (String, String) = redis::cmd("BLPOP")
        .arg(&key3)
        .arg(30)
        .query(&mut c)
        .unwrap();
    let r: Value = serde_json::from_str(&json).unwrap();
    assert_status(&r, "ok");
    assert_eq!(r["stdout"], "3\n");
    assert_eq!(processing_total(&mut c, &p), 0);
}

#[test]
fn a_result_larger_than_redis_accepts_is_cut_to_fit() {
    if redis().is_none() {
        return;
    }
    // The smallest bulk limit Redis allows: 1 MiB.
    let server = OwnRedis::start(&["--proto-max-bulk-len", "1mb"]);
    let p = prefix("bulk");
    let _w = Worker::start_on(
        &server.url(),
        &p,
        "w-bulk",
        &["--concurrency", "1", "--output-limit-bytes", "4194304"],
    );
    let mut c = server.conn();
    let code = "import sys\nsys.stdout.write('x' * 2_000_000)\nsys.stderr.write('tail')";
    let r = run_job(&mut c, &p, json!({"code": code}));
    assert_status(&r, "ok");
    assert_eq!(r["stdout_truncated"], true);
    assert_eq!(r["stderr"], "tail");
    let out = text(&r, "stdout").len();
    assert!(
        (900_000..1_048_576).contains(&out),
        "stdout cut to fit 1 MiB, kept {out} bytes"
    );
    assert!(r.to_string().len() <= 1_048_576);
    // And the worker goes on.
    assert_status(&py(&mut c, &p, "print(1)"), "ok");
}

#[test]
fn rejections_are_pushed_once_through_redis_stalls() {
    if redis().is_none() {
        return;
    }
    let server = OwnRedis::start(&["--enable-debug-command", "yes"]);
    let mut c = server.conn();
    let p = prefix("stalls");
    let n = 4000;
    let ids: Vec<String> = (0..n).map(|i| format!("r{i}")).collect();
    let mut pipe = redis::pipe();
    for id in &ids {
        let job = json!({"id": id, "language": "cobol", "code": ""});
        pipe.cmd("RPUSH")
            .arg(format!("{p}:queue"))
            .arg(job.to_string())
            .ignore();
    }
    let _: () = pipe.query(&mut c).unwrap();
    let _w = Worker::start_on(
        &server.url(),
        &p,
        "w-stalls",
        &["--concurrency", "2", "--prefetch", "30"],
    );
    // Redis stalls past the client's 500 ms timeout while the worker has
    // dozens of rejections in flight: each call times out on the client,
    // runs on the server once the stall ends, and is retried.
    let mut stalls = 0;
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(100));
        if llen(&mut c, &format!("{p}:queue")) == 0 {
            break;
        }
        let _: () = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg(0.8)
            .query(&mut c)
            .unwrap();
        stalls += 1;
    }
    assert!(stalls >= 3, "the backlog drained before the stalls");
    let results = collect(&mut c, &p, &ids, Duration::from_secs(120));
    assert!(results.values().all(|r| r["status"] == "rejected"));
    println!("{n} rejections through {stalls} stalls of 800 ms: each pushed once");
}

/// Whether the worker's processing list holds a job.
fn holds(c: &mut redis::Connection, p: &str, worker: &str) -> bool {
    llen(c, &format!("{p}:processing:{worker}")) > 0
}

/// How many deliveries of job `id` have started (the attempts hash); a job
/// is in a processing list a moment before its delivery is counted.
fn attempts(c: &mut redis::Connection, p: &str, id: &str) -> u64 {
    redis::cmd("HGET")
        .arg(format!("{p}:attempts"))
        .arg(id)
        .query::<Option<u64>>(c)
        .unwrap()
        .unwrap_or(0)
}

#[test]
fn chaos_a_frozen_worker_does_not_win_with_a_stale_verdict() {
    let Some(mut c) = redis() else { return };
    let p = prefix("frozen");
    // Dead after 2 s of silence.
    let beat = ["--heartbeat-ms", "500", "--heartbeat-ttl-ms", "2000"];
    let a = Worker::start_with_id(&p, "w-a", &with(&beat, &["--concurrency", "1"])).keep_keys();
    // Sleeps, then writes more than a pipe holds, then sleeps: about 3 s
    // when its output is read, forever when nobody reads it.
    let code = "import sys, time\ntime.sleep(0.5)\nsys.stdout.write('x' * 900_000)\nsys.stdout.flush()\ntime.sleep(2.5)\nprint('done')";
    push(
        &mut c,
        &p,
        &json!({"id": "f1", "language": "python3", "code": code, "timeout_ms": 4000}),
    );
    wait_for("A takes the job", Duration::from_secs(10), || {
        holds(&mut c, &p, "w-a")
    });
    std::thread::sleep(Duration::from_millis(200));
    // Freeze A mid-job: the job blocks on its full stdout pipe; A's
    // heartbeat stops and B reaps the job and runs it again.
    a.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    let b = Worker::start_with_id(&p, "w-b", &with(&beat, &["--concurrency", "1"]));
    wait_for("B takes the reaped job", Duration::from_secs(15), || {
        holds(&mut c, &p, "w-b")
    });
    // Thaw A past its job's deadline, while B's run is still going.
    let thaw = Duration::from_millis(4600);
    std::thread::sleep(thaw.saturating_sub(frozen.elapsed()));
    a.signal(libc::SIGCONT);
    let r = result(&mut c, &p, "f1", Duration::from_secs(30));
    assert_status(&r, "ok");
    assert_eq!(r["worker"], "w-b", "{r}");
    assert_eq!(r["stdout"].as_str().unwrap().len(), 900_005);
    // A finishes its own run of the job later and must push nothing.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        llen(&mut c, &format!("{p}:result:f1")),
        0,
        "a second result"
    );
    assert_eq!(processing_total(&mut c, &p), 0);
    assert!(
        a.log().contains("no longer holds the job"),
        "A dropped its stale result; log:\n{}",
        a.log()
    );
    drop(b);
    drop(a);
    delete_prefix(&p);
}

/// A worker process started by hand (for one that must fail to start).
fn worker_command(redis: &str, p: &str, id: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("worker")
        .args(["--redis", redis, "--prefix", p, "--worker-id", id])
        .args(["--metrics-addr", "off"])
        .args(args)
        .env("SANDQ_LOG", "info")
        .env_remove("SANDQ_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Run a worker that must refuse to start: its exit code and stderr.
fn refused_start(redis: &str, p: &str, id: &str, args: &[&str]) -> (Option<i32>, String) {
    let mut child = worker_command(redis, p, id, args).spawn().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, reader.join().unwrap())
}

#[test]
fn chaos_two_workers_started_with_one_id() {
    let Some(mut c) = redis() else { return };
    let p = prefix("twins");
    let id = format!("twin-{:08x}", rand::random::<u32>());
    let beat = ["--heartbeat-ms", "500", "--heartbeat-ttl-ms", "5000"];
    let args = with(&beat, &["--concurrency", "1"]);
    let a = Worker::start_with_id(&p, &id, &args).keep_keys();
    let long = "import time\ntime.sleep(3)\nprint('long')";
    push(
        &mut c,
        &p,
        &json!({"id": "t1", "language": "python3", "code": long}),
    );
    wait_for("A takes t1", Duration::from_secs(10), || {
        holds(&mut c, &p, &id)
    });

    // A twin is refused while A lives, and touches nothing of A's.
    let (code, log) = refused_start(&redis_url(), &p, &id, &args);
    assert_eq!(code, Some(2), "the twin must not run; log:\n{log}");
    assert!(log.contains("is held by a live worker"), "{log}");
    assert!(holds(&mut c, &p, &id), "A still holds t1");
    let r = result(&mut c, &p, "t1", Duration::from_secs(30));
    assert_status(&r, "ok");
    assert_eq!(r["attempt"], 1, "t1 ran once: {r}");

    // A dies with a job; its heartbeat outlives it by the TTL, during which
    // the id is still refused; then a new process takes the id and recovers
    // the job A left behind.
    push(
        &mut c,
        &p,
        &json!({"id": "t2", "language": "python3", "code": long}),
    );
    wait_for("A starts t2", Duration::from_secs(10), || {
        holds(&mut c, &p, &id) && attempts(&mut c, &p, "t2") == 1
    });
    a.signal(libc::SIGKILL);
    let killed = Instant::now();
    drop(a);
    let (code, log) = refused_start(&redis_url(), &p, &id, &args);
    assert!(
        killed.elapsed() < Duration::from_secs(5),
        "the check ran within the TTL"
    );
    assert_eq!(code, Some(2), "{log}");
    std::thread::sleep(Duration::from_secs(5).saturating_sub(killed.elapsed()));
    let _b = Worker::start_with_id(&p, &id, &args);
    let r = result(&mut c, &p, "t2", Duration::from_secs(30));
    assert_status(&r, "ok");
    assert_eq!(r["attempt"], 2, "t2 was re-run once: {r}");
    std::thread::sleep(Duration::from_millis(500));
    for key in ["t1", "t2"] {
        assert_eq!(llen(&mut c, &format!("{p}:result:{key}")), 0);
    }
}

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

#[test]
fn a_dead_worker_whose_clock_runs_fast_is_reaped_on_time() {
    let Some(mut c) = redis() else { return };
    if !std::path::Path::new(LIBFAKETIME).exists() {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "CI=true and libfaketime is missing (scripts/setup installs faketime)"
        );
        eprintln!("skipping: {LIBFAKETIME} is missing");
        return;
    }
    let p = prefix("fast-clock");
    // Worker A's clock is an hour ahead.
    let mut cmd = worker_command(
        &redis_url(),
        &p,
        "w-fast",
        &with(&FAST, &["--concurrency", "1"]),
    );
    cmd.env("LD_PRELOAD", LIBFAKETIME)
        .env("FAKETIME", "+1h")
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .stderr(Stdio::null());
    let a = Procs(vec![cmd.spawn().unwrap()]);
    wait_for("the worker registers", Duration::from_secs(30), || {
        exists(&mut c, &format!("{p}:worker:w-fast"))
    });
    let code = "import time\ntime.sleep(2)\nprint('finished')";
    push(
        &mut c,
        &p,
        &json!({"id": "k1", "language": "python3", "code": code}),
    );
    wait_for("A takes k1", Duration::from_secs(10), || {
        holds(&mut c, &p, "w-fast")
    });
    // Let it start the run (and count the delivery), then kill -9.
    std::thread::sleep(Duration::from_millis(500));
    drop(a);
    let _b = Worker::start_with_id(&p, "w-b", &with(&FAST, &["--concurrency", "1"]));
    let r = result(&mut c, &p, "k1", Duration::from_secs(30));
    assert_status(&r, "ok");
    assert_eq!(r["worker"], "w-b");
    assert_eq!(r["attempt"], 2);
}

#[test]
fn chaos_a_redis_outage_longer_than_the_ttl_reaps_no_live_worker() {
    if redis().is_none() {
        return;
    }
    let mut server = OwnRedis::start(&[]);
    let p = prefix("outage");
    let beat = ["--heartbeat-ms", "500", "--heartbeat-ttl-ms", "1500"];
    let args = with(&beat, &["--concurrency", "3"]);
    let w1 = Worker::start_on(&server.url(), &p, "w-1", &args);
    let w2 = Worker::start_on(&server.url(), &p, "w-2", &args);
    let mut c = server.conn();
    let ids: Vec<String> = (0..4).map(|i| format!("o{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let code = format!("import time\ntime.sleep(4)\nprint({i})");
        push(
            &mut c,
            &p,
            &json!({"id": id, "language": "python3", "code": code}),
        );
    }
    wait_for("all four running", Duration::from_secs(10), || {
        processing_total(&mut c, &p) == 4
    });
    // Down for twice the TTL: every heartbeat key expires meanwhile.
    server.kill();
    std::thread::sleep(Duration::from_secs(3));
    server.restart();
    let mut c = server.conn();
    let results = collect(&mut c, &p, &ids, Duration::from_secs(60));
    for (i, id) in ids.iter().enumerate() {
        assert_status(&results[id], "ok");
        assert_eq!(results[id]["stdout"], format!("{i}\n"));
        assert_eq!(results[id]["attempt"], 1, "{id} was not re-run");
    }
    for w in [&w1, &w2] {
        assert!(
            !w.log().contains("reaped the jobs of dead workers"),
            "a live worker was reaped; log:\n{}",
            w.log()
        );
    }
    assert_eq!(processing_total(&mut c, &p), 0);
}

#[test]
fn sigterm_while_redis_is_down_ends_at_the_grace_period() {
    if redis().is_none() {
        return;
    }
    let mut server = OwnRedis::start(&[]);
    let p = prefix("down-drain");
    let beat = ["--heartbeat-ms", "250", "--heartbeat-ttl-ms", "1000"];
    let mut w = Worker::start_on(
        &server.url(),
        &p,
        "w-drain",
        &with(
            &beat,
            &["--concurrency", "2", "--shutdown-grace-ms", "1500"],
        ),
    );
    let mut c = server.conn();
    let ids: Vec<String> = (0..2).map(|i| format!("d{i}")).collect();
    for id in &ids {
        push(
            &mut c,
            &p,
            &json!({"id": id, "language": "python3", "code": "import time\ntime.sleep(1)\nprint('ran')"}),
        );
    }
    wait_for("both running", Duration::from_secs(10), || {
        processing_total(&mut c, &p) == 2
    });
    server.kill();
    // The jobs finish; their results wait for Redis.
    std::thread::sleep(Duration::from_millis(1500));
    let asked = Instant::now();
    w.signal(libc::SIGTERM);
    let code = w.wait(Duration::from_secs(20));
    let took = asked.elapsed();
    assert_eq!(code, Some(0), "exits cleanly; log:\n{}", w.log());
    let stranded = w
        .log()
        .lines()
        .find(|l| l.contains("these jobs stay in this worker's processing list"))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no stranded-jobs line:\n{}", w.log()));
    assert!(stranded.contains("jobs=2"), "both jobs counted: {stranded}");
    println!("drain with Redis down took {took:?} (grace 1.5 s)");

    // Nothing is lost: the jobs are in Redis, and the next worker's reaper
    // runs them.
    server.restart();
    let _next = Worker::start_on(
        &server.url(),
        &p,
        "w-next",
        &with(&beat, &["--concurrency", "2"]),
    );
    let mut c = server.conn();
    let results = collect(&mut c, &p, &ids, Duration::from_secs(60));
    for id in &ids {
        assert_status(&results[id], "ok");
    }
}

#[test]
fn done_markers_are_small_and_the_dead_list_is_capped() {
    let Some(mut c) = redis() else { return };
    let p = prefix("redis-memory");
    let (_w, port) =
        Worker::start_with_metrics(&p, &["--concurrency", "1", "--dead-letter-max", "5"]);
    let r = py(&mut c, &p, "print('x' * 300_000)");
    assert_status(&r, "ok");
    let marker = strlen(&mut c, &format!("{p}:done:{}", text(&r, "id")));
    assert!(
        (1..64).contains(&marker),
        "the done marker holds a status, not a copy of the result ({marker} bytes)"
    );
    for i in 0..12 {
        push_raw(&mut c, &p, &format!("not json {i}"));
    }
    // A big one keeps its first 16 KiB and says how long it was.
    push_raw(&mut c, &p, &"\u{1}".repeat(100_000));
    assert_status(&py(&mut c, &p, "print(1)"), "ok");
    let payloads: Vec<String> = dead_letters(&mut c, &p)
        .iter()
        .map(|e| text(e, "payload"))
        .collect();
    let newest: Vec<String> = (8..12).map(|i| format!("not json {i}")).collect();
    assert_eq!(payloads[..4], newest, "the newest five are kept");
    let big = &dead_letters(&mut c, &p)[4];
    assert_eq!(big["payload_bytes"], 100_000);
    assert_eq!(text(big, "payload").len(), 16 * 1024);
    let (_, metrics) = http_get(port, "/metrics").unwrap();
    assert!(
        metrics.contains("sandq_dead_letters_trimmed_total 8"),
        "{metrics}"
    );
}

#[test]
fn a_silent_redis_does_not_keep_a_worker_from_stopping() {
    if redis().is_none() {
        return;
    }
    let server = OwnRedis::start(&[]);
    let p = prefix("silent");
    let mut w = Worker::start_on(
        &server.url(),
        &p,
        "w-silent",
        &["--concurrency", "1", "--shutdown-grace-ms", "1500"],
    );
    // Redis stops answering (its connections stay open) while the idle
    // worker waits in a blocking fetch: the fetch must not wait for it.
    std::thread::sleep(Duration::from_secs(3));
    let pid = nix::unistd::Pid::from_raw(server.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let asked = Instant::now();
    w.signal(libc::SIGTERM);
    let code = w.wait(Duration::from_secs(30));
    let took = asked.elapsed();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(
        code,
        Some(0),
        "stops while Redis is silent; log:\n{}",
        w.log()
    );
    println!("SIGTERM with Redis silent: exited after {took:?}");
}

#[test]
fn a_key_of_the_wrong_type_does_not_stop_the_reaper() {
    let Some(mut c) = redis() else { return };
    let p = prefix("wrongtype-reaper");
    // Anyone who can write the dead list's key can break the depth gauges:
    // that must not keep the reaper from recovering a dead worker's jobs.
    let _: () = redis::cmd("SET")
        .arg(format!("{p}:dead"))
        .arg("not a list")
        .query(&mut c)
        .unwrap();
    let beat = ["--heartbeat-ms", "500", "--heartbeat-ttl-ms", "3000"];
    let args = with(&beat, &["--concurrency", "1"]);
    let a = Worker::start_with_id(&p, "w-a", &args).keep_keys();
    let code = "import time\ntime.sleep(1)\nprint('done')";
    push(
        &mut c,
        &p,
        &json!({"id": "r1", "language": "python3", "code": code}),
    );
    wait_for("A takes r1", Duration::from_secs(10), || {
        holds(&mut c, &p, "w-a")
    });
    a.signal(libc::SIGKILL);
    drop(a);
    let _b = Worker::start_with_id(&p, "w-b", &args);
    let r = result(&mut c, &p, "r1", Duration::from_secs(40));
    assert_status(&r, "ok");
    assert_eq!(r["worker"], "w-b", "{r}");
}

#[test]
fn jobs_survive_a_queue_key_of_the_wrong_type() {
    let Some(mut c) = redis() else { return };
    let p = prefix("queue-type");
    let args = with(&FAST, &["--concurrency", "2"]);
    let a = Worker::start_with_id(&p, "w-a", &args).keep_keys();
    let code = "import time\ntime.sleep(10)\nprint('done')";
    for id in ["q1", "q2"] {
        push(
            &mut c,
            &p,
            &json!({"id": id, "language": "python3", "code": code, "timeout_ms": 20000}),
        );
    }
    wait_for("A takes both", Duration::from_secs(10), || {
        llen(&mut c, &format!("{p}:processing:w-a")) == 2
    });
    // The queue becomes a string, then A dies: its jobs cannot go back to
    // the queue, and must not be lost on the way.
    let _: () = redis::cmd("SET")
        .arg(format!("{p}:queue"))
        .arg("not a list")
        .query(&mut c)
        .unwrap();
    a.signal(libc::SIGKILL);
    drop(a);
    let _b = Worker::start_with_id(&p, "w-b", &args);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        llen(&mut c, &format!("{p}:processing:w-a")),
        2,
        "both jobs are still in the dead worker's list"
    );
    let _: () = redis::cmd("DEL")
        .arg(format!("{p}:queue"))
        .query(&mut c)
        .unwrap();
    let ids = ["q1".to_owned(), "q2".to_owned()];
    let results = collect(&mut c, &p, &ids, Duration::from_secs(60));
    for id in &ids {
        assert_status(&results[id], "ok");
    }
}

#[test]
fn a_result_nothing_can_take_is_dead_lettered() {
    let Some(mut c) = redis() else { return };
    let p = prefix("no-taker");
    let _w = Worker::start(&p, &["--concurrency", "1"]);
    for key in [format!("{p}:result:custom"), format!("{p}:result:n1")] {
        let _: () = redis::cmd("HSET")
            .arg(key)
            .arg("f")
            .arg("v")
            .query(&mut c)
            .unwrap();
    }
    push(
        &mut c,
        &p,
        &json!({"id": "n1", "language": "python3", "code": "print(1)", "reply_to": format!("{p}:result:custom")}),
    );
    wait_for("the dead letter", Duration::from_secs(30), || {
        llen(&mut c, &format!("{p}:dead")) == 1
    });
    let dead = dead_letters(&mut c, &p);
    assert_eq!(dead[0]["id"], "n1");
    assert!(text(&dead[0], "reason").contains("nor"), "{}", dead[0]);
    assert_eq!(processing_total(&mut c, &p), 0);
}

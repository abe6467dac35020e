//! Nothing is lost: reaper, retries, dead letters, drain, Redis restarts.
//! Real worker processes, killed for real; the Redis-restart test runs its own
//! redis-server on a free port.

mod common;
use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

/// Fast failure detection for tests: beat every 250 ms, dead after 1.5 s.
const FAST: [&str; 4] = ["--heartbeat-ms", "250", "--heartbeat-ttl-ms", "1500"];

fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&str> = FAST.to_vec();
    v.extend_from_slice(extra);
    v
}

#[test]
fn chaos_kill_and_restart_workers() {
    let Some(mut c) = redis() else { return };
    let p = prefix("chaos");
    let mut a = Worker::start(&p, &args(&["--concurrency", "2"])).keep_keys();
    let mut b = Worker::start(&p, &args(&["--concurrency", "2"])).keep_keys();
    let _c3 = Worker::start(&p, &args(&["--concurrency", "2"]));

    // 500 jobs from 10 ms to 1 s; most short.
    let ids: Vec<String> = (0..500).map(|i| format!("c{i}")).collect();
    let mut pipe = redis::pipe();
    for (i, id) in ids.iter().enumerate() {
        let ms = if i % 10 == 0 {
            200 + (i * 37) % 800
        } else {
            10 + (i * 13) % 60
        };
        let job = json!({"id": id, "language": "python3", "code": format!("import time\ntime.sleep({ms}/1000)\nprint({i})")});
        pipe.cmd("RPUSH")
            .arg(format!("{p}:queue"))
            .arg(job.to_string())
            .ignore();
    }
    let _: () = pipe.query(&mut c).unwrap();
    let started = Instant::now();

    // kill -9 worker A twice, restarting it each time; SIGTERM worker B.
    let mut kills = 0;
    let mut recoveries = Vec::new();
    for round in 0..2 {
        std::thread::sleep(Duration::from_millis(1500));
        let dead_list = format!("{p}:processing:{}", a.id);
        a.signal(libc::SIGKILL);
        let killed_at = Instant::now();
        let orphaned = llen(&mut c, &dead_list);
        assert!(a.wait(Duration::from_secs(5)).is_some() || !a.alive());
        kills += 1;
        a = Worker::start(&p, &args(&["--concurrency", "2"])).keep_keys();
        if round == 0 {
            b.signal(libc::SIGTERM);
        }
        // The reaper (in the surviving workers) hands the dead one's jobs back.
        while llen(&mut c, &dead_list) > 0 {
            assert!(
                killed_at.elapsed() < Duration::from_secs(10),
                "never reaped"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        recoveries.push((orphaned, killed_at.elapsed()));
    }
    let code = b.wait(Duration::from_secs(30));
    assert_eq!(code, Some(0), "SIGTERM: clean exit; log:\n{}", b.log());

    let results = collect(&mut c, &p, &ids, Duration::from_secs(240));
    let took = started.elapsed();
    assert_eq!(results.len(), 500);
    let mut retried = 0;
    for (i, id) in ids.iter().enumerate() {
        let r = &results[id];
        assert_status(r, "ok");
        assert_eq!(r["stdout"], format!("{i}\n"));
        if r["attempt"].as_u64().unwrap() >= 2 {
            retried += 1;
        }
    }
    assert!(
        retried >= 1,
        "jobs of the killed worker were re-run with attempt >= 2"
    );
    assert_eq!(
        processing_total(&mut c, &p),
        0,
        "nothing left in processing lists"
    );
    assert_eq!(llen(&mut c, &format!("{p}:queue")), 0);
    println!(
        "chaos: 500 jobs, {kills} kill -9 + 1 SIGTERM, 500 results, duplicates 0, lost 0, re-run {retried}, {took:?}; \
         reaper recovered (jobs, time after the kill, heartbeat TTL 1.5 s): {recoveries:?}"
    );
}

#[test]
fn poison_job_is_dead_lettered_after_max_attempts() {
    let Some(mut c) = redis() else { return };
    let p = prefix("poison");
    let poison = json!({"id": "poison", "language": "python3", "code": "import time\ntime.sleep(60)", "timeout_ms": 60000});
    push(&mut c, &p, &poison);
    let others: Vec<String> = (0..10).map(|i| format!("o{i}")).collect();
    for id in &others {
        push(
            &mut c,
            &p,
            &json!({"id": id, "language": "python3", "code": "print('fine')"}),
        );
    }
    // Each time the poison job runs, kill -9 its worker.
    for attempt in 1..=3u64 {
        let mut w = Worker::start(&p, &args(&["--concurrency", "1"])).keep_keys();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let n: Option<u64> = redis::cmd("HGET")
                .arg(format!("{p}:attempts"))
                .arg("poison")
                .query(&mut c)
                .unwrap();
            if n == Some(attempt) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "poison job not delivered a {attempt}th time"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(300));
        w.signal(libc::SIGKILL);
        w.wait(Duration::from_secs(5));
    }
    let _w = Worker::start(&p, &args(&["--concurrency", "1"]));
    let r = result(&mut c, &p, "poison", Duration::from_secs(30));
    assert_status(&r, "internal_error");
    assert_eq!(r["attempt"], 4);
    assert!(r["error"].as_str().unwrap().contains("max_attempts"), "{r}");
    let dead = dead_letters(&mut c, &p);
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["id"], "poison");
    for id in &others {
        assert_status(&result(&mut c, &p, id, Duration::from_secs(30)), "ok");
    }
}

#[test]
fn sigterm_lets_running_jobs_finish_within_grace() {
    let Some(mut c) = redis() else { return };
    let p = prefix("drain");
    let mut w = Worker::start(
        &p,
        &args(&["--concurrency", "4", "--shutdown-grace-ms", "10000"]),
    );
    let ids: Vec<String> = (0..4).map(|i| format!("d{i}")).collect();
    for id in &ids {
        push(
            &mut c,
            &p,
            &json!({"id": id, "language": "python3", "code": "import time\ntime.sleep(3)\nprint('done')"}),
        );
    }
    wait_running(&mut c, &p, 4);
    let t = Instant::now();
    w.signal(libc::SIGTERM);
    assert_eq!(w.wait(Duration::from_secs(12)), Some(0), "{}", w.log());
    assert!(t.elapsed() < Duration::from_secs(10));
    for id in &ids {
        let r = result(&mut c, &p, id, Duration::from_secs(1));
        assert_status(&r, "ok");
        assert_eq!(r["stdout"], "done\n");
    }
    assert_eq!(processing_total(&mut c, &p), 0);
    let workers: i64 = redis::cmd("ZCARD")
        .arg(format!("{p}:workers"))
        .query(&mut c)
        .unwrap();
    assert_eq!(workers, 0, "deregistered");
}

#[test]
fn sigterm_past_grace_hands_jobs_back() {
    let Some(mut c) = redis() else { return };
    let p = prefix("handback");
    let mut w = Worker::start(
        &p,
        &args(&["--concurrency", "4", "--shutdown-grace-ms", "1000"]),
    )
    .keep_keys();
    let ids: Vec<String> = (0..4).map(|i| format!("h{i}")).collect();
    for id in &ids {
        push(
            &mut c,
            &p,
            &json!({"id": id, "language": "python3", "code": "import time\ntime.sleep(3)\nprint('done')"}),
        );
    }
    wait_running(&mut c, &p, 4);
    w.signal(libc::SIGTERM);
    assert_eq!(w.wait(Duration::from_secs(8)), Some(0), "{}", w.log());
    assert_eq!(
        llen(&mut c, &format!("{p}:queue")),
        4,
        "the 4 jobs are back on the queue"
    );
    for id in &ids {
        assert_eq!(
            llen(&mut c, &format!("{p}:result:{id}")),
            0,
            "no result from the stopped run"
        );
    }
    let _other = Worker::start(&p, &args(&["--concurrency", "4"]));
    for id in &ids {
        let r = result(&mut c, &p, id, Duration::from_secs(30));
        assert_status(&r, "ok");
        assert_eq!(
            r["attempt"], 1,
            "a shutdown hand-back is not a failed attempt"
        );
    }
}

#[test]
fn expired_job_is_not_run() {
    let Some(mut c) = redis() else { return };
    let p = prefix("expired");
    let _w = Worker::start(&p, &args(&["--concurrency", "1"]));
    let r = run_job(
        &mut c,
        &p,
        json!({"code": "open('/tmp/ran','w')\nprint('ran')", "expires_at_ms": 1000}),
    );
    assert_status(&r, "rejected");
    assert_eq!(r["error"], "expired before it started");
    assert_eq!(r["stdout"], "");
    let future = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 60_000;
    let r = run_job(
        &mut c,
        &p,
        json!({"code": "print('ran')", "expires_at_ms": future}),
    );
    assert_status(&r, "ok");
}

#[test]
fn a_prefetched_job_is_neither_counted_nor_kept_by_a_drain() {
    let Some(mut c) = redis() else { return };
    let p = prefix("prefetch");
    let mut w = Worker::start(
        &p,
        &args(&[
            "--concurrency",
            "1",
            "--prefetch",
            "1",
            "--shutdown-grace-ms",
            "10000",
        ]),
    )
    .keep_keys();
    push(
        &mut c,
        &p,
        &json!({"id": "runs", "language": "python3", "code": "import time\ntime.sleep(2)\nprint('done')"}),
    );
    push(
        &mut c,
        &p,
        &json!({"id": "waits", "language": "python3", "code": "print('later')"}),
    );
    // Both taken: one running, one held for the next free slot.
    wait_running(&mut c, &p, 2);
    assert_eq!(llen(&mut c, &format!("{p}:queue")), 0, "both were taken");
    let counted: Option<u64> = redis::cmd("HGET")
        .arg(format!("{p}:attempts"))
        .arg("waits")
        .query(&mut c)
        .unwrap();
    assert_eq!(
        counted, None,
        "a job waiting for a slot has not been delivered yet"
    );
    w.signal(libc::SIGTERM);
    assert_eq!(w.wait(Duration::from_secs(12)), Some(0), "{}", w.log());
    let r = result(&mut c, &p, "runs", Duration::from_secs(1));
    assert_status(&r, "ok");
    assert_eq!(r["stdout"], "done\n");
    assert_eq!(
        llen(&mut c, &format!("{p}:queue")),
        1,
        "the waiting job went back to the queue, not run during the drain"
    );
    assert_eq!(llen(&mut c, &format!("{p}:result:waits")), 0);
    assert_eq!(processing_total(&mut c, &p), 0);
    let _other = Worker::start(&p, &args(&["--concurrency", "1"]));
    let r = result(&mut c, &p, "waits", Duration::from_secs(30));
    assert_status(&r, "ok");
    assert_eq!(r["stdout"], "later\n");
    assert_eq!(r["attempt"], 1);
}

fn wait_running(c: &mut redis::Connection, p: &str, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while processing_total(c, p) < n {
        assert!(Instant::now() < deadline, "jobs never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Taken is not yet running: give the interpreters a moment to start.
    std::thread::sleep(Duration::from_millis(500));
}

#[test]
fn redis_restart_mid_run_loses_nothing() {
    if redis().is_none() {
        return;
    }
    let mut server = OwnRedis::start(&[]);
    let url = server.url();
    let p = prefix("restart");
    let spawn_worker = || {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args([
            "worker",
            "--redis",
            &url,
            "--prefix",
            &p,
            "--metrics-addr",
            "off",
            "--concurrency",
            "2",
        ])
        .args(FAST)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        cmd.spawn().unwrap()
    };
    let mut workers = Procs(vec![spawn_worker(), spawn_worker()]);
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut c = client.get_connection().unwrap();
    let ids: Vec<String> = (0..200).map(|i| format!("r{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let job = json!({"id": id, "language": "python3", "code": format!("import time\ntime.sleep(0.03)\nprint({i})")});
        let _: i64 = redis::cmd("RPUSH")
            .arg(format!("{p}:queue"))
            .arg(job.to_string())
            .query(&mut c)
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(1200));
    server.kill();
    std::thread::sleep(Duration::from_millis(1500));
    server.restart();
    let mut c = client.get_connection().unwrap();
    let results = collect(&mut c, &p, &ids, Duration::from_secs(120));
    for (i, id) in ids.iter().enumerate() {
        assert_status(&results[id], "ok");
        assert_eq!(results[id]["stdout"], format!("{i}\n"));
    }
    for w in workers.0.iter_mut() {
        assert!(
            matches!(w.try_wait(), Ok(None)),
            "a worker exited during the outage"
        );
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(w.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = w.wait();
    }
    drop(server);
}

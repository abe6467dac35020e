//! `sandq submit --batch` end to end: a real worker, real Redis, the batch
//! client as a separate process, its output file read back.

mod common;
use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "sandq-batch-{name}-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn batch(prefix: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["submit", "--redis", &redis_url(), "--prefix", prefix])
        .args(args)
        .env("SANDQ_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The number in a summary row such as `  ok        940`.
fn summary_count(stderr: &str, label: &str) -> Option<u64> {
    stderr.lines().find_map(|l| {
        let rest = l.strip_prefix("  ")?.strip_prefix(label)?;
        (rest.starts_with(' ')).then(|| rest.trim().parse().ok())?
    })
}

/// Ctrl-C, as a terminal would send it.
fn interrupt(child: &Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
}

/// Names of the Redis connections the batch process `pid` holds right now.
fn batch_connections(conn: &mut redis::Connection, pid: u32) -> usize {
    let list: String = redis::cmd("CLIENT").arg("LIST").query(conn).unwrap();
    let tag = format!("name=sandq-batch-{pid}-");
    list.lines().filter(|l| l.contains(&tag)).count()
}

/// Wait for a child while sampling how many connections it holds.
fn wait_sampling(mut child: Child, conn: &mut redis::Connection) -> (Output, usize) {
    let pid = child.id();
    let mut most = 0;
    while matches!(child.try_wait(), Ok(None)) {
        most = most.max(batch_connections(conn, pid));
        std::thread::sleep(Duration::from_millis(100));
    }
    (child.wait_with_output().unwrap(), most)
}

#[test]
fn thousand_jobs_mixed_statuses_and_bad_lines() {
    let Some(mut c) = redis() else { return };
    let p = prefix("batch1000");
    let _w = Worker::start(&p, &["--concurrency", "2"]);
    let dir = temp_dir("1000");
    let (input, out) = (dir.join("jobs.jsonl"), dir.join("results.jsonl"));

    // line number -> (expected status, expected stdout, the line's own id)
    let mut expected: BTreeMap<u64, (&str, String, Option<String>)> = BTreeMap::new();
    let mut bad_lines = Vec::new();
    let mut text = String::new();
    let mut line = 0u64;
    for i in 0..1000u64 {
        if [10, 500, 998].contains(&i) {
            line += 1;
            bad_lines.push(line);
            text.push_str(match i {
                10 => "{\"language\": \"python3\", \"code\": \n",
                500 => "[\"not\", \"an\", \"object\"]\n",
                _ => "{\"id\": 5, \"language\": \"python3\", \"code\": \"print(1)\"}\n",
            });
        }
        if i == 700 {
            line += 1;
            text.push('\n'); // blank lines are not jobs, but they are lines
        }
        line += 1;
        let own_id = (i % 3 == 0).then(|| format!("own-{i}-{p}"));
        let (job, status, stdout) = match i % 50 {
            0 => (
                json!({"language": "python3", "code": "raise ValueError('boom')"}),
                "error",
                String::new(),
            ),
            1 => (
                json!({"language": "python3", "code": "import sys\nsys.exit(2)"}),
                "error",
                String::new(),
            ),
            2 => (
                json!({"language": "cobol", "code": "DISPLAY 1"}),
                "rejected",
                String::new(),
            ),
            3 => (
                json!({"language": "nodejs", "code": format!("console.log({i})")}),
                "ok",
                format!("{i}\n"),
            ),
            _ => (
                json!({"language": "python3", "code": format!("print({i})")}),
                "ok",
                format!("{i}\n"),
            ),
        };
        let mut job = job;
        if let Some(id) = &own_id {
            job["id"] = json!(id);
        }
        text.push_str(&job.to_string());
        text.push('\n');
        expected.insert(line, (status, stdout, own_id));
    }
    std::fs::write(&input, text).unwrap();

    let started = Instant::now();
    let child = batch(
        &p,
        &[
            "--batch",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    )
    .spawn()
    .unwrap();
    let (output, most_connections) = wait_sampling(child, &mut c);
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("batch of 1000 took {took:?}\n{stderr}");
    assert_eq!(
        output.status.code(),
        Some(1),
        "rejected jobs make the exit code non-zero"
    );
    assert!(took < Duration::from_secs(90), "took {took:?}");
    assert!(
        (1..=2).contains(&most_connections),
        "the client held {most_connections} connections"
    );

    // Exactly one record per good line, each with its expected outcome.
    let recs = records(&out);
    assert_eq!(recs.len(), 1000);
    let mut seen = HashSet::new();
    for r in &recs {
        let line = r["line"].as_u64().unwrap();
        assert!(seen.insert(line), "line {line} answered twice");
        let (status, stdout, own_id) = &expected[&line];
        assert_eq!(r["status"], *status, "line {line}: {r}");
        if *status == "ok" {
            assert_eq!(r["stdout"], stdout.as_str(), "line {line}");
        }
        match own_id {
            Some(id) => assert_eq!(r["id"], id.as_str()),
            None => assert!(r["id"].as_str().unwrap().ends_with(&format!("-{line}"))),
        }
    }
    assert_eq!(seen, expected.keys().copied().collect::<HashSet<_>>());
    let exit2 = recs
        .iter()
        .filter(|r| r["exit_code"] == 2 && r["status"] == "error")
        .count();
    assert_eq!(exit2, 20);

    // The summary agrees, and every bad line was named.
    assert_eq!(summary_count(&stderr, "ok"), Some(940), "{stderr}");
    assert_eq!(summary_count(&stderr, "error"), Some(40));
    assert_eq!(summary_count(&stderr, "rejected"), Some(20));
    assert_eq!(summary_count(&stderr, "bad lines"), Some(3));
    assert!(stderr.contains("1000 results"), "{stderr}");
    assert!(stderr.contains("run time p50"), "{stderr}");
    for n in &bad_lines {
        assert!(
            stderr.contains(&format!("line {n}: ")),
            "line {n} not reported"
        );
    }
    assert!(stderr.contains("not valid JSON"));
    assert!(stderr.contains("must be a JSON object"));
    assert!(stderr.contains("`id` must be a string"));
    // Nothing left behind in the queue or on the reply list.
    assert_eq!(llen(&mut c, &format!("{p}:queue")), 0);
    let left: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{p}:result:client:*"))
        .query(&mut c)
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn interrupt_takes_jobs_back_and_resume_finishes_in_order() {
    let Some(mut c) = redis() else { return };
    let p = prefix("batchresume");
    let dir = temp_dir("resume");
    let (input, out) = (dir.join("jobs.jsonl"), dir.join("results.jsonl"));
    let mut text = String::new();
    for i in 0..30 {
        let code = format!("import time\ntime.sleep(0.2)\nprint({i})");
        // Every other job has an id of its own, the rest get one from the client.
        let mut job = json!({"code": code});
        if i % 2 == 0 {
            job["id"] = json!(format!("r{i}-{p}"));
        }
        text.push_str(&format!("{job}\n"));
    }
    std::fs::write(&input, text).unwrap();
    let args = [
        "--batch",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--language",
        "python3",
        "--ordered",
        "--parallel-wait",
        "6",
    ];

    // No worker yet: the first window waits in the queue until the interrupt.
    let child = batch(&p, &args).spawn().unwrap();
    let started = Instant::now();
    while llen(&mut c, &format!("{p}:queue")) < 6 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "nothing pushed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    interrupt(&child);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert_eq!(
        llen(&mut c, &format!("{p}:queue")),
        0,
        "queued jobs are taken back"
    );
    assert!(stderr.contains("taken back"), "{stderr}");
    assert!(stderr.contains("--resume"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "");

    // A worker that takes one job at a time; interrupt again midway.
    let _w = Worker::start(&p, &["--concurrency", "1"]);
    let mut with_resume: Vec<&str> = args.to_vec();
    with_resume.push("--resume");
    let child = batch(&p, &with_resume).spawn().unwrap();
    let started = Instant::now();
    while std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(started.elapsed() < Duration::from_secs(30), "no result");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    interrupt(&child);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    let partial = records(&out).len();
    assert!(
        partial > 0 && partial < 30,
        "{partial} results after the interrupt"
    );
    // A writer killed mid-record leaves a torn tail: resume cuts it off.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&out)
        .unwrap()
        .write_all(b"{\"line\":3,\"id\":\"tor")
        .unwrap();

    let output = batch(&p, &with_resume).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert_eq!(
        summary_count(&stderr, "skipped (resume)"),
        Some(partial as u64)
    );
    let lines: Vec<u64> = records(&out)
        .iter()
        .map(|r| {
            assert_eq!(r["status"], "ok", "{r}");
            r["line"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(lines, (1..=30).collect::<Vec<_>>(), "once each, in order");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn stdin_to_stdout_and_answered_ids_are_refused() {
    let Some(_c) = redis() else { return };
    let p = prefix("batchstdin");
    let _w = Worker::start(&p, &["--concurrency", "2"]);
    let id = format!("once-{p}");
    let input = format!(
        "{{\"code\":\"print(6*7)\"}}\n{{\"id\":\"{id}\",\"code\":\"print(1)\"}}\n{{\"id\":\"{id}\",\"code\":\"print(2)\"}}\n"
    );
    let run = |input: &str| {
        let mut child = batch(&p, &["--batch", "-", "--language", "python3"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    let output = run(&input);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "a duplicate id is a bad line: {stderr}"
    );
    assert!(stderr.contains("line 3: id"), "{stderr}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let mut recs: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    recs.sort_by_key(|r| r["line"].as_u64());
    assert_eq!(recs.len(), 2, "{stdout}");
    assert_eq!(recs[0]["stdout"], "42\n");
    assert_eq!(recs[1]["id"], id.as_str());

    // The same id again, in a later run: a worker would not answer it twice.
    let output = run(&format!("{{\"id\":\"{id}\",\"code\":\"print(3)\"}}\n"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("answered within its result TTL"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty());
}

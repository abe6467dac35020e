//! The core slice end to end: a real worker, real Redis, real Python, talking
//! only through the queue contract.

mod common;
use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

#[test]
fn hello_stdin_unicode_big_output_and_streams() {
    let Some(mut c) = redis() else { return };
    let p = prefix("hello");
    let w = Worker::start(&p, &["--concurrency", "2"]);

    let r = py(&mut c, &p, "print(6*7)");
    assert_status(&r, "ok");
    assert_eq!(r["stdout"], "42\n");
    assert_eq!(r["exit_code"], 0);
    assert_eq!(r["attempt"], 1);
    assert_eq!(r["worker"], w.id.as_str());
    assert!(r["error"].is_null());

    let r = run_job(
        &mut c,
        &p,
        json!({"code": "import sys; print(sys.stdin.read().upper(), end='')", "stdin": "echo me\n"}),
    );
    assert_eq!(r["stdout"], "ECHO ME\n");

    let r = py(&mut c, &p, "print('héllo wörld ✓ 你好 🎉')");
    assert_eq!(r["stdout"], "héllo wörld ✓ 你好 🎉\n");

    let r = py(
        &mut c,
        &p,
        "import sys\nsys.stdout.write('0123456789' * 20000)",
    );
    assert_status(&r, "ok");
    assert_eq!(r["stdout"].as_str().unwrap().len(), 200_000);
    assert_eq!(r["stdout_truncated"], false);

    let r = py(
        &mut c,
        &p,
        "import sys\nprint('to out')\nprint('to err', file=sys.stderr)",
    );
    assert_eq!(r["stdout"], "to out\n");
    assert_eq!(r["stderr"], "to err\n");
}

#[test]
fn errors_and_exit_codes() {
    let Some(mut c) = redis() else { return };
    let p = prefix("errors");
    let _w = Worker::start(&p, &["--concurrency", "2"]);

    let r = py(&mut c, &p, "def f():\n    raise ValueError('bad')\nf()");
    assert_status(&r, "error");
    let stderr = r["stderr"].as_str().unwrap();
    assert!(stderr.contains("Traceback"), "{stderr}");
    assert!(stderr.contains("ValueError: bad"), "{stderr}");
    assert!(
        stderr.contains("raise ValueError('bad')"),
        "the user's source line is shown: {stderr}"
    );
    assert!(!stderr.contains(".sandq-"), "no prescript frames: {stderr}");
    assert_eq!(r["exit_code"], 1);
    assert!(r["error"].as_str().unwrap().contains("code 1"));

    let r = py(&mut c, &p, "import sys; sys.exit(3)");
    assert_status(&r, "error");
    assert_eq!(r["exit_code"], 3);
}

#[test]
fn timeout_is_enforced_quickly() {
    let Some(mut c) = redis() else { return };
    let p = prefix("timeout");
    let _w = Worker::start(&p, &["--concurrency", "2"]);
    let started = Instant::now();
    let r = run_job(
        &mut c,
        &p,
        json!({"code": "while True: pass", "timeout_ms": 1000}),
    );
    let took = started.elapsed();
    assert_status(&r, "timeout");
    assert_eq!(r["signal"], "SIGKILL");
    assert!(took < Duration::from_secs(2), "result after {took:?}");
    // The worker serves the next job.
    assert_status(&py(&mut c, &p, "print('alive')"), "ok");
}

#[test]
fn network_fork_exec_subprocess_are_stopped() {
    let Some(mut c) = redis() else { return };
    let p = prefix("deny");
    let _w = Worker::start(&p, &["--concurrency", "2"]);

    let r = py(&mut c, &p, "import socket\nsocket.socket()");
    assert_status(&r, "violation");
    assert_eq!(r["violation"]["syscall"], "socket");
    assert_eq!(r["violation"]["number"], 41);
    assert_eq!(
        r["error"],
        "blocked system call: socket(AF_INET, SOCK_STREAM, 0)"
    );

    for (code, syscall) in [
        ("import os\nos.fork()", "clone"),
        ("import os\nos.execv('/usr/bin/id', ['id'])", "execve"),
        ("import subprocess\nsubprocess.run(['id'])", "vfork"),
    ] {
        let r = py(&mut c, &p, code);
        assert_status(&r, "violation");
        assert_eq!(r["violation"]["syscall"], syscall, "{code}");
    }
    // And nothing ran: no output from `id`.
    let r = py(&mut c, &p, "import os\ntry:\n    os.posix_spawn('/usr/bin/id', ['id'], {})\nexcept OSError as e:\n    print('refused', e)");
    assert!(
        r["stdout"].as_str().unwrap().is_empty()
            || r["stdout"].as_str().unwrap().starts_with("refused"),
        "{r}"
    );
    assert_ne!(r["status"], "ok");
}

#[test]
fn identity_environment_and_filesystem() {
    let Some(mut c) = redis() else { return };
    let p = prefix("ident");
    let _w = Worker::start(&p, &["--concurrency", "2"]);

    let r = py(
        &mut c,
        &p,
        "import os\nprint(os.getuid(), os.getgid(), os.geteuid())",
    );
    assert_status(&r, "ok");
    let ids: Vec<u32> = r["stdout"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    assert!(
        ids.iter()
            .all(|&u| u != 0 && u != nix::unistd::getuid().as_raw()),
        "{ids:?}"
    );

    let r = py(
        &mut c,
        &p,
        "import os, json\nprint(json.dumps(dict(os.environ)))",
    );
    let env: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(r["stdout"].as_str().unwrap()).unwrap();
    for (k, _) in std::env::vars() {
        if !["LANG", "HOME", "PATH", "TMPDIR"].contains(&k.as_str()) {
            assert!(!env.contains_key(&k), "worker variable {k} leaked");
        }
    }
    assert!(!env.contains_key("SANDQ_LOG"));

    let r = py(&mut c, &p, "open('/etc/shadow').read()");
    assert_status(&r, "error");
    assert!(r["stderr"].as_str().unwrap().contains("Error"), "{r}");

    let r = py(&mut c, &p, "open('/usr/lib/evil', 'w').write('x')");
    assert_status(&r, "error");
    assert!(
        r["stderr"]
            .as_str()
            .unwrap()
            .contains("Read-only file system"),
        "{r}"
    );

    // The scratch dir is writable and private.
    let r = py(&mut c, &p, "import os\nopen('f.txt','w').write('hi')\nprint(open('f.txt').read(), oct(os.stat('.').st_mode & 0o777))");
    assert_status(&r, "ok");
    assert_eq!(r["stdout"], "hi 0o700\n");
}

#[test]
fn the_next_job_of_a_uid_finds_its_scratch_empty() {
    let Some(mut c) = redis() else { return };
    let p = prefix("scratch-reuse");
    // One slot and no pool: every job runs as the same uid, in the same
    // scratch tmpfs, one after another.
    let _w = Worker::start(&p, &["--concurrency", "1", "--pool-size", "0"]);
    let litter = "import os\n\
        open('/tmp/.hidden', 'w').write('secret')\n\
        os.makedirs('/tmp/a/b/c')\n\
        open('/tmp/a/b/c/deep', 'w').write('secret')\n\
        os.chmod('/tmp/a/b', 0)\n\
        os.symlink('/etc/passwd', '/tmp/link')\n\
        os.symlink('/tmp/a', '/tmp/dirlink')\n\
        os.chmod('/tmp', 0o777)\n\
        os.utime('/tmp', (123456789, 123456789))\n\
        print(os.getuid(), sorted(os.listdir('/tmp')))";
    let probe = "import os, time\nst = os.stat('/tmp')\n\
        fresh = abs(st.st_mtime - time.time()) < 60 and abs(st.st_atime - time.time()) < 60\n\
        print(os.getuid(), os.listdir('/tmp'), oct(st.st_mode & 0o777), fresh)";
    for _ in 0..3 {
        let r = py(&mut c, &p, litter);
        assert_status(&r, "ok");
        let uid = r["stdout"]
            .as_str()
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .to_owned();
        assert!(
            r["stdout"]
                .as_str()
                .unwrap()
                .contains("'.hidden', 'a', 'dirlink', 'link'"),
            "{r}"
        );
        let r = py(&mut c, &p, probe);
        assert_status(&r, "ok");
        assert_eq!(
            r["stdout"],
            format!("{uid} [] 0o700 True\n"),
            "same uid, nothing left"
        );
    }
    // Times set on /tmp itself, with nothing in it to remove: reset too.
    assert_status(
        &py(
            &mut c,
            &p,
            "import os\nos.utime('/tmp', (123456789, 123456789))",
        ),
        "ok",
    );
    let r = py(&mut c, &p, probe);
    assert!(
        r["stdout"].as_str().unwrap().ends_with(" [] 0o700 True\n"),
        "{r}"
    );
    // A chain of directories thousands deep (its path far past PATH_MAX),
    // which a recursive clean-up would choke on: emptied too, and the
    // worker lives on.
    // (A generous timeout: 6,000 calls on a loaded host are no test of speed.)
    let r = run_job(
        &mut c,
        &p,
        json!({"code": "import os\nos.chdir('/tmp')\nfor _ in range(3000):\n    os.mkdir('d'); os.chdir('d')\nprint(len(os.getcwd()) > 4096)",
               "timeout_ms": 30_000}),
    );
    assert_status(&r, "ok");
    assert_eq!(r["stdout"], "True\n");
    let r = py(&mut c, &p, probe);
    assert_status(&r, "ok");
    assert!(
        r["stdout"].as_str().unwrap().ends_with(" [] 0o700 True\n"),
        "{r}"
    );
    // The host side was not touched through the links.
    assert!(std::fs::metadata("/etc/passwd").is_ok());
}

#[test]
fn python_starts_without_site_but_keeps_what_site_gives() {
    let Some(mut c) = redis() else { return };
    let p = prefix("nosite");
    let _w = Worker::start(&p, &["--concurrency", "1"]);
    let r = py(
        &mut c,
        &p,
        "import sys\n\
         print(type(exit).__name__, type(quit).__name__, type(help).__name__, type(license).__name__)\n\
         print(any(d.endswith('dist-packages') for d in sys.path))\n\
         quit(4)",
    );
    assert_status(&r, "error");
    assert_eq!(r["exit_code"], 4);
    assert_eq!(r["stdout"], "Quitter Quitter _Helper _Printer\nTrue\n");
    // The same search path `site` builds on the host, in the same order.
    let host = std::process::Command::new("/usr/bin/python3")
        .args(["-I", "-c", "import sys; print(sys.path)"])
        .env_clear()
        .output()
        .unwrap();
    let r = py(&mut c, &p, "import sys; print(sys.path)");
    assert_eq!(
        r["stdout"].as_str().unwrap(),
        String::from_utf8_lossy(&host.stdout)
    );
}

#[test]
fn status_output_and_usage_are_taken_at_the_exit_call() {
    let Some(mut c) = redis() else { return };
    let p = prefix("exit-call");
    let _w = Worker::start(&p, &["--concurrency", "2"]);
    // The result is made when the job calls exit_group, before the kernel
    // has torn the process down: everything it wrote must be there, with
    // its status and what it used.
    let r = py(
        &mut c,
        &p,
        "import sys, time\n\
         block = bytearray(80 * 1024 * 1024)\n\
         for i in range(0, len(block), 4096): block[i] = 1\n\
         end = time.process_time() + 0.05\n\
         while time.process_time() < end: pass\n\
         sys.stdout.write('x' * 300000)\n\
         sys.stderr.write('bye\\n')\n\
         sys.exit(7)",
    );
    assert_status(&r, "error");
    assert_eq!(r["exit_code"], 7);
    assert_eq!(r["stdout"].as_str().unwrap().len(), 300_000);
    assert_eq!(r["stderr"], "bye\n");
    assert!(r["cpu_ms"].as_u64().unwrap() >= 40, "{}", r["cpu_ms"]);
    assert!(
        r["max_rss_kb"].as_u64().unwrap() >= 80 * 1024,
        "{}",
        r["max_rss_kb"]
    );
    let r = run_job(
        &mut c,
        &p,
        json!({"language": "nodejs", "code": "process.stdout.write('y'.repeat(300000));\nsetTimeout(() => { console.error('late'); process.exitCode = 5; }, 30);"}),
    );
    assert_status(&r, "error");
    assert_eq!(r["exit_code"], 5);
    assert_eq!(r["stdout"].as_str().unwrap().len(), 300_000);
    assert_eq!(r["stderr"], "late\n");
    // The slot and the uid came back: the worker goes on.
    for _ in 0..5 {
        assert_status(&py(&mut c, &p, "print('next')"), "ok");
    }
}

#[test]
fn output_flood_is_capped_and_worker_survives() {
    let Some(mut c) = redis() else { return };
    let p = prefix("flood");
    let _w = Worker::start(&p, &["--concurrency", "2"]);
    let r = py(
        &mut c,
        &p,
        "import sys\nchunk = 'x' * 1024 * 1024\nfor _ in range(20):\n    sys.stdout.write(chunk)",
    );
    assert_status(&r, "output_limit");
    assert_eq!(r["stdout_truncated"], true);
    assert!(r["stdout"].as_str().unwrap().len() <= 1024 * 1024);
    assert!(r["stdout"].as_str().unwrap().len() > 1000);
    assert_status(&py(&mut c, &p, "print('next')"), "ok");
}

#[test]
fn bad_payloads_are_dead_lettered_or_rejected() {
    let Some(mut c) = redis() else { return };
    let p = prefix("bad");
    let _w = Worker::start(&p, &["--concurrency", "2"]);

    push_raw(&mut c, &p, "this is not json");
    push_raw(&mut c, &p, "[1, 2, 3]");
    let cases = [
        (
            json!({"id": "r1", "language": "cobol", "code": "x"}),
            "`language`",
        ),
        (
            json!({"id": "r2", "language": "python3"}),
            "`code` is required",
        ),
        (
            json!({"id": "r3", "language": "python3", "code": "x".repeat(1024 * 1024 + 1)}),
            "more than the limit",
        ),
        (
            json!({"id": "r4", "language": "python3", "code": "print(1)", "timeout_ms": "soon"}),
            "`timeout_ms`",
        ),
        (
            json!({"id": "r5", "language": "python3", "code": "print(1)", "enable_network": true}),
            "does not allow",
        ),
        (
            json!({"id": "r6", "language": "python3", "code": "print(1)", "reply_to": format!("{p}:queue")}),
            "`reply_to`",
        ),
    ];
    for (job, _) in &cases {
        push(&mut c, &p, job);
    }
    for (job, needle) in &cases {
        let id = job["id"].as_str().unwrap();
        let r = result(&mut c, &p, id, Duration::from_secs(10));
        assert_status(&r, "rejected");
        assert!(
            r["error"].as_str().unwrap().contains(needle),
            "{id}: {}",
            r["error"]
        );
    }
    // Dead letters carry the reason and the payload.
    let deadline = Instant::now() + Duration::from_secs(5);
    while llen(&mut c, &format!("{p}:dead")) < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let entries = dead_letters(&mut c, &p);
    assert_eq!(entries.len(), 2, "{entries:?}");
    let text = entries
        .iter()
        .find(|e| e["payload"] == "this is not json")
        .expect("the text payload");
    assert!(text["reason"].as_str().unwrap().contains("not valid JSON"));
    let array = entries
        .iter()
        .find(|e| e["payload"] == "[1, 2, 3]")
        .expect("the array payload");
    assert!(
        array["reason"].as_str().unwrap().contains("an array"),
        "{array}"
    );
    // And the worker still serves.
    assert_status(&py(&mut c, &p, "print('still here')"), "ok");
    assert_eq!(processing_total(&mut c, &p), 0);
}

#[test]
fn two_hundred_jobs_each_answered_once() {
    let Some(mut c) = redis() else { return };
    let p = prefix("burst");
    let _w = Worker::start(&p, &["--concurrency", "2"]);
    let ids: Vec<String> = (0..200).map(|i| format!("b{i}")).collect();
    let mut pipe = redis::pipe();
    for (i, id) in ids.iter().enumerate() {
        let job = json!({"id": id, "language": "python3", "code": format!("print({i} * 2)")});
        pipe.cmd("RPUSH")
            .arg(format!("{p}:queue"))
            .arg(job.to_string())
            .ignore();
    }
    let _: () = pipe.query(&mut c).unwrap();
    for (i, id) in ids.iter().enumerate() {
        let r = result(&mut c, &p, id, Duration::from_secs(120));
        assert_status(&r, "ok");
        assert_eq!(r["id"], id.as_str());
        assert_eq!(r["stdout"], format!("{}\n", i * 2));
        // Exactly once: nothing else arrives on the reply key.
        assert_eq!(llen(&mut c, &format!("{p}:result:{id}")), 0);
    }
    assert_eq!(processing_total(&mut c, &p), 0);
    assert_eq!(llen(&mut c, &format!("{p}:queue")), 0);
}

#[test]
fn run_without_redis() {
    let out = std::process::Command::new(BIN)
        .args(["run", "--language", "python3", "--code", "print(1)"])
        .env("SANDQ_REDIS", "redis://127.0.0.1:1")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1\n");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = std::process::Command::new(BIN)
        .args([
            "run",
            "--language",
            "python3",
            "--code",
            "import sys; sys.exit(7)",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));

    let out = std::process::Command::new(BIN)
        .args([
            "run",
            "--language",
            "python3",
            "--json",
            "--code",
            "print(2)",
        ])
        .output()
        .unwrap();
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["status"], "ok");
    assert_eq!(r["stdout"], "2\n");
}

#[test]
fn submit_pushes_and_waits() {
    let Some(_c) = redis() else { return };
    let p = prefix("submit");
    let _w = Worker::start(&p, &["--concurrency", "1"]);
    let out = std::process::Command::new(BIN)
        .args([
            "submit",
            "--redis",
            &redis_url(),
            "--prefix",
            &p,
            "--language",
            "python3",
            "--code",
            "print(40+2)",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["stdout"], "42\n");
}

#[test]
fn one_result_per_job_id() {
    let Some(mut c) = redis() else { return };
    let p = prefix("idem");
    let _w = Worker::start(&p, &["--concurrency", "1"]);
    let job =
        json!({"id": "same", "language": "python3", "code": "open('/tmp/x', 'w')\nprint('ran')"});
    push(&mut c, &p, &job);
    let first = result(&mut c, &p, "same", Duration::from_secs(10));
    assert_status(&first, "ok");
    // The same id again: not run, no second result, nothing left behind.
    push(&mut c, &p, &job);
    push(
        &mut c,
        &p,
        &json!({"id": "marker", "language": "python3", "code": "print(1)"}),
    );
    assert_status(&result(&mut c, &p, "marker", Duration::from_secs(10)), "ok");
    assert_eq!(
        llen(&mut c, &format!("{p}:result:same")),
        0,
        "no second result"
    );
    assert_eq!(processing_total(&mut c, &p), 0);
    assert_eq!(llen(&mut c, &format!("{p}:queue")), 0);
    // A rejection is not remembered: a corrected job may reuse its id.
    push(&mut c, &p, &json!({"id": "fixme", "language": "python3"}));
    assert_status(
        &result(&mut c, &p, "fixme", Duration::from_secs(10)),
        "rejected",
    );
    push(
        &mut c,
        &p,
        &json!({"id": "fixme", "language": "python3", "code": "print('fixed')"}),
    );
    let r = result(&mut c, &p, "fixme", Duration::from_secs(10));
    assert_status(&r, "ok");
    assert_eq!(r["stdout"], "fixed\n");
    assert_eq!(processing_total(&mut c, &p), 0);
}

#[test]
fn real_code_works_under_the_default_allowlist() {
    let Some(mut c) = redis() else { return };
    let p = prefix("realcode");
    let _w = Worker::start(&p, &["--concurrency", "2"]);
    let cases = [
        (
            "threads",
            "import threading\nout = []\nts = [threading.Thread(target=out.append, args=(i,)) for i in range(8)]\n[t.start() for t in ts]\n[t.join() for t in ts]\nprint(sorted(out))",
            "[0, 1, 2, 3, 4, 5, 6, 7]\n",
        ),
        (
            "asyncio",
            "import asyncio\nasync def f(x):\n    await asyncio.sleep(0.01)\n    return x * 2\nasync def main():\n    return await asyncio.gather(*(f(i) for i in range(3)))\nprint(asyncio.run(main()))",
            "[0, 2, 4]\n",
        ),
        (
            "zoneinfo",
            "from zoneinfo import ZoneInfo\nfrom datetime import datetime\nprint(datetime(2024, 7, 1, 12, tzinfo=ZoneInfo('Europe/Paris')).utcoffset())",
            "2:00:00\n",
        ),
        ("decimal", "from decimal import Decimal\nprint(Decimal('0.1') + Decimal('0.2'))", "0.3\n"),
        (
            "sqlite3",
            "import sqlite3\nc = sqlite3.connect(':memory:')\nc.execute('create table t(x)')\nc.executemany('insert into t values (?)', [(1,), (2,)])\nprint(c.execute('select sum(x) from t').fetchone()[0])",
            "3\n",
        ),
        (
            "numpy",
            "import numpy as np\na = np.arange(9, dtype=float).reshape(3, 3)\nprint(int((a @ a).sum()))",
            "486\n",
        ),
        (
            "concurrent.futures",
            "from concurrent.futures import ThreadPoolExecutor\nwith ThreadPoolExecutor(4) as ex:\n    print(sum(ex.map(lambda x: x * x, range(10))))",
            "285\n",
        ),
        ("files in scratch", "import tempfile, os\nwith tempfile.TemporaryDirectory() as d:\n    open(os.path.join(d, 'a'), 'w').write('x')\n    print(os.listdir(d))", "['a']\n"),
    ];
    for (name, code, want) in cases {
        let r = py(&mut c, &p, code);
        assert_status(&r, "ok");
        assert_eq!(r["stdout"], want, "{name}: {r}");
    }
}

#[test]
fn preload_runs_inside_the_lock_down() {
    let Some(mut c) = redis() else { return };
    let p = prefix("preload");
    let _w = Worker::start(&p, &["--concurrency", "1"]);
    // The preload runs as the job's uid, and its effects reach the code.
    let r = run_job(
        &mut c,
        &p,
        json!({"preload": "import os\nPRELOADED_BY = os.getuid()", "code": "print(PRELOADED_BY != 0)"}),
    );
    assert_status(&r, "ok");
    assert_eq!(r["stdout"], "True\n");
    // A preload that tries what user code may not is stopped the same way
    // (the seed's first security report was a preload that ran unfiltered).
    let r = run_job(
        &mut c,
        &p,
        json!({"preload": "import socket\nsocket.socket()", "code": "print('code ran')"}),
    );
    assert_status(&r, "violation");
    assert_eq!(r["violation"]["syscall"], "socket");
    assert_eq!(r["stdout"], "");
    let r = run_job(
        &mut c,
        &p,
        json!({"preload": "import os\nos.fork()", "code": "print('code ran')"}),
    );
    assert_status(&r, "violation");
    assert_eq!(r["violation"]["syscall"], "clone");
}

#[test]
fn an_interpreter_that_cannot_start_fails_the_job_not_the_worker() {
    let Some(mut c) = redis() else { return };
    // Failing before exec (Landlock cannot find the binary) and at exec (the
    // file is not executable): each is a clear error at once, never a hang,
    // and the worker goes on serving.
    for (binary, step) in [
        ("/nonexistent/node", "Landlock"),
        ("/usr/lib/os-release", "Exec"),
    ] {
        let p = prefix("bad-interpreter");
        let _w = Worker::start(
            &p,
            &["--concurrency", "1", "--pool-size", "0", "--node", binary],
        );
        let started = Instant::now();
        let r = node(&mut c, &p, "console.log(1)");
        assert!(started.elapsed() < Duration::from_secs(5), "{r}");
        assert_status(&r, "internal_error");
        assert!(r["error"].as_str().unwrap().contains(step), "{r}");
        assert_status(&py(&mut c, &p, "print('still here')"), "ok");
    }
}

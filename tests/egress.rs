//! Jobs with network: out only through the worker's relay, only where the
//! operator allows, never to the worker's own Redis.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A one-page HTTP server on 127.0.0.1 for the test's lifetime.
fn http_server(body: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

const FETCH: &str = concat!(
    "import urllib.request, sys\n",
    "try:\n",
    "    print(urllib.request.urlopen(sys.stdin.read(), timeout=5).read().decode())\n",
    "except Exception as e:\n",
    "    print('refused:', e)\n",
);

#[test]
fn network_jobs_reach_only_allowed_destinations() {
    let Some(mut c) = redis() else { return };
    let port = http_server("hello from the allowed host");
    let p = prefix("egress");
    // Loopback is allowed here only so that a test server can stand in for
    // "the internet"; the worker's own Redis stays refused regardless.
    let _w = Worker::start(
        &p,
        &[
            "--concurrency",
            "1",
            "--allow-network",
            "--egress-allow",
            "127.0.0.1/32",
        ],
    );
    let job = |url: String| json!({"language": "python3", "code": FETCH, "stdin": url, "enable_network": true});

    let r = run_job(&mut c, &p, job(format!("http://127.0.0.1:{port}/page")));
    assert_status(&r, "ok");
    assert_eq!(r["stdout"], "hello from the allowed host\n");

    let r = run_job(&mut c, &p, job("http://127.0.0.1:6379/".into()));
    assert_status(&r, "ok");
    assert!(
        r["stdout"]
            .as_str()
            .unwrap()
            .contains("refused: HTTP Error 403"),
        "{r}"
    );

    // A raw socket ignores the proxy and finds nothing: the job's loopback
    // is its own.
    let raw = "import socket\ns = socket.socket()\ntry:\n    s.connect(('127.0.0.1', %PORT%))\n    print('connected')\nexcept OSError as e:\n    print('no route:', e.errno)";
    let r = run_job(
        &mut c,
        &p,
        json!({"language": "python3", "code": raw.replace("%PORT%", &port.to_string()), "enable_network": true}),
    );
    assert_status(&r, "ok");
    assert_eq!(
        r["stdout"], "no route: 111\n",
        "ECONNREFUSED: nothing listens on the job's own loopback"
    );
}

#[test]
fn internal_destinations_are_refused_by_default() {
    let Some(mut c) = redis() else { return };
    let port = http_server("must not be seen");
    let p = prefix("egress-default");
    let _w = Worker::start(&p, &["--concurrency", "1", "--allow-network"]);
    for url in [
        format!("http://127.0.0.1:{port}/"),
        format!("http://localhost:{port}/"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://10.0.0.1/".to_owned(),
    ] {
        let r = run_job(
            &mut c,
            &p,
            json!({"language": "python3", "code": FETCH, "stdin": url, "enable_network": true}),
        );
        assert_status(&r, "ok");
        let out = r["stdout"].as_str().unwrap();
        assert!(out.starts_with("refused: HTTP Error 403"), "{url}: {out}");
    }
    // Without enable_network the job has no proxy and no sockets at all.
    let r = run_job(
        &mut c,
        &p,
        json!({"language": "python3", "code": FETCH, "stdin": format!("http://127.0.0.1:{port}/")}),
    );
    assert_status(&r, "violation");
    assert_eq!(r["violation"]["syscall"], "socket");
}

/// Open fds of a process.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The worker's fd count once it stops moving (the warm pool refills after
/// a job): two equal samples 300 ms apart, or the last one after 10 s.
fn settled_fds(pid: u32) -> usize {
    let start = std::time::Instant::now();
    let mut last = open_fds(pid);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = open_fds(pid);
        if now == last || start.elapsed() > Duration::from_secs(10) {
            return now;
        }
        last = now;
    }
}

/// A worker whose jobs may reach 127.0.0.1 (test servers stand in for the
/// internet), warmed up with a network job that fetches from `web` and a
/// plain one, so that its warm pool holds what it will hold after a test;
/// and the fd count it then settles at.
fn loopback_worker(
    c: &mut redis::Connection,
    p: &str,
    concurrency: &str,
    web: u16,
) -> (Worker, usize) {
    let w = Worker::start(
        p,
        &[
            "--concurrency",
            concurrency,
            "--allow-network",
            "--egress-allow",
            "127.0.0.1/32",
        ],
    );
    let r = run_job(
        c,
        p,
        json!({"language": "python3", "code": FETCH, "stdin": format!("http://127.0.0.1:{web}/"), "enable_network": true}),
    );
    assert_status(&r, "ok");
    assert!(!r["stdout"].as_str().unwrap().starts_with("refused"), "{r}");
    assert_status(&py(c, p, "print(1)"), "ok");
    let baseline = settled_fds(w.child.as_ref().unwrap().id());
    (w, baseline)
}

/// A TCP server on 127.0.0.1 that holds every connection until the peer
/// closes it.
fn holding_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    port
}

/// A network job that holds 100 relay connections at once, then connects and
/// closes thousands of times, then makes one more request. Prints JSON.
const FLOOD: &str = r#"
import json, select, socket, sys, time
cfg = json.loads(sys.stdin.read())
PROXY = ('127.0.0.1', 3128)

def head(s):
    data = b''
    while b'\r\n\r\n' not in data:
        c = s.recv(4096)
        if not c:
            break
        data += c
    return data

out = {}
# 1. 100 at once: the relay takes 64 and answers the rest at once.
socks = [socket.create_connection(PROXY, timeout=10) for _ in range(100)]
p = select.poll()
for s in socks:
    p.register(s, select.POLLIN)
answered = set()
deadline = time.time() + 10
while time.time() < deadline and len(answered) < 36:
    for fd, _ in p.poll(200):
        answered.add(fd)
        p.unregister(fd)
refused = [s for s in socks if s.fileno() in answered]
held = [s for s in socks if s.fileno() not in answered]
answers = [head(s).decode('latin-1') for s in refused]
out['refused'] = len(refused)
out['refused_answers'] = sorted(set(a.split('\r\n')[0] + ' | ' + a.split('\r\n\r\n')[-1].strip() for a in answers))
# The 64 held ones are live: each makes a tunnel to the holding server.
for s in held:
    s.sendall(b'CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n' % cfg['hold'])
out['held'] = len(held)
out['tunnels'] = sum(head(s).startswith(b'HTTP/1.1 200 ') for s in held)
time.sleep(1)
for s in socks:
    s.close()
# 2. Connect and close, thousands of times.
errors = 0
for _ in range(cfg['churn']):
    try:
        socket.create_connection(PROXY, timeout=10).close()
    except OSError:
        errors += 1
out['churn_errors'] = errors
# 3. A later request still works (429 while the relay finishes the churn).
deadline = time.time() + 20
while True:
    s = socket.create_connection(PROXY, timeout=10)
    s.sendall(b'GET http://127.0.0.1:%d/ HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n' % (cfg['web'], cfg['web']))
    data = b''
    while True:
        c = s.recv(4096)
        if not c:
            break
        data += c
    s.close()
    if not data.startswith(b'HTTP/1.1 429') or time.time() > deadline:
        break
    time.sleep(0.05)
out['after'] = data.decode('latin-1').split('\r\n\r\n', 1)
print(json.dumps(out))
"#;

#[test]
fn a_network_job_cannot_exhaust_the_workers_fds() {
    let Some(mut c) = redis() else { return };
    let web = http_server("still served");
    let hold = holding_server();
    let p = prefix("egress-fds");
    let (w, baseline) = loopback_worker(&mut c, &p, "2", web);
    let pid = w.child.as_ref().unwrap().id();

    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        std::thread::spawn(move || {
            let mut max = 0;
            while sampling.load(Ordering::Relaxed) {
                max = max.max(open_fds(pid));
                std::thread::sleep(Duration::from_millis(5));
            }
            max
        })
    };
    let id = format!("j-{:016x}", rand::random::<u64>());
    let cfg = json!({"hold": hold, "web": web, "churn": 3000});
    push(
        &mut c,
        &p,
        &json!({"id": id, "language": "python3", "code": FLOOD, "stdin": cfg.to_string(),
                "enable_network": true, "timeout_ms": 60_000}),
    );
    // Plain jobs on the same worker meanwhile.
    let mut plain = 0;
    let result_key = format!("{p}:result:{id}");
    while llen(&mut c, &result_key) == 0 {
        let r = py(&mut c, &p, "print(6 * 7)");
        assert_status(&r, "ok");
        assert_eq!(r["stdout"], "42\n");
        plain += 1;
    }
    let r = result(&mut c, &p, &id, Duration::from_secs(5));
    sampling.store(false, Ordering::Relaxed);
    let max = sampler.join().unwrap();
    let after = settled_fds(pid);
    eprintln!(
        "worker fds: baseline {baseline}, max during {max}, after {after}; plain jobs meanwhile: {plain}"
    );
    assert_status(&r, "ok");
    let out: Value =
        serde_json::from_str(r["stdout"].as_str().unwrap()).unwrap_or_else(|e| panic!("{e}: {r}"));
    eprintln!("job: {out}");
    // 64 connections cost two fds each; the rest is the plain job's pipes
    // and the pool. Without the cap and the release, the churn alone adds
    // one fd per connection (3000).
    assert!(
        max <= baseline + 2 * 64 + 64,
        "worker fds: {max} at most during the flood, {baseline} before"
    );
    assert!(
        after <= baseline + 2,
        "worker fds: {after} after the flood, {baseline} before"
    );
    assert_eq!(out["held"], 64, "{out}");
    assert_eq!(out["tunnels"], 64, "every held connection is live: {out}");
    assert_eq!(out["refused"], 36, "{out}");
    assert_eq!(
        out["refused_answers"],
        json!(["HTTP/1.1 429 Too Many Requests | sandq egress: this job holds 64 relay connections already; close one first"]),
        "{out}"
    );
    assert_eq!(out["churn_errors"], 0, "{out}");
    assert!(
        out["after"][0]
            .as_str()
            .unwrap()
            .starts_with("HTTP/1.1 200 OK"),
        "a later request works: {out}"
    );
    assert_eq!(out["after"][1], "still served", "{out}");
    assert!(plain >= 1, "no plain job ran alongside");
    assert!(
        w.log().contains("open-files limit"),
        "the worker logs its open-files limit:\n{}",
        w.log()
    );
}

/// Every connection a fake HTTP proxy (or origin server) received, byte for
/// byte. It answers the first head of each connection (`CONNECT`: 200 and
/// then silence; anything else: a small 200 that claims keep-alive, then
/// closes its side) and records everything until the peer closes.
#[derive(Clone, Default)]
struct Recorder {
    conns: Arc<Mutex<Vec<Vec<u8>>>>,
    open: Arc<AtomicUsize>,
}

impl Recorder {
    fn start() -> (Recorder, u16) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let rec = Recorder::default();
        let r = rec.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let (conns, open) = (r.conns.clone(), r.open.clone());
                open.fetch_add(1, Ordering::SeqCst);
                let slot = {
                    let mut all = conns.lock().unwrap();
                    all.push(Vec::new());
                    all.len() - 1
                };
                std::thread::spawn(move || {
                    let mut answered = false;
                    let mut buf = [0u8; 4096];
                    loop {
                        let n = match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let seen = {
                            let mut all = conns.lock().unwrap();
                            all[slot].extend_from_slice(&buf[..n]);
                            all[slot].clone()
                        };
                        if !answered && seen.windows(4).any(|w| w == b"\r\n\r\n") {
                            answered = true;
                            if seen.starts_with(b"CONNECT ") {
                                let _ = s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
                            } else {
                                let _ = s.write_all(
                                    b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\nfrom upstream",
                                );
                                let _ = s.shutdown(std::net::Shutdown::Write);
                            }
                        }
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        (rec, port)
    }

    /// What every connection received, once all of them are closed.
    fn received(&self) -> Vec<String> {
        let start = std::time::Instant::now();
        while self.open.load(Ordering::SeqCst) > 0 && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(self.open.load(Ordering::SeqCst), 0, "connections left open");
        let all = self.conns.lock().unwrap();
        all.iter()
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect()
    }
}

/// A job that speaks raw HTTP to the relay: per case one connection; sends
/// each part (reading one response between parts), then reads to the end
/// (`"eof"`) or only the first head (`"head"`). Prints what came back.
const RAW: &str = r#"
import json, socket, sys

def response(s):
    data = b''
    while b'\r\n\r\n' not in data:
        c = s.recv(65536)
        if not c:
            return data
        data += c
    head, body = data.split(b'\r\n\r\n', 1)
    n = 0
    for line in head.split(b'\r\n')[1:]:
        k, _, v = line.partition(b':')
        if k.strip().lower() == b'content-length':
            n = int(v)
    while len(body) < n:
        c = s.recv(65536)
        if not c:
            break
        body += c
    return head + b'\r\n\r\n' + body

out = []
for case in json.loads(sys.stdin.read()):
    s = socket.create_connection(('127.0.0.1', 3128), timeout=10)
    got = []
    try:
        for i, part in enumerate(case['send']):
            s.sendall(part.encode('latin-1'))
            if case['read'] == 'head' or i + 1 < len(case['send']):
                got.append(response(s) if case['read'] == 'eof' else s.recv(65536))
        if case['read'] == 'eof':
            rest = b''
            while True:
                c = s.recv(65536)
                if not c:
                    break
                rest += c
            got.append(rest)
    except OSError as e:
        got.append(('error: %s' % e).encode())
    s.close()
    out.append([g.decode('latin-1') for g in got])
print(json.dumps(out))
"#;

/// Run `cases` (send parts, read mode) through a network job; returns what
/// came back for each.
fn raw_exchanges(
    c: &mut redis::Connection,
    p: &str,
    cases: &[(Vec<String>, &str)],
) -> Vec<Vec<String>> {
    let input: Vec<Value> = cases
        .iter()
        .map(|(send, read)| json!({"send": send, "read": read}))
        .collect();
    let r = run_job(
        c,
        p,
        json!({"language": "python3", "code": RAW, "stdin": Value::from(input).to_string(),
               "enable_network": true, "timeout_ms": 30_000}),
    );
    assert_status(&r, "ok");
    serde_json::from_str(r["stdout"].as_str().unwrap()).unwrap_or_else(|e| panic!("{e}: {r}"))
}

fn status_line(answer: &str) -> &str {
    answer.split("\r\n").next().unwrap_or("")
}

#[test]
fn the_upstream_proxy_gets_only_checked_requests() {
    let Some(mut c) = redis() else { return };
    let (upstream, port) = Recorder::start();
    let p = prefix("egress-upstream");
    let proxy = format!("127.0.0.1:{port}");
    let _w = Worker::start(
        &p,
        &[
            "--concurrency",
            "1",
            "--allow-network",
            "--egress-proxy",
            &proxy,
        ],
    );
    let get = |target: &str, host: &str| format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let public = "93.184.216.34";
    let mut cases: Vec<(Vec<String>, &str)> = vec![
        // 0: a second request and a CONNECT after a first, on one connection.
        (
            vec![
                get(&format!("http://{public}/first"), public),
                format!("CONNECT 127.0.0.1:6379 HTTP/1.1\r\n\r\n{}", get("http://127.0.0.1:6379/", "127.0.0.1:6379")),
            ],
            "eof",
        ),
        // 1: the same, pipelined in the first write.
        (
            vec![format!(
                "{}CONNECT 127.0.0.1:6379 HTTP/1.1\r\n\r\n",
                get(&format!("http://{public}/pipelined"), public)
            )],
            "eof",
        ),
        // 2: a request hidden after a body.
        (
            vec![format!(
                "POST http://{public}/body HTTP/1.1\r\nHost: {public}\r\nContent-Length: 4\r\n\r\nPING{}",
                get("http://127.0.0.1:6379/", "127.0.0.1:6379")
            )],
            "eof",
        ),
        // 3: a Host header naming another destination: the relay names the
        // target itself, as a proxy must.
        (
            vec![get(&format!("http://{public}/host"), "127.0.0.1:6379")],
            "eof",
        ),
        // 4: an allowed tunnel; its bytes follow the checked CONNECT.
        (
            vec![format!("CONNECT {public}:443 HTTP/1.1\r\nHost: x\r\n\r\nhello")],
            "head",
        ),
    ];
    let allowed = cases.len();
    // Refused: (CONNECT target or absolute URI, expected status).
    let refused: &[(&str, &str)] = &[
        ("u@127.0.0.1:6379", "400"),
        ("127.0.0.1.:6379", "403"),
        ("localhost.:6379", "403"),
        ("127.0.0.1%09:6379", "400"),
        ("2130706433:6379", "400"),
        ("0x7f.1:6379", "400"),
        ("017700000001:6379", "400"),
        ("[::ffff:127.0.0.1]:6379", "403"),
        ("[64:ff9b::7f00:1]:6379", "403"),
        ("[2002:7f00:1::1]:6379", "403"),
        ("[::1]:6379", "403"),
        ("[fe80::1%25eth0]:80", "400"),
        ("169.254.169.254:80", "403"),
        ("127.0.0.1:0", "400"),
        ("exa%00mple.com:443", "400"),
        ("http://u@127.0.0.1:6379/", "400"),
        ("http://127.0.0.1.:6379/", "403"),
        ("http://localhost.:6379/", "403"),
        ("http://127.0.0.1%09:6379/", "400"),
        ("http://[::ffff:7f00:1]:6379/", "403"),
        ("https://127.0.0.1:6379/", "400"),
        ("gopher://127.0.0.1:6379/", "400"),
    ];
    for (target, _) in refused {
        let head = if target.contains("://") {
            format!("GET {target} HTTP/1.1\r\n\r\n")
        } else {
            format!("CONNECT {target} HTTP/1.1\r\n\r\n")
        };
        cases.push((vec![head], "eof"));
    }
    // Heads refused before any destination is considered.
    let other: &[(String, &str)] = &[
        (
            format!(
                "POST http://{public}/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
            "411",
        ),
        (
            format!(
                "POST http://{public}/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 40\r\n\r\n"
            ),
            "400",
        ),
        (get("/", "127.0.0.1:6379"), "400"),
        (
            format!(
                "GET http://{public}/ HTTP/1.1\r\nX: {}\r\n\r\n",
                "a".repeat(20_000)
            ),
            "431",
        ),
    ];
    for (head, _) in other {
        cases.push((vec![head.clone()], "eof"));
    }
    let got = raw_exchanges(&mut c, &p, &cases);
    let received = upstream.received();

    // Allowed: answered, once.
    for (i, path) in [(0, "first"), (1, "pipelined")] {
        assert_eq!(
            got[i][0].split("\r\n").next(),
            Some("HTTP/1.1 200 OK"),
            "{path}: {:?}",
            got[i]
        );
        assert!(
            got[i][0].contains("\r\nConnection: close\r\n"),
            "{:?}",
            got[i]
        );
        assert!(got[i][0].ends_with("from upstream"), "{:?}", got[i]);
        assert!(!got[i][0].contains("keep-alive"), "{:?}", got[i]);
        let rest = got[i].last().unwrap();
        assert!(
            i == 1 || rest.is_empty() || rest.starts_with("error:"),
            "nothing after the first answer: {:?}",
            got[i]
        );
    }
    assert_eq!(got[1].len(), 1, "{:?}", got[1]);
    assert!(got[2][0].starts_with("HTTP/1.1 200 OK"), "{:?}", got[2]);
    assert!(got[3][0].starts_with("HTTP/1.1 200 OK"), "{:?}", got[3]);
    assert_eq!(got[4][0], "HTTP/1.1 200 Connection established\r\n\r\n");
    for (i, (target, status)) in refused.iter().enumerate() {
        let answer = &got[allowed + i][0];
        assert_eq!(
            status_line(answer).get(9..12),
            Some(*status),
            "{target}: {answer:?}"
        );
        assert!(
            answer.contains("\r\n\r\nsandq egress: "),
            "{target}: {answer:?}"
        );
    }
    for (i, (head, status)) in other.iter().enumerate() {
        let answer = &got[allowed + refused.len() + i][0];
        assert_eq!(
            status_line(answer).get(9..12),
            Some(*status),
            "{:.80}: {answer:?}",
            head
        );
    }
    let redis_refusal = &got[allowed
        + refused
            .iter()
            .position(|r| r.0 == "127.0.0.1.:6379")
            .unwrap()][0];
    assert!(
        redis_refusal.ends_with("sandq egress: 127.0.0.1:6379 is not an allowed destination (127.0.0.1:6379 is the worker's own service)\n"),
        "{redis_refusal:?}"
    );

    // The upstream saw the five allowed requests, each alone, each naming
    // the checked address, and nothing else.
    let mut expected = vec![
        format!("GET http://{public}:80/host HTTP/1.1\r\nHost: {public}\r\nConnection: close\r\n\r\n"),
        format!("GET http://{public}:80/first HTTP/1.1\r\nHost: {public}\r\nConnection: close\r\n\r\n"),
        format!("GET http://{public}:80/pipelined HTTP/1.1\r\nHost: {public}\r\nConnection: close\r\n\r\n"),
        format!("POST http://{public}:80/body HTTP/1.1\r\nHost: {public}\r\nContent-Length: 4\r\nConnection: close\r\n\r\nPING"),
        format!("CONNECT {public}:443 HTTP/1.1\r\nHost: {public}:443\r\n\r\nhello"),
    ];
    let mut received = received;
    received.sort();
    expected.sort();
    assert_eq!(received, expected);
}

#[test]
fn direct_mode_relays_one_request_per_connection() {
    let Some(mut c) = redis() else { return };
    let (origin, port) = Recorder::start();
    let (other, other_port) = Recorder::start();
    let p = prefix("egress-direct");
    let _w = Worker::start(
        &p,
        &[
            "--concurrency",
            "1",
            "--allow-network",
            "--egress-allow",
            "127.0.0.1/32",
        ],
    );
    let host = format!("127.0.0.1:{port}");
    let second = format!(
        "GET http://127.0.0.1:{other_port}/second HTTP/1.1\r\nHost: 127.0.0.1:{other_port}\r\n\r\n"
    );
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                format!("GET http://{host}/first HTTP/1.1\r\nHost: {host}\r\n\r\n"),
                second.clone(),
            ],
            "eof",
        ),
        (
            vec![format!(
                "GET http://{host}/pipelined HTTP/1.1\r\nHost: {host}\r\n\r\n{second}"
            )],
            "eof",
        ),
    ];
    let got = raw_exchanges(&mut c, &p, &cases);
    for answer in &got {
        assert!(answer[0].starts_with("HTTP/1.1 200 OK\r\n"), "{answer:?}");
        assert!(
            answer[0].contains("\r\nConnection: close\r\n"),
            "{answer:?}"
        );
        assert!(answer[0].ends_with("from upstream"), "{answer:?}");
    }
    let last = got[0].last().unwrap();
    assert!(
        last.is_empty() || last.starts_with("error:"),
        "{:?}",
        got[0]
    );
    let mut received = origin.received();
    received.sort();
    assert_eq!(
        received,
        vec![
            format!("GET /first HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
            format!("GET /pipelined HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        ]
    );
    assert!(
        other.received().is_empty(),
        "the second request went nowhere"
    );
}

/// Lower a running process's open-files limit (soft and hard).
fn set_nofile(pid: u32, n: u64) {
    let limit = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: prlimit(2) on a process of ours, reading `limit` only; no
    // memory is shared with it.
    let rc = unsafe {
        libc::prlimit(
            pid as i32,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// Opens `n` tunnels at once (more than the worker has fds for), reads what
/// answers come within 3 s, closes them all, then makes one request.
const STARVE: &str = r#"
import json, select, socket, sys, time
cfg = json.loads(sys.stdin.read())
PROXY = ('127.0.0.1', 3128)
socks = []
for _ in range(cfg['n']):
    s = socket.create_connection(PROXY, timeout=5)
    s.sendall(b'CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n' % cfg['hold'])
    socks.append(s)
by_fd = {s.fileno(): s for s in socks}
p = select.poll()
for s in socks:
    p.register(s, select.POLLIN)
answers = {}
deadline = time.time() + 3
while time.time() < deadline and len(answers) < len(socks):
    for fd, _ in p.poll(100):
        p.unregister(fd)
        answers[fd] = by_fd[fd].recv(100).split(b'\r\n')[0].decode()
statuses = {}
for a in answers.values():
    statuses[a] = statuses.get(a, 0) + 1
for s in socks:
    s.close()
deadline = time.time() + 20
while True:
    try:
        s = socket.create_connection(PROXY, timeout=5)
        s.sendall(b'GET http://127.0.0.1:%d/ HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n' % (cfg['web'], cfg['web']))
        data = b''
        while True:
            c = s.recv(4096)
            if not c:
                break
            data += c
        s.close()
    except OSError as e:
        data = str(e).encode()
    if data.startswith(b'HTTP/1.1 200') or time.time() > deadline:
        break
    time.sleep(0.1)
print(json.dumps({'statuses': statuses, 'unanswered': len(socks) - len(answers), 'after': data.decode('latin-1').split('\r\n\r\n')[-1]}))
"#;

#[test]
fn the_relay_outlasts_the_worker_running_out_of_fds() {
    let Some(mut c) = redis() else { return };
    let web = http_server("served again");
    let hold = holding_server();
    let p = prefix("egress-emfile");
    let (w, baseline) = loopback_worker(&mut c, &p, "1", web);
    let pid = w.child.as_ref().unwrap().id();
    // Room for about 15 tunnels (two fds each) on top of what it holds.
    set_nofile(pid, baseline as u64 + 30);
    let cfg = json!({"n": 60, "hold": hold, "web": web});
    let r = run_job(
        &mut c,
        &p,
        json!({"language": "python3", "code": STARVE, "stdin": cfg.to_string(),
               "enable_network": true, "timeout_ms": 60_000}),
    );
    assert_status(&r, "ok");
    let out: Value =
        serde_json::from_str(r["stdout"].as_str().unwrap()).unwrap_or_else(|e| panic!("{e}: {r}"));
    eprintln!("worker fds {baseline}, limit {}: {out}", baseline + 30);
    assert_eq!(out["after"], "served again", "a later request works: {out}");
    assert!(
        w.log().contains("egress relay: accept failed; retrying"),
        "the worker ran out of fds at accept:\n{}",
        w.log()
    );
    assert_status(&py(&mut c, &p, "print(6 * 7)"), "ok");
}

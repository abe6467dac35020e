//! Jobs with network: out only through the worker's relay, only where the
//! operator allows, never to the worker's own Redis.

mod common;
use common::*;
use serde_json::json;
use std::io::{Read, Write};
use std::net::TcpListener;

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

//! `sandq gateway` end to end: real HTTP requests shaped like the ones
//! dify-sandbox's clients send, a real worker behind the queue, the envelopes
//! checked field by field.

mod common;
use base64::Engine;
use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KEY: &str = "test-key-0123456789";

/// A running gateway process, stopped when dropped.
struct Gateway {
    child: Child,
    port: u16,
}

impl Gateway {
    fn start(prefix: &str, args: &[&str]) -> Gateway {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(BIN)
            .args(["gateway", "--listen", &format!("127.0.0.1:{port}")])
            .args([
                "--api-key",
                KEY,
                "--redis",
                &redis_url(),
                "--prefix",
                prefix,
            ])
            .args(args)
            .env("SANDQ_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start sandq gateway");
        let gateway = Gateway { child, port };
        let started = Instant::now();
        loop {
            if let Ok((200, _)) = gateway.try_request("GET", "/health", &[], None) {
                return gateway;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "gateway did not answer /health"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn try_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> std::io::Result<(u16, Value)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(90)))?;
        let mut head =
            format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(b) = body {
            head.push_str(&format!("Content-Length: {}\r\n", b.len()));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes())?;
        if let Some(b) = body {
            s.write_all(b)?;
        }
        read_response(&mut s)
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> (u16, Value) {
        self.try_request(method, path, headers, body).unwrap()
    }

    /// POST /v1/sandbox/run as dify's code executor does it.
    fn run(&self, body: &Value) -> (u16, Value) {
        self.request(
            "POST",
            "/v1/sandbox/run",
            &[("X-Api-Key", KEY), ("Content-Type", "application/json")],
            Some(body.to_string().as_bytes()),
        )
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let started = Instant::now();
        while matches!(self.child.try_wait(), Ok(None)) {
            if started.elapsed() > Duration::from_secs(5) {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.wait();
    }
}

/// Status code and JSON body of an HTTP/1.1 response read to the end.
fn read_response(s: &mut TcpStream) -> std::io::Result<(u16, Value)> {
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("no response: {text:?}"),
        )
    })?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    let value = serde_json::from_str(&body).unwrap_or(Value::String(body));
    Ok((status, value))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

#[track_caller]
fn assert_envelope(got: &(u16, Value), http: u16, code: i64, message: &str) {
    let (status, body) = got;
    assert_eq!(*status, http, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains(message),
        "message {:?} lacks {message:?}",
        body["message"]
    );
    assert_eq!(body["data"], Value::Null, "{body}");
    assert_eq!(body.as_object().unwrap().len(), 3, "{body}");
}

/// The success envelope of a run: `data` has exactly `error` and `stdout`.
#[track_caller]
fn run_data(got: &(u16, Value)) -> (String, String) {
    let (status, body) = got;
    assert_eq!(*status, 200, "{body}");
    assert_eq!(body["code"], 0, "{body}");
    assert_eq!(body["message"], "success");
    let data = body["data"].as_object().expect("data is an object");
    assert_eq!(data.len(), 2, "{body}");
    (
        data["error"].as_str().unwrap().to_owned(),
        data["stdout"].as_str().unwrap().to_owned(),
    )
}

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::STANDARD.encode(v.to_string())
}

/// dify's Python code node: the user's `main`, inputs as base64 JSON, the
/// output JSON between `<<RESULT>>` markers.
fn python_code_node(code: &str, inputs: &Value) -> String {
    format!(
        "{code}\n\nimport json\nfrom base64 import b64decode\n\n# decode and prepare input dict\ninputs_obj = json.loads(b64decode('{}').decode('utf-8'))\n\n# execute main function\noutput_obj = main(**inputs_obj)\n\n# convert output to json and print\noutput_json = json.dumps(output_obj, indent=4)\nresult = f'''<<RESULT>>{{output_json}}<<RESULT>>'''\nprint(result)\n",
        b64(inputs)
    )
}

/// dify's Node.js code node, same contract.
fn node_code_node(code: &str, inputs: &Value) -> String {
    format!(
        "// declare main function\n{code}\n\n// decode and prepare input object\nvar inputs_obj = JSON.parse(Buffer.from('{}', 'base64').toString('utf-8'))\n\n// execute main function\nvar output_obj = main(inputs_obj)\n\n// convert output to json and print\nvar output_json = JSON.stringify(output_obj)\nvar result = `<<RESULT>>${{output_json}}<<RESULT>>`\nconsole.log(result)\n",
        b64(inputs)
    )
}

/// What dify does with `data.stdout`: the JSON between the markers.
fn code_node_output(stdout: &str) -> Value {
    let inner = stdout
        .split("<<RESULT>>")
        .nth(1)
        .unwrap_or_else(|| panic!("no <<RESULT>> in {stdout:?}"));
    serde_json::from_str(inner).unwrap()
}

#[test]
fn runs_answer_with_the_seed_envelope() {
    let Some(_c) = redis() else { return };
    let p = prefix("gwrun");
    let _w = Worker::start(&p, &["--concurrency", "2"]);
    let gw = Gateway::start(&p, &[]);

    // dify sends enable_network: true on every call; it must not break a run.
    let inputs = json!({"arg1": 41, "arg2": "héllo ✓"});
    let code = python_code_node(
        "def main(arg1: int, arg2: str) -> dict:\n    return {\"result\": arg1 + 1, \"echo\": arg2.upper()}",
        &inputs,
    );
    let got = gw
        .run(&json!({"language": "python3", "code": code, "preload": "", "enable_network": true}));
    let (error, stdout) = run_data(&got);
    assert_eq!(error, "");
    assert_eq!(
        code_node_output(&stdout),
        json!({"result": 42, "echo": "HÉLLO ✓"})
    );

    let code = node_code_node(
        "function main({arg1, arg2}) {\n    return {result: arg1 + 1, echo: arg2.toUpperCase()}\n}",
        &inputs,
    );
    let got =
        gw.run(&json!({"language": "nodejs", "code": code, "preload": "", "enable_network": true}));
    let (error, stdout) = run_data(&got);
    assert_eq!(error, "");
    assert_eq!(
        code_node_output(&stdout),
        json!({"result": 42, "echo": "HÉLLO ✓"})
    );

    // A failed run is still code 0: the reason is in data.error, stdout kept.
    let got = gw.run(&json!({"language": "python3", "code": "print('before')\nraise ValueError('boom')", "preload": "", "enable_network": true}));
    let (error, stdout) = run_data(&got);
    assert_eq!(stdout, "before\n");
    assert!(error.contains("ValueError: boom"), "{error}");
    assert!(error.ends_with("error: exited with code 1\n"), "{error}");

    let got = gw.run(&json!({"language": "python3", "code": "import socket\nsocket.socket()", "enable_network": true}));
    let (error, stdout) = run_data(&got);
    assert_eq!(stdout, "");
    assert_eq!(
        error,
        "error: blocked system call: socket(AF_INET, SOCK_STREAM, 0)\n"
    );

    let got = gw.run(
        &json!({"language": "nodejs", "code": "process.stderr.write('warn\\n'); console.log(1)"}),
    );
    assert_eq!(run_data(&got), ("warn\n".into(), "1\n".into()));

    // The preload runs before the code, in the same namespace (dify's jinja2 node uses it).
    let got = gw.run(
        &json!({"language": "python3", "preload": "greeting = 'hi'", "code": "print(greeting)"}),
    );
    assert_eq!(run_data(&got), (String::new(), "hi\n".into()));

    // The worker's own refusal of a job is a bad request.
    let big = format!("# {}\nprint(1)", "x".repeat(1024 * 1024 + 10));
    let got = gw.run(&json!({"language": "python3", "code": big}));
    assert_envelope(&got, 400, -400, "more than the limit");
}

#[test]
fn auth_bad_requests_limits_and_routes() {
    let Some(_c) = redis() else { return };
    let p = prefix("gwreq");
    let gw = Gateway::start(&p, &["--max-body-bytes", "4096"]);
    let run = |headers: &[(&str, &str)], body: &[u8]| {
        gw.request("POST", "/v1/sandbox/run", headers, Some(body))
    };
    let good = br#"{"language":"python3","code":"print(1)"}"#;

    for headers in [
        &[("X-Api-Key", "wrong-key")][..],
        &[("X-Api-Key", "test-key-012345678")][..],
        &[("X-Api-Key", "test-key-01234567890")][..],
        &[][..],
    ] {
        assert_envelope(&run(headers, good), 401, -401, "Unauthorized");
    }
    assert_eq!(
        run(&[("X-Api-Key", "wrong")], good).1,
        json!({"code": -401, "message": "Unauthorized", "data": null})
    );
    let key = [("X-Api-Key", KEY)];
    assert_envelope(&run(&key, b"{not json"), 400, -400, "not the expected JSON");
    assert_envelope(
        &run(&key, br#"{"language":"python3","code":7}"#),
        400,
        -400,
        "not the expected JSON",
    );
    assert_envelope(
        &run(&key, br#"{"language":"ruby","code":"puts 1"}"#),
        400,
        -400,
        "unsupported language",
    );
    assert_envelope(
        &run(&key, br#"{"code":"print(1)"}"#),
        400,
        -400,
        "`language` is required",
    );
    assert_envelope(
        &run(&key, br#"{"language":"python3","code":""}"#),
        400,
        -400,
        "`code` is required",
    );
    let big = format!(r#"{{"language":"python3","code":"{}"}}"#, "x".repeat(5000));
    assert_envelope(
        &run(&key, big.as_bytes()),
        413,
        -400,
        "larger than 4096 bytes",
    );

    // A body sent in chunks is held to the same limit.
    let mut s = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let chunk = "y".repeat(3000);
    let req = format!(
        "POST /v1/sandbox/run HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nbb8\r\n{chunk}\r\nbb8\r\n{chunk}\r\n0\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    assert_envelope(
        &read_response(&mut s).unwrap(),
        413,
        -400,
        "larger than 4096 bytes",
    );

    assert_eq!(gw.request("GET", "/health", &[], None), (200, json!("ok")));
    assert_envelope(
        &gw.request("GET", "/v1/nothing", &key, None),
        404,
        -404,
        "Not found",
    );
    let got = gw.request("GET", "/v1/sandbox/run", &key, None);
    assert_eq!(got.0, 405);

    // Dependencies: the same key, the seed's shape.
    assert_envelope(
        &gw.request(
            "GET",
            "/v1/sandbox/dependencies?language=python3",
            &[],
            None,
        ),
        401,
        -401,
        "Unauthorized",
    );
    assert_envelope(
        &gw.request("GET", "/v1/sandbox/dependencies", &key, None),
        400,
        -400,
        "`language` is required",
    );
    assert_envelope(
        &gw.request("GET", "/v1/sandbox/dependencies?language=go", &key, None),
        400,
        -400,
        "unsupported language",
    );
    let (status, body) = gw.request(
        "GET",
        "/v1/sandbox/dependencies?language=nodejs",
        &key,
        None,
    );
    assert_eq!(
        (status, body),
        (
            200,
            json!({"code": 0, "message": "success", "data": {"dependencies": []}})
        )
    );
    let (status, body) = gw.request(
        "GET",
        "/v1/sandbox/dependencies?language=python3",
        &key,
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(
        (body["code"].clone(), body["message"].clone()),
        (json!(0), json!("success"))
    );
    let deps = body["data"]["dependencies"].as_array().unwrap();
    for d in deps {
        assert_eq!(d.as_object().unwrap().len(), 2, "{d}");
        assert!(!d["name"].as_str().unwrap().is_empty());
        assert!(d["version"].is_string());
    }
    // Whatever Debian's python3 has installed is listed, e.g. numpy.
    let has_numpy = std::fs::read_dir("/usr/lib/python3/dist-packages")
        .map(|d| {
            d.flatten().any(|e| {
                let n = e.file_name().to_string_lossy().to_lowercase();
                n.starts_with("numpy-") && (n.ends_with(".egg-info") || n.ends_with(".dist-info"))
            })
        })
        .unwrap_or(false);
    if has_numpy {
        assert!(deps.iter().any(|d| d["name"] == "numpy"), "{deps:?}");
    }
}

#[test]
fn dependencies_come_from_package_metadata() {
    let Some(_c) = redis() else { return };
    let p = prefix("gwdeps");
    let dir = std::env::temp_dir().join(format!("sandq-gwdeps-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("numpy-1.24.2.dist-info")).unwrap();
    std::fs::write(
        dir.join("numpy-1.24.2.dist-info/METADATA"),
        "Metadata-Version: 2.1\nName: numpy\nVersion: 1.24.2\nSummary: x\n\nlong text\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("requests-2.28.1.egg-info")).unwrap();
    std::fs::write(
        dir.join("requests-2.28.1.egg-info/PKG-INFO"),
        "Metadata-Version: 1.2\nName: requests\nVersion: 2.28.1\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("six-1.16.0.egg-info"),
        "Name: six\nVersion: 1.16.0\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("numpy")).unwrap();
    let gw = Gateway::start(&p, &["--python-packages", dir.to_str().unwrap()]);
    let (status, body) = gw.request(
        "GET",
        "/v1/sandbox/dependencies?language=python3",
        &[("X-Api-Key", KEY)],
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"code": 0, "message": "success", "data": {"dependencies": [
            {"name": "numpy", "version": "1.24.2"},
            {"name": "requests", "version": "2.28.1"},
            {"name": "six", "version": "1.16.0"},
        ]}})
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn full_queue_is_503_and_no_worker_is_a_bounded_500() {
    let Some(mut c) = redis() else { return };
    let p = prefix("gwfull");
    let job =
        json!({"language": "python3", "code": "print(1)", "preload": "", "enable_network": true});

    let closed = Gateway::start(&p, &["--max-queue", "0"]);
    let got = closed.run(&job);
    assert_eq!(
        got,
        (
            503,
            json!({"code": -503, "message": "Too many requests", "data": null})
        )
    );
    assert_eq!(llen(&mut c, &format!("{p}:queue")), 0, "nothing was pushed");
    drop(closed);

    // No worker: the queue fills up to --max-queue, then requests are refused.
    for i in 0..2 {
        push(
            &mut c,
            &p,
            &json!({"id": format!("filler-{i}"), "language": "python3", "code": ""}),
        );
    }
    let gw = Gateway::start(
        &p,
        &[
            "--max-queue",
            "3",
            "--timeout-ms",
            "200",
            "--wait-margin-ms",
            "800",
        ],
    );
    let started = Instant::now();
    let got = gw.run(&job);
    let took = started.elapsed();
    assert_envelope(&got, 500, -500, "no result within 1000 ms");
    assert!(got.1["message"].as_str().unwrap().contains(&p));
    assert!(took < Duration::from_secs(5), "waited {took:?}");
    // Its job stays queued (it expires unrun), so the queue is now full.
    assert_eq!(llen(&mut c, &format!("{p}:queue")), 3);
    let queued: Vec<String> = redis::cmd("LRANGE")
        .arg(format!("{p}:queue"))
        .arg(2)
        .arg(2)
        .query(&mut c)
        .unwrap();
    let queued: Value = serde_json::from_str(&queued[0]).unwrap();
    assert_eq!(
        queued["enable_network"], false,
        "network is not passed on by default"
    );
    assert_eq!(queued["timeout_ms"], 200);
    assert!(queued["expires_at_ms"].as_u64().unwrap() > queued["enqueued_at_ms"].as_u64().unwrap());
    assert_envelope(&gw.run(&job), 503, -503, "Too many requests");
    drop(gw);
    delete_prefix(&p);
}

#[test]
fn slow_clients_are_cut_off() {
    let Some(_c) = redis() else { return };
    let p = prefix("gwslow");
    let gw = Gateway::start(&p, &["--read-timeout-ms", "300"]);

    // Headers that never finish: the connection is closed.
    let mut s = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"POST /v1/sandbox/run HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "held for {:?}",
        started.elapsed()
    );
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));

    // A body that never finishes: 408 with the envelope.
    let mut s = TcpStream::connect(("127.0.0.1", gw.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(
        format!("POST /v1/sandbox/run HTTP/1.1\r\nHost: x\r\nX-Api-Key: {KEY}\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{{\"lang")
            .as_bytes(),
    )
    .unwrap();
    assert_envelope(
        &read_response(&mut s).unwrap(),
        408,
        -400,
        "not received within 300 ms",
    );

    // The gateway still serves others.
    assert_eq!(gw.request("GET", "/health", &[], None).0, 200);
}

#[test]
fn refuses_to_start_without_an_api_key() {
    let out = Command::new(BIN)
        .args(["gateway", "--listen", "127.0.0.1:0"])
        .env_remove("SANDQ_API_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("API key"), "{stderr}");
    let out = Command::new(BIN)
        .args(["gateway", "--listen", "127.0.0.1:0", "--api-key", ""])
        .env_remove("SANDQ_API_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

//! Operations: what `/metrics`, `/healthz` and `/readyz` expose on a real
//! worker, and that the dashboard, the alert rules and the deployment files
//! agree with it.

mod common;
use common::*;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn root() -> &'static Path {
    Path::new(ROOT)
}

// ---------------------------------------------------------------------------
// HTTP and the text exposition
// ---------------------------------------------------------------------------

/// A plain HTTP/1.0 GET to 127.0.0.1: (status code, body).
fn get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Error, ErrorKind};
    let addr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
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

/// GET, waiting up to 10 s for the endpoint to start listening.
fn get_when_up(port: u16, path: &str) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match get(port, path) {
            Ok(r) => return r,
            Err(e) if Instant::now() > deadline => panic!("GET {path} on port {port}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// One scrape of `/metrics`, parsed.
struct Scrape {
    text: String,
    samples: Vec<Sample>,
    /// Metric family name -> type, from the `# TYPE` lines.
    types: BTreeMap<String, String>,
}

fn bad(line: &str) -> ! {
    panic!("unparsable sample line: {line:?}")
}

fn parse_sample(line: &str) -> Sample {
    let name_end = line.find(['{', ' ']).unwrap_or_else(|| bad(line));
    let name = line[..name_end].to_owned();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices();
        loop {
            // label name
            let mut key = String::new();
            let mut closed = false;
            for (_, ch) in chars.by_ref() {
                match ch {
                    '=' => break,
                    '}' => {
                        closed = true;
                        break;
                    }
                    ',' | ' ' => {}
                    _ => key.push(ch),
                }
            }
            if closed {
                break;
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                bad(line);
            }
            let mut val = String::new();
            while let Some((_, ch)) = chars.next() {
                match ch {
                    '"' => break,
                    '\\' => match chars.next().map(|(_, c)| c) {
                        Some('n') => val.push('\n'),
                        Some(c) => val.push(c),
                        None => bad(line),
                    },
                    _ => val.push(ch),
                }
            }
            labels.insert(key, val);
        }
        let consumed = chars.next().map(|(i, _)| i).unwrap_or(inner.len());
        rest = &inner[consumed..];
        // `chars` stopped just after '}' (or at the end).
        rest = rest.trim_start_matches('}');
    }
    let value = rest
        .split_whitespace()
        .next()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| bad(line));
    Sample {
        name,
        labels,
        value,
    }
}

impl Scrape {
    fn parse(text: String) -> Scrape {
        let mut samples = Vec::new();
        let mut types = BTreeMap::new();
        for line in text.lines() {
            if let Some(t) = line.strip_prefix("# TYPE ") {
                let mut it = t.split_whitespace();
                if let (Some(n), Some(ty)) = (it.next(), it.next()) {
                    types.insert(n.to_owned(), ty.to_owned());
                }
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                samples.push(parse_sample(line));
            }
        }
        Scrape {
            text,
            samples,
            types,
        }
    }

    /// The sample with exactly these labels.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// As `get`; a series not exported yet counts as 0.
    fn val(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// Sum over every series of `name`.
    fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }
}

fn scrape(port: u16) -> Scrape {
    let (status, body) = get_when_up(port, "/metrics");
    assert_eq!(status, 200, "/metrics: {body}");
    Scrape::parse(body)
}

// ---------------------------------------------------------------------------
// promtool
// ---------------------------------------------------------------------------

/// Run promtool; None (skip) where it is not installed, except in CI.
fn promtool(args: &[&str], stdin: Option<&str>) -> Option<Output> {
    let spawned = Command::new("promtool")
        .args(args)
        .current_dir(root())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true and promtool cannot be run: {e}")
        }
        Err(e) => {
            eprintln!("skipping the promtool check: {e}");
            return None;
        }
    };
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(text.as_bytes()).expect("write to promtool");
    }
    Some(child.wait_with_output().expect("promtool finishes"))
}

#[track_caller]
fn assert_promtool_ok(what: &str, out: &Output, input: &str) {
    assert!(
        out.status.success(),
        "promtool rejects {what} ({}):\nstdout:\n{}\nstderr:\n{}\ninput:\n{input}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}

// ---------------------------------------------------------------------------
// 1 + 2: every status through a real worker; the exposition passes promtool
// ---------------------------------------------------------------------------

const RAN: [&str; 6] = [
    "ok",
    "error",
    "timeout",
    "memory_limit",
    "output_limit",
    "violation",
];
const STATUSES: [&str; 8] = [
    "ok",
    "error",
    "timeout",
    "memory_limit",
    "output_limit",
    "violation",
    "rejected",
    "internal_error",
];

#[test]
fn every_status_moves_exactly_its_counters() {
    let Some(mut c) = redis() else { return };
    let p = prefix("metrics-statuses");
    let (w, port) = Worker::start_with_metrics(
        &p,
        &["--concurrency", "4", "--output-limit-bytes", "100000"],
    );
    let before = scrape(port);

    let jobs = [
        ("ok", json!({"language": "python3", "code": "print(6*7)"})),
        (
            "error",
            json!({"language": "python3", "code": "raise SystemExit(3)"}),
        ),
        (
            "timeout",
            json!({"language": "python3", "code": "while True: pass", "timeout_ms": 500}),
        ),
        (
            "memory_limit",
            json!({"language": "python3", "code": "b = bytearray(1024**3)", "memory_mb": 64}),
        ),
        (
            "output_limit",
            json!({"language": "python3", "code": "print('x' * 2_000_000)"}),
        ),
        (
            "violation",
            json!({"language": "python3", "code": "import socket; socket.socket()"}),
        ),
        ("rejected", json!({"language": "cobol", "code": "x"})),
    ];
    let mut ids = Vec::new();
    for (status, job) in &jobs {
        let mut job = job.clone();
        let id = format!("m-{status}-{:08x}", rand::random::<u32>());
        job["id"] = json!(id);
        push(&mut c, &p, &job);
        ids.push((*status, id));
    }
    push_raw(&mut c, &p, "this is not a job {");
    for (status, id) in &ids {
        let r = result(&mut c, &p, id, Duration::from_secs(30));
        assert_status(&r, status);
    }
    // The dead letter has no result to wait for: poll the counter.
    let deadline = Instant::now() + Duration::from_secs(10);
    let after = loop {
        let s = scrape(port);
        let moved = s.val("sandq_dead_letters_total", &[("reason", "unreadable")])
            > before.val("sandq_dead_letters_total", &[("reason", "unreadable")]);
        if moved || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let delta =
        |name: &str, labels: &[(&str, &str)]| after.val(name, labels) - before.val(name, labels);

    // Jobs by language and status: exactly one each where a job went, zero
    // elsewhere. A job refused because its language is not one the worker
    // knows is counted under language="unknown".
    for language in ["python3", "nodejs", "unknown"] {
        for status in STATUSES {
            let want = match (language, status) {
                ("python3", s) if RAN.contains(&s) => 1.0,
                ("unknown", "rejected") => 1.0,
                _ => 0.0,
            };
            let got = delta(
                "sandq_jobs_total",
                &[("language", language), ("status", status)],
            );
            assert_eq!(
                got, want,
                "sandq_jobs_total{{language={language:?},status={status:?}}} moved by {got}"
            );
        }
    }
    assert_eq!(
        after.sum("sandq_jobs_total") - before.sum("sandq_jobs_total"),
        jobs.len() as f64,
        "no other sandq_jobs_total series moved"
    );

    assert_eq!(
        delta(
            "sandq_syscall_violations_total",
            &[("language", "python3"), ("syscall", "socket")]
        ),
        1.0
    );
    assert_eq!(
        after.sum("sandq_syscall_violations_total") - before.sum("sandq_syscall_violations_total"),
        1.0
    );
    assert_eq!(
        delta("sandq_output_truncated_total", &[("stream", "stdout")]),
        1.0
    );
    assert_eq!(
        delta("sandq_output_truncated_total", &[("stream", "stderr")]),
        0.0
    );
    // Every job that ran is observed once in each per-run histogram.
    let ran = RAN.len() as f64;
    for h in [
        "sandq_job_duration_seconds",
        "sandq_spawn_duration_seconds",
        "sandq_job_cpu_seconds",
        "sandq_job_max_rss_bytes",
    ] {
        assert_eq!(after.types.get(h).map(String::as_str), Some("histogram"));
        assert_eq!(
            delta(&format!("{h}_count"), &[("language", "python3")]),
            ran,
            "{h}_count{{language=\"python3\"}}"
        );
        assert_eq!(
            delta(&format!("{h}_count"), &[("language", "nodejs")]),
            0.0,
            "{h}_count{{language=\"nodejs\"}}"
        );
        let inf = after.val(
            &format!("{h}_bucket"),
            &[("language", "python3"), ("le", "+Inf")],
        );
        assert_eq!(
            inf,
            after.val(&format!("{h}_count"), &[("language", "python3")]),
            "{h}: +Inf bucket equals _count"
        );
    }
    // The timeout alone ran for at least its 500 ms.
    assert!(
        delta("sandq_job_duration_seconds_sum", &[("language", "python3")]) >= 0.5,
        "duration sum: {}",
        delta("sandq_job_duration_seconds_sum", &[("language", "python3")])
    );
    assert_eq!(
        delta("sandq_dead_letters_total", &[("reason", "unreadable")]),
        1.0
    );
    assert_eq!(
        after.sum("sandq_dead_letters_total") - before.sum("sandq_dead_letters_total"),
        1.0
    );
    assert_eq!(after.val("sandq_jobs_in_flight", &[]), 0.0);

    // Gauges.
    assert_eq!(after.get("sandq_concurrency_slots", &[]), Some(4.0));
    assert_eq!(
        after.get("sandq_isolation_layer_active", &[("layer", "seccomp")]),
        Some(1.0)
    );
    assert_eq!(
        after.get(
            "sandq_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    assert!(after
        .get("sandq_queue_depth", &[("list", "queue")])
        .is_some());
    let rss = after
        .get("process_resident_memory_bytes", &[])
        .expect("process_resident_memory_bytes");
    assert!(rss > 1e6, "resident memory {rss}");
    for (name, ty) in &after.types {
        if name.starts_with("sandq_") && name.ends_with("_total") {
            assert_eq!(ty, "counter", "{name}");
        }
    }

    // 2: the exposition is valid for Prometheus.
    if let Some(out) = promtool(&["check", "metrics"], Some(&after.text)) {
        assert_promtool_ok("the /metrics exposition", &out, &after.text);
    }
    drop(w);
}

#[test]
fn alert_rules_pass_promtool() {
    if let Some(out) = promtool(&["check", "rules", "dashboards/alerts.yml"], None) {
        assert_promtool_ok("dashboards/alerts.yml", &out, "");
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("SUCCESS"), "{said}");
    }
}

// ---------------------------------------------------------------------------
// 3: the dashboard and the alerts only use metrics a worker exports
// ---------------------------------------------------------------------------

/// Metric names in a PromQL expression: identifiers starting with `sandq_` or
/// `process_`, or `up`, outside string literals and `$variables`.
fn metric_names(expr: &str, into: &mut BTreeSet<String>) {
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let ch = chars[i];
        if ch == '"' || ch == '\'' || ch == '`' {
            i += 1;
            while i < chars.len() && chars[i] != ch {
                if chars[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else if ch.is_ascii_alphanumeric() || ch == '_' || ch == ':' || ch == '$' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | ':' | '$'))
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if word.starts_with("sandq_") || word.starts_with("process_") || word == "up" {
                into.insert(word);
            }
        } else {
            i += 1;
        }
    }
}

/// Every string under a key named one of `keys`, anywhere in `v`.
fn strings_under(v: &Value, keys: &[&str], into: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match x {
                    Value::String(s) if keys.contains(&k.as_str()) => into.push(s.clone()),
                    _ => strings_under(x, keys, into),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| strings_under(x, keys, into)),
        _ => {}
    }
}

fn yaml_file(rel: &str) -> serde_norway::Value {
    let text = std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{rel} is not YAML: {e}"))
}

#[test]
fn dashboard_and_alerts_use_only_exported_metrics() {
    let text = std::fs::read_to_string(root().join("dashboards/sandq.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("dashboards/sandq.json is JSON");
    let mut exprs = Vec::new();
    strings_under(&dashboard, &["expr"], &mut exprs);
    // Template variables query Prometheus too (label_values(...)).
    strings_under(&dashboard["templating"], &["query"], &mut exprs);
    assert!(exprs.len() > 10, "only {} queries found", exprs.len());
    let mut from_dashboard = BTreeSet::new();
    for e in &exprs {
        metric_names(e, &mut from_dashboard);
    }

    let alerts = yaml_file("dashboards/alerts.yml");
    let mut from_alerts = BTreeSet::new();
    let groups = alerts["groups"].as_sequence().expect("groups");
    for g in groups {
        for rule in g["rules"].as_sequence().expect("rules") {
            let expr = rule["expr"].as_str().expect("every rule has an expr");
            metric_names(expr, &mut from_alerts);
        }
    }
    assert!(
        from_dashboard.contains("sandq_jobs_total"),
        "{from_dashboard:?}"
    );
    assert!(from_alerts.contains("sandq_jobs_total"), "{from_alerts:?}");

    let Some(mut c) = redis() else { return };
    let p = prefix("metrics-dashboard");
    let (_w, port) = Worker::start_with_metrics(&p, &["--concurrency", "1"]);
    let check = |live: &Scrape, exempt: &[&str]| {
        let exported = |name: &str| -> bool {
            live.types.contains_key(name)
                || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                    name.strip_suffix(suffix)
                        .and_then(|base| live.types.get(base))
                        .is_some_and(|ty| ty == "histogram" || ty == "summary")
                })
        };
        let mut missing = Vec::new();
        for (source, names) in [
            ("dashboards/sandq.json", &from_dashboard),
            ("dashboards/alerts.yml", &from_alerts),
        ] {
            for name in names {
                // `up` is made by Prometheus for every target, never exported.
                if name != "up" && !exempt.contains(&name.as_str()) && !exported(name) {
                    missing.push(format!("{source}: {name}"));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "used but not exported by a worker: {missing:#?}\nexported: {:?}",
            live.types.keys().collect::<Vec<_>>()
        );
    };
    // A fresh worker exports every family with a bounded label set, so that
    // rate() and increase() see the first event. Two families have an
    // open-ended label and appear with their first event: the blocked
    // syscall's name, and the failed Redis operation (which the readiness
    // test below sees appear).
    let open_ended = ["sandq_syscall_violations_total", "sandq_redis_errors_total"];
    let fresh = scrape(port);
    check(&fresh, &open_ended);
    if let Some(out) = promtool(&["check", "metrics"], Some(&fresh.text)) {
        assert_promtool_ok("a fresh worker's /metrics", &out, &fresh.text);
    }
    assert_status(
        &py(&mut c, &p, "import socket; socket.socket()"),
        "violation",
    );
    check(&scrape(port), &["sandq_redis_errors_total"]);
}

// ---------------------------------------------------------------------------
// 4: docker-compose.yml and the Kubernetes manifests
// ---------------------------------------------------------------------------

/// The strings of a Compose `command` (list or string form).
fn words(v: &serde_norway::Value) -> Vec<String> {
    match v {
        serde_norway::Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
        serde_norway::Value::Sequence(seq) => seq
            .iter()
            .map(|x| match x {
                serde_norway::Value::String(s) => s.clone(),
                other => serde_norway::to_string(other).unwrap().trim().to_owned(),
            })
            .collect(),
        _ => Vec::new(),
    }
}

#[test]
fn compose_file_is_consistent() {
    let compose = yaml_file("docker-compose.yml");
    let services = compose["services"].as_mapping().expect("services");
    for s in ["redis", "worker", "prometheus", "grafana"] {
        assert!(services.contains_key(s), "service {s} missing");
    }
    let named_volumes = compose["volumes"].as_mapping().cloned().unwrap_or_default();
    let mut mounts: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (name, svc) in services {
        let name = name.as_str().expect("service name").to_owned();
        for v in svc["volumes"].as_sequence().into_iter().flatten() {
            let (src, dst) = match v {
                serde_norway::Value::String(s) => {
                    let mut parts = s.splitn(3, ':');
                    let src = parts.next().unwrap_or_default().to_owned();
                    let dst = parts
                        .next()
                        .unwrap_or_else(|| panic!("{name}: volume {s:?}"));
                    (src, dst.to_owned())
                }
                long => (
                    long["source"].as_str().expect("volume source").to_owned(),
                    long["target"].as_str().expect("volume target").to_owned(),
                ),
            };
            if src.starts_with("./") || src.starts_with("../") {
                assert!(
                    root().join(&src).exists(),
                    "{name}: bind-mounted {src} does not exist in the repository"
                );
            } else if !src.starts_with('/') {
                assert!(
                    named_volumes.contains_key(src.as_str()),
                    "{name}: volume {src} is not declared under top-level volumes"
                );
            }
            mounts.entry(name.clone()).or_default().push((src, dst));
        }
        if let Some(build) = svc.get("build") {
            let ctx = build
                .as_str()
                .or_else(|| build["context"].as_str())
                .expect("build context");
            assert!(
                root().join(ctx).join("Dockerfile").exists(),
                "{name}: no Dockerfile in {ctx}"
            );
        }
    }

    // The worker runs `worker`, serves metrics on the port Prometheus scrapes.
    let cmd = words(&compose["services"]["worker"]["command"]);
    assert_eq!(cmd.first().map(String::as_str), Some("worker"), "{cmd:?}");
    let metrics_addr = cmd
        .iter()
        .position(|w| w == "--metrics-addr")
        .and_then(|i| cmd.get(i + 1))
        .expect("the worker serves /metrics");
    let port = metrics_addr.rsplit(':').next().unwrap();
    let prometheus = yaml_file("dashboards/prometheus.yml");
    let scrape = prometheus["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|s| s["job_name"] == "sandq")
        .expect("a sandq scrape job");
    let sd = &scrape["dns_sd_configs"][0];
    assert_eq!(
        sd["port"].as_u64().map(|p| p.to_string()).as_deref(),
        Some(port)
    );
    assert!(
        words(&sd["names"]).iter().any(|n| n == "worker"),
        "scrapes the worker service: {:?}",
        sd["names"]
    );

    // Prometheus reads its config and rules from files that are mounted.
    let prom_targets: Vec<&str> = mounts["prometheus"]
        .iter()
        .map(|(_, d)| d.as_str())
        .collect();
    let config = words(&compose["services"]["prometheus"]["command"])
        .into_iter()
        .find_map(|w| w.strip_prefix("--config.file=").map(str::to_owned))
        .expect("--config.file");
    assert!(
        prom_targets.contains(&config.as_str()),
        "{config} is not mounted"
    );
    for rules in prometheus["rule_files"].as_sequence().expect("rule_files") {
        let rules = rules.as_str().unwrap();
        assert!(prom_targets.contains(&rules), "{rules} is not mounted");
    }
}

/// Every document of every manifest, with the file it came from.
fn kubernetes_documents() -> Vec<(String, serde_norway::Value)> {
    let dir = root().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {dir:?}");
    let mut docs = Vec::new();
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&f).unwrap();
        let mut n = 0;
        for de in serde_norway::Deserializer::from_str(&text) {
            let doc = serde_norway::Value::deserialize(de)
                .unwrap_or_else(|e| panic!("{name} is not YAML: {e}"));
            if doc.is_null() {
                continue;
            }
            for key in ["kind", "apiVersion"] {
                assert!(
                    doc[key].as_str().is_some_and(|s| !s.is_empty()),
                    "{name}: a document without {key}"
                );
            }
            assert!(
                doc["metadata"]["name"].as_str().is_some(),
                "{name}: a document without metadata.name"
            );
            docs.push((name.clone(), doc));
            n += 1;
        }
        assert!(n > 0, "{name} holds no document");
    }
    docs
}

#[test]
fn kubernetes_manifests_are_consistent() {
    let docs = kubernetes_documents();
    let find = |kind: &str, pred: &dyn Fn(&serde_norway::Value) -> bool| {
        docs.iter()
            .map(|(_, d)| d)
            .find(|d| d["kind"] == kind && pred(d))
            .unwrap_or_else(|| panic!("no {kind}"))
    };
    let deployment = find("Deployment", &|d| {
        d["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| words(&c["args"]).first().is_some_and(|a| a == "worker"))
            })
    });
    let pod = &deployment["spec"]["template"]["spec"];
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(grace >= 30, "terminationGracePeriodSeconds {grace}");
    let worker = pod["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| words(&c["args"]).first().is_some_and(|a| a == "worker"))
        .unwrap();
    let args = words(&worker["args"]);
    let arg = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
    };
    // The worker's own drain ends before the kubelet's SIGKILL.
    if let Some(ms) = arg("--shutdown-grace-ms") {
        let ms: u64 = ms.parse().unwrap();
        assert!(
            ms < grace * 1000,
            "--shutdown-grace-ms {ms} vs grace {grace} s"
        );
    }
    let metrics_port: u64 = arg("--metrics-addr")
        .expect("--metrics-addr")
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let port_of = |probe: &serde_norway::Value| -> u64 {
        let port = &probe["httpGet"]["port"];
        port.as_u64().unwrap_or_else(|| {
            let name = port.as_str().expect("probe port");
            worker["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .and_then(|p| p["containerPort"].as_u64())
                .unwrap_or_else(|| panic!("no container port named {name}"))
        })
    };
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let pr = &worker[probe];
        assert_eq!(pr["httpGet"]["path"].as_str(), Some(path), "{probe}");
        assert_eq!(port_of(pr), metrics_port, "{probe} port");
    }

    let scaled = find("ScaledObject", &|_| true);
    assert_eq!(
        scaled["spec"]["scaleTargetRef"]["name"], deployment["metadata"]["name"],
        "the ScaledObject scales the worker Deployment"
    );
    let triggers = scaled["spec"]["triggers"].as_sequence().expect("triggers");
    assert!(
        triggers
            .iter()
            .any(|t| t["type"] == "redis" && t["metadata"]["listName"] == "sandq:queue"),
        "a redis trigger on the list sandq:queue: {triggers:?}"
    );
}

// ---------------------------------------------------------------------------
// 5: /readyz follows Redis
// ---------------------------------------------------------------------------

/// A private redis-server, SIGKILLed when dropped.
struct RedisServer(Child);

impl RedisServer {
    fn start(port: u16) -> Option<RedisServer> {
        let spawned = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("CI=true and redis-server cannot be run: {e}")
            }
            Err(e) => {
                eprintln!("skipping: redis-server cannot be run: {e}");
                return None;
            }
        };
        let server = RedisServer(child);
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pong = client
                .get_connection_with_timeout(Duration::from_millis(200))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if pong.is_ok() {
                return Some(server);
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on {port} did not answer"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Poll /readyz until it answers `want`, checking /healthz stays 200; returns
/// how long that took and the last body.
fn readyz_until(port: u16, want: u16, limit: Duration) -> (Duration, String) {
    let start = Instant::now();
    loop {
        let (health, body) = get(port, "/healthz").expect("/healthz answers");
        assert_eq!(health, 200, "/healthz: {body}");
        let (status, body) = get(port, "/readyz").expect("/readyz answers");
        if status == want {
            return (start.elapsed(), body);
        }
        assert!(
            start.elapsed() < limit,
            "/readyz still {status} after {:?} (want {want}): {body}",
            start.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn readyz_follows_redis_and_healthz_stays_up() {
    let redis_port = free_port();
    let Some(server) = RedisServer::start(redis_port) else {
        return;
    };
    let mut server = Some(server);
    let url = format!("redis://127.0.0.1:{redis_port}");
    let (w, port) =
        Worker::start_with_metrics_on(&url, &prefix("metrics-readyz"), &["--concurrency", "1"]);

    get_when_up(port, "/healthz");
    let (took, body) = readyz_until(port, 200, Duration::from_secs(5));
    let ready: Value = serde_json::from_str(&body).expect("/readyz is JSON");
    assert_eq!(ready["ready"], true, "{body}");
    eprintln!("ready {took:?} after start-up");
    assert_eq!(scrape(port).get("sandq_worker_ready", &[]), Some(1.0));

    drop(server.take());
    let (down, body) = readyz_until(port, 503, Duration::from_secs(5));
    eprintln!("/readyz 503 {down:?} after Redis went away");
    let why: Value = serde_json::from_str(&body).expect("/readyz is JSON");
    assert_eq!(why["ready"], false, "{body}");
    let reasons = why["reasons"].as_array().expect("reasons");
    assert!(
        reasons
            .iter()
            .any(|r| r.as_str().is_some_and(|r| r.contains("redis"))),
        "{body}"
    );
    let during = scrape(port);
    assert_eq!(during.get("sandq_worker_ready", &[]), Some(0.0));
    assert!(during.sum("sandq_redis_errors_total") >= 1.0);

    server = RedisServer::start(redis_port);
    assert!(server.is_some());
    let (up, body) = readyz_until(port, 200, Duration::from_secs(10));
    eprintln!("/readyz 200 {up:?} after Redis came back");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["ready"], true);
    assert_eq!(scrape(port).get("sandq_worker_ready", &[]), Some(1.0));
    // The worker goes (SIGTERM, deregisters) while its Redis is still there.
    drop(w);
    drop(server);
}

//! Operations: what `/metrics`, `/healthz` and `/readyz` expose on a real
//! worker, and that the dashboard, the alert rules and the deployment files
//! agree with it.

mod common;
use common::*;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
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

fn get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    http_get(port, path)
}

/// GET, waiting up to 10 s for the endpoint to start listening.
fn get_when_up(port: u16, path: &str) -> (u16, String) {
    http_get_when_up(port, path, Duration::from_secs(10))
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

/// Start a tool the tests need (promtool, redis-server, prometheus): None
/// (skip, with a note) where it cannot be run, except in CI, where it fails.
fn spawn_tool(cmd: &mut Command) -> Option<Child> {
    match cmd.spawn() {
        Ok(c) => Some(c),
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true and {:?} cannot be run: {e}", cmd.get_program())
        }
        Err(e) => {
            eprintln!("skipping: {:?} cannot be run: {e}", cmd.get_program());
            None
        }
    }
}

/// Run promtool; None (skip) where it is not installed, except in CI.
fn promtool(args: &[&str], stdin: Option<&str>) -> Option<Output> {
    let mut child = spawn_tool(
        Command::new("promtool")
            .args(args)
            .current_dir(root())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )?;
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
    // rate() and increase() see the first event. One family has an
    // open-ended label and appears with its first event: the blocked
    // syscall's name (the dashboard counts such new series on purpose, see
    // the Prometheus test below).
    let fresh = scrape(port);
    check(&fresh, &["sandq_syscall_violations_total"]);
    if let Some(out) = promtool(&["check", "metrics"], Some(&fresh.text)) {
        assert_promtool_ok("a fresh worker's /metrics", &out, &fresh.text);
    }
    // Every Redis operation has its error series at 0 from the start (the
    // dashboard's "Redis errors" panel takes its rate); the three named ones
    // whatever becomes of OPS.
    for op in sandq::queue::OPS
        .iter()
        .chain(&["fetch", "heartbeat", "complete"])
    {
        assert_eq!(
            fresh.get("sandq_redis_errors_total", &[("op", op)]),
            Some(0.0),
            "sandq_redis_errors_total{{op={op:?}}} on a fresh worker"
        );
    }
    assert_status(
        &py(&mut c, &p, "import socket; socket.socket()"),
        "violation",
    );
    let after = scrape(port);
    check(&after, &[]);
    // README.md's metric table lists exactly the families a worker exports
    // (all of them, now that a violation gave the last one its first series).
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let mut listed = BTreeSet::new();
    for row in readme.lines().filter(|l| l.starts_with("| `sandq_")) {
        let first_cell = row.split('|').nth(1).unwrap_or_default();
        metric_names(&first_cell.replace('`', " "), &mut listed);
    }
    let exported: BTreeSet<String> = after
        .types
        .keys()
        .filter(|n| n.starts_with("sandq_"))
        .cloned()
        .collect();
    assert_eq!(listed, exported, "README.md's metric table");
}

/// dashboards/prometheus.yml, and its scrape job for the workers.
fn shipped_scrape_config() -> (serde_norway::Value, serde_norway::Value) {
    let prometheus = yaml_file("dashboards/prometheus.yml");
    let job = prometheus["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|s| s["job_name"] == "sandq")
        .expect("a sandq scrape job")
        .clone();
    (prometheus, job)
}

/// Milliseconds of a Prometheus duration such as `5s`, `500ms` or `1m`.
fn duration_ms(d: &str) -> u64 {
    let (n, unit) = d.split_at(d.find(|c: char| !c.is_ascii_digit()).unwrap_or(d.len()));
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("duration {d:?}"));
    match unit {
        "ms" => n,
        "s" => n * 1000,
        "m" => n * 60_000,
        _ => panic!("duration {d:?}"),
    }
}

#[test]
fn the_default_linger_outlasts_the_shipped_scrape_interval() {
    let help = Command::new(BIN)
        .args(["worker", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    let after_flag = &help[help.find("--metrics-linger-ms").expect("the flag")..];
    let default = after_flag
        .split("[default: ")
        .nth(1)
        .and_then(|d| d.split(']').next())
        .expect("a default");
    let linger_ms: u64 = default.parse().unwrap();
    let (prometheus, job) = shipped_scrape_config();
    let interval = job["scrape_interval"]
        .as_str()
        .or(prometheus["global"]["scrape_interval"].as_str())
        .expect("a scrape interval");
    assert!(
        linger_ms > duration_ms(interval),
        "--metrics-linger-ms {linger_ms} must outlast the {interval} scrape interval"
    );
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
    let (prometheus, scrape) = shipped_scrape_config();
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
        let child = spawn_tool(
            Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(std::env::temp_dir())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )?;
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

/// Call `probe` every `every` until it gives `Ok`; after `limit`, fail with
/// its last `Err`. Returns how long it took and the value.
fn poll<T>(
    limit: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> (Duration, T) {
    let start = Instant::now();
    loop {
        match probe() {
            Ok(v) => return (start.elapsed(), v),
            Err(e) if start.elapsed() >= limit => panic!("after {:?}: {e}", start.elapsed()),
            Err(_) => std::thread::sleep(every),
        }
    }
}

/// Poll /readyz until it answers `want`, checking /healthz stays 200; returns
/// how long that took and the last body.
fn readyz_until(port: u16, want: u16, limit: Duration) -> (Duration, String) {
    poll(limit, Duration::from_millis(50), || {
        let (health, body) = get(port, "/healthz").expect("/healthz answers");
        assert_eq!(health, 200, "/healthz: {body}");
        let (status, body) = get(port, "/readyz").expect("/readyz answers");
        if status == want {
            Ok(body)
        } else {
            Err(format!("/readyz still {status} (want {want}): {body}"))
        }
    })
}

/// A private redis-server and a worker with metrics against it: (server,
/// its port, worker, metrics port). None (skip) without redis-server.
fn worker_on_own_redis(name: &str) -> Option<(RedisServer, u16, Worker, u16)> {
    let redis_port = free_port();
    let server = RedisServer::start(redis_port)?;
    let url = format!("redis://127.0.0.1:{redis_port}");
    let (w, port) = Worker::start_with_metrics_on(&url, &prefix(name), &["--concurrency", "1"]);
    Some((server, redis_port, w, port))
}

#[test]
fn readyz_follows_redis_and_healthz_stays_up() {
    let Some((server, redis_port, w, port)) = worker_on_own_redis("metrics-readyz") else {
        return;
    };
    let mut server = Some(server);

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
    // Back only after Redis has answered for READY_HOLD (6 s) without a failure.
    let (up, body) = readyz_until(port, 200, Duration::from_secs(20));
    eprintln!("/readyz 200 {up:?} after Redis came back");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["ready"], true);
    assert_eq!(scrape(port).get("sandq_worker_ready", &[]), Some(1.0));
    // The worker goes (SIGTERM, deregisters) while its Redis is still there.
    drop(w);
    drop(server);
}

// ---------------------------------------------------------------------------
// 6: readiness is kept by the worker, and does not flap
// ---------------------------------------------------------------------------

/// `CONFIG SET` on a test's own redis-server (never the shared one).
fn config_set(redis_port: u16, key: &str, value: &str) {
    let client = redis::Client::open(format!("redis://127.0.0.1:{redis_port}")).unwrap();
    let mut c = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(key)
        .arg(value)
        .query(&mut c)
        .unwrap();
}

/// Poll `sandq_worker_ready` through /metrics alone until it reads `want`.
fn ready_gauge_until(port: u16, want: f64, limit: Duration) -> Duration {
    poll(limit, Duration::from_millis(100), || {
        match scrape(port).get("sandq_worker_ready", &[]) {
            Some(got) if got == want => Ok(()),
            got => Err(format!("sandq_worker_ready is {got:?}, want {want}")),
        }
    })
    .0
}

#[test]
fn ready_gauge_is_kept_by_the_worker_and_holds_under_redis_oom() {
    let Some((_server, redis_port, w, port)) = worker_on_own_redis("metrics-oom") else {
        return;
    };

    // Nobody asks /readyz: the gauge is the worker's own state.
    let took = ready_gauge_until(port, 1.0, Duration::from_secs(10));
    eprintln!("sandq_worker_ready 1 after {took:?}, /readyz never called");

    // maxmemory below what Redis already uses: every write fails with OOM,
    // while PING and reads succeed.
    config_set(redis_port, "maxmemory", "1");
    let (down, body) = readyz_until(port, 503, Duration::from_secs(10));
    eprintln!("/readyz 503 {down:?} after maxmemory: {body}");
    assert!(body.contains("OOM"), "the reason names the failure: {body}");

    let mut answers = Vec::new();
    let sampled = Instant::now();
    while sampled.elapsed() < Duration::from_secs(10) {
        let (status, body) = get(port, "/readyz").expect("/readyz answers");
        answers.push((status, body));
        std::thread::sleep(Duration::from_millis(100));
    }
    let transitions = answers.windows(2).filter(|w| w[0].0 != w[1].0).count();
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    eprintln!(
        "under OOM: {} samples of /readyz, {ok} answered 200, {transitions} transitions",
        answers.len()
    );
    assert!(answers.len() >= 50, "only {} samples", answers.len());
    assert_eq!(
        (transitions, ok),
        (0, 0),
        "/readyz flapped under OOM: {:?}",
        answers.iter().map(|(s, _)| s).collect::<Vec<_>>()
    );
    let during = scrape(port);
    assert_eq!(during.get("sandq_worker_ready", &[]), Some(0.0));
    assert!(during.sum("sandq_redis_errors_total") >= 1.0);

    config_set(redis_port, "maxmemory", "0");
    let back = ready_gauge_until(port, 1.0, Duration::from_secs(20));
    eprintln!("sandq_worker_ready 1 again {back:?} after maxmemory was lifted");
    let (status, body) = get(port, "/readyz").expect("/readyz answers");
    assert_eq!(status, 200, "{body}");
    drop(w);
}

// ---------------------------------------------------------------------------
// 7: what the drain counts is scraped before the worker exits
// ---------------------------------------------------------------------------

#[test]
fn a_scrape_after_sigterm_sees_the_jobs_handed_back() {
    let Some(mut c) = redis() else { return };
    let p = prefix("metrics-linger");
    let (mut w, port) = Worker::start_with_metrics(
        &p,
        &[
            "--concurrency",
            "1",
            "--shutdown-grace-ms",
            "500",
            "--metrics-linger-ms",
            "30000",
        ],
    );
    push(
        &mut c,
        &p,
        &json!({"id": "linger-1", "language": "python3", "code": "import time\ntime.sleep(60)"}),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while scrape(port).val("sandq_jobs_in_flight", &[]) < 1.0 {
        assert!(Instant::now() < deadline, "the job never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        scrape(port).val("sandq_jobs_requeued_total", &[("reason", "shutdown")]),
        0.0
    );

    w.signal(libc::SIGTERM);
    let signalled = Instant::now();
    let mut draining_seen = false;
    let seen = loop {
        let Ok((200, text)) = get(port, "/metrics") else {
            panic!(
                "/metrics went away {:?} after SIGTERM before a scrape saw the hand-back; log:\n{}",
                signalled.elapsed(),
                w.log()
            );
        };
        let requeued =
            Scrape::parse(text).val("sandq_jobs_requeued_total", &[("reason", "shutdown")]);
        if requeued > 0.0 {
            // This scrape ends the linger: the endpoint may be gone next.
            break requeued;
        }
        if let Ok((ready, why)) = get(port, "/readyz") {
            // 200 only until the signal is handled; then draining, to the end.
            if draining_seen {
                assert_eq!(ready, 503, "/readyz after draining began: {why}");
            }
            draining_seen |= ready == 503 && why.contains("draining");
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(20),
            "no scrape saw the hand-back; log:\n{}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let scraped = Instant::now();
    assert_eq!(seen, 1.0, "one job handed back at shutdown");
    assert!(draining_seen, "/readyz gave `draining` as the reason");
    eprintln!(
        "the hand-back was scraped {:?} after SIGTERM",
        scraped - signalled
    );
    // That scrape ends the linger (30 s at most): the worker exits well before.
    assert_eq!(w.wait(Duration::from_secs(10)), Some(0), "{}", w.log());
    eprintln!("exited {:?} after that scrape", scraped.elapsed());
    // The worker says what it waited for; unless the scrape that saw the
    // hand-back came after the last count already (then it had no reason to).
    let log = w.log();
    let waited = log.contains("waiting for a scrape to see the final values")
        && log.contains("sandq_jobs_requeued_total")
        && log.contains("final values scraped");
    assert!(
        waited || log.contains("nothing recorded since the last scrape"),
        "the log says what it waited for:\n{log}"
    );
    assert_eq!(llen(&mut c, &format!("{p}:queue")), 1, "the job is back");
}

// ---------------------------------------------------------------------------
// 8: every panel and every alert rule, evaluated by a real Prometheus
//    scraping real workers
// ---------------------------------------------------------------------------

/// Scrape and rule-evaluation interval of the test's Prometheus, in seconds.
const SCRAPE_S: u64 = 1;

/// A `prometheus` server on a free loopback port with a generated config,
/// killed (and its directory removed) when dropped.
struct Prometheus {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Prometheus {
    /// Scraping the workers' metrics ports, with dashboards/alerts.yml
    /// loaded. None (skip) where prometheus is not installed, except in CI.
    fn start(targets: &[u16]) -> Option<Prometheus> {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("sandq-prometheus-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let targets: Vec<String> = targets.iter().map(|p| format!("'127.0.0.1:{p}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: {SCRAPE_S}s\n  scrape_timeout: {SCRAPE_S}s\n  evaluation_interval: {SCRAPE_S}s\n\
             rule_files:\n  - '{}'\n\
             scrape_configs:\n  - job_name: sandq\n    static_configs:\n      - targets: [{}]\n",
            root().join("dashboards/alerts.yml").display(),
            targets.join(", ")
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let log = std::fs::File::create(dir.join("log")).unwrap();
        let Some(child) = spawn_tool(
            Command::new("prometheus")
                .arg(format!(
                    "--config.file={}",
                    dir.join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(log),
        ) else {
            let _ = std::fs::remove_dir_all(&dir);
            return None;
        };
        let prometheus = Prometheus { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !matches!(get(port, "/-/ready"), Ok((200, _))) {
            assert!(
                Instant::now() < deadline,
                "prometheus did not get ready; log:\n{}",
                prometheus.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Some(prometheus)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// GET an API path; `Err` with Prometheus' error when it refuses.
    fn api(&self, path: &str) -> Result<Value, String> {
        let (status, body) = get(self.port, path).map_err(|e| format!("GET {path}: {e}"))?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{path}: {e}: {body}"))?;
        if status != 200 || v["status"] != "success" {
            return Err(format!("{path}: HTTP {status}: {body}"));
        }
        Ok(v["data"].clone())
    }

    fn instant(&self, expr: &str, at: f64) -> Result<Value, String> {
        self.api(&format!(
            "/api/v1/query?query={}&time={at:.3}",
            encode(expr)
        ))
    }

    fn range(&self, expr: &str, start: f64, end: f64) -> Result<Value, String> {
        self.api(&format!(
            "/api/v1/query_range?query={}&start={start:.3}&end={end:.3}&step={SCRAPE_S}",
            encode(expr)
        ))
    }

    /// The single value of an instant query whose result has one element.
    fn value(&self, expr: &str) -> Option<f64> {
        let data = self.instant(expr, now_s()).unwrap();
        let result = data["result"].as_array().cloned().unwrap_or_default();
        assert!(result.len() <= 1, "{expr}: {result:?}");
        result.first().map(|r| num(&r["value"][1]))
    }

    /// Poll an instant query until `ok` holds for its value.
    fn until(&self, what: &str, expr: &str, ok: impl Fn(Option<f64>) -> bool) {
        poll(Duration::from_secs(20), Duration::from_millis(200), || {
            let v = self.value(expr);
            if ok(v) {
                Ok(())
            } else {
                Err(format!(
                    "{what}: {expr} is {v:?}; prometheus log:\n{}",
                    self.log()
                ))
            }
        });
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A sample value as Prometheus' API gives it (a string).
fn num(v: &Value) -> f64 {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a sample value: {v}"))
}

/// Percent-encoding for a query string parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One query of the dashboard: where it is, and whether Grafana runs it as
/// an instant or a range query.
struct PanelQuery {
    panel: u64,
    title: String,
    ref_id: String,
    expr: String,
    instant: bool,
    decimals: Option<u64>,
}

/// Every target of every panel, and the annotation queries.
fn panel_queries(dashboard: &Value) -> Vec<PanelQuery> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().into_iter().flatten() {
            out.push(PanelQuery {
                panel: panel["id"].as_u64().expect("panel id"),
                title: panel["title"].as_str().unwrap_or_default().to_owned(),
                ref_id: t["refId"].as_str().unwrap_or_default().to_owned(),
                expr: t["expr"].as_str().expect("target expr").to_owned(),
                instant: t["instant"].as_bool() == Some(true),
                decimals: panel["fieldConfig"]["defaults"]["decimals"].as_u64(),
            });
        }
    }
    for a in dashboard["annotations"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(expr) = a["expr"].as_str() {
            out.push(PanelQuery {
                panel: 0,
                title: format!("annotation {}", a["name"]),
                ref_id: String::new(),
                expr: expr.to_owned(),
                instant: false,
                decimals: None,
            });
        }
    }
    out
}

/// Grafana's variables, as a dashboard showing [start, end] with one point
/// per scrape would set them; template variables at their "All" value.
fn substitute(expr: &str, dashboard: &Value, start: f64, end: f64) -> String {
    let range_s = (end - start).ceil() as u64;
    let interval_s = SCRAPE_S;
    // Grafana: max($__interval + scrape interval, 4 * scrape interval).
    let rate_interval_s = (interval_s + SCRAPE_S).max(4 * SCRAPE_S);
    let mut vars: Vec<(String, String)> = vec![
        ("__rate_interval".into(), format!("{rate_interval_s}s")),
        ("__interval_ms".into(), (interval_s * 1000).to_string()),
        ("__interval".into(), format!("{interval_s}s")),
        ("__range_ms".into(), (range_s * 1000).to_string()),
        ("__range_s".into(), range_s.to_string()),
        ("__range".into(), format!("{range_s}s")),
    ];
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let name = v["name"].as_str().expect("variable name").to_owned();
        match v["type"].as_str() {
            Some("datasource") => {}
            _ => {
                let all = v["allValue"]
                    .as_str()
                    .unwrap_or_else(|| panic!("variable {name}: the test knows only an allValue"));
                vars.push((name, all.to_owned()));
            }
        }
    }
    // Longest names first: `$__range_s` before `$__range`.
    vars.sort_by_key(|(n, _)| std::cmp::Reverse(n.len()));
    let mut e = expr.to_owned();
    for (name, value) in &vars {
        e = e
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("[[{name}]]"), value)
            .replace(&format!("${name}"), value);
    }
    assert!(
        !e.contains('$'),
        "a variable the test does not know in: {e}"
    );
    e
}

/// One series of a query result: its labels and (time, value) points.
type Series = (BTreeMap<String, String>, Vec<(f64, f64)>);

/// The series of a query result.
fn series(data: &Value) -> Vec<Series> {
    let labels = |r: &Value| -> BTreeMap<String, String> {
        r["metric"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let point = |p: &Value| (p[0].as_f64().unwrap_or_default(), num(&p[1]));
    match data["resultType"].as_str() {
        Some("vector") => data["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (labels(r), vec![point(&r["value"])]))
            .collect(),
        Some("matrix") => data["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let points = r["values"].as_array().unwrap().iter().map(point).collect();
                (labels(r), points)
            })
            .collect(),
        Some("scalar") => vec![(BTreeMap::new(), vec![point(&data["result"])])],
        other => panic!("result type {other:?}: {data}"),
    }
}

/// Evaluate every dashboard query as Grafana would over [start, end]: each
/// must parse and run. Keyed by (panel id, refId).
fn evaluate_dashboard(
    prom: &Prometheus,
    dashboard: &Value,
    start: f64,
    end: f64,
) -> BTreeMap<(u64, String), (PanelQuery, Value)> {
    // Steps counted back from `end`, so that the last point is at `end`.
    let start = end - ((end - start) / SCRAPE_S as f64).floor() * SCRAPE_S as f64;
    let mut out = BTreeMap::new();
    for q in panel_queries(dashboard) {
        let expr = substitute(&q.expr, dashboard, start, end);
        let data = if q.instant {
            prom.instant(&expr, end)
        } else {
            prom.range(&expr, start, end)
        }
        .unwrap_or_else(|e| panic!("panel {} {:?} ({}): {e}", q.panel, q.title, q.ref_id));
        out.insert((q.panel, q.ref_id.clone()), (q, data));
    }
    out
}

/// The panel's single instant value, rounded as the panel displays it.
fn shown(results: &BTreeMap<(u64, String), (PanelQuery, Value)>, panel: u64) -> Option<f64> {
    let (q, data) = &results[&(panel, "A".to_owned())];
    assert!(q.instant, "panel {panel} is an instant query");
    let s = series(data);
    assert!(s.len() <= 1, "panel {panel} {:?}: {s:?}", q.title);
    let v = s.first()?.1[0].1;
    Some(match q.decimals {
        Some(d) => (v * 10f64.powi(d as i32)).round() / 10f64.powi(d as i32),
        None => v,
    })
}

/// The id of the panel titled `title`.
fn panel_id(dashboard: &Value, title: &str) -> u64 {
    dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["title"] == title)
        .and_then(|p| p["id"].as_u64())
        .unwrap_or_else(|| panic!("no panel {title:?}"))
}

#[test]
fn every_panel_and_rule_reads_true_on_a_real_prometheus() {
    let Some(mut c) = redis() else { return };
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("dashboards/sandq.json")).unwrap(),
    )
    .unwrap();
    let p = prefix("metrics-prometheus");
    let args = ["--concurrency", "1", "--pool-size", "0"];
    let (w1, port1) = Worker::start_with_metrics(&p, &args);
    let (w2, port2) = Worker::start_with_metrics(&p, &args);
    let w2 = w2.keep_keys();
    let Some(prom) = Prometheus::start(&[port1, port2]) else {
        return;
    };
    let start = now_s();
    // Two scrapes of each worker before any job: counters are seen at 0.
    prom.until(
        "two scrapes of both workers",
        "count(count_over_time(sandq_build_info[1m]) >= 2)",
        |v| v == Some(2.0),
    );

    // One of each: ok, error, a violation (ptrace through ctypes), a timeout.
    let short = [
        ("ok", json!({"code": "print(6*7)"})),
        ("error", json!({"code": "raise SystemExit(3)"})),
        (
            "violation",
            json!({"code": "import ctypes\nctypes.CDLL(None).syscall(101, 0, 0, 0, 0)"}),
        ),
        (
            "timeout",
            json!({"code": "while True: pass", "timeout_ms": 500}),
        ),
    ];
    for (status, job) in short {
        let r = run_job(&mut c, &p, job);
        assert_status(&r, status);
        if status == "violation" {
            assert_eq!(r["violation"]["syscall"], "ptrace", "{r}");
        }
    }
    // Two jobs of just over 5 s, one on each worker at once (one slot each):
    // both processing lists hold a job, and run time p99 is read from the
    // buckets around 5 s.
    let long: Vec<String> = (0..2).map(|i| format!("long-{i}")).collect();
    for id in &long {
        push(
            &mut c,
            &p,
            &json!({"id": id, "language": "python3", "code": "import time\ntime.sleep(5.2)", "timeout_ms": 15000}),
        );
    }
    let mut longest_s: f64 = 0.0;
    let mut workers = BTreeSet::new();
    for id in &long {
        let r = result(&mut c, &p, id, Duration::from_secs(30));
        assert_status(&r, "ok");
        longest_s = longest_s.max(r["duration_ms"].as_f64().unwrap() / 1e3);
        workers.insert(r["worker"].as_str().unwrap().to_owned());
    }
    assert_eq!(workers.len(), 2, "one long job on each worker");
    prom.until("every job scraped", "sum(sandq_jobs_total)", |v| {
        v == Some(6.0)
    });
    // Rate windows ($__rate_interval) past the last job.
    std::thread::sleep(Duration::from_secs(5 * SCRAPE_S));
    let end = now_s();
    let results = evaluate_dashboard(&prom, &dashboard, start, end);
    eprintln!("{} dashboard queries ran", results.len());

    // The template variable: label_values(sandq_build_info, instance).
    let instances = prom
        .api("/api/v1/label/instance/values?match[]=sandq_build_info")
        .unwrap();
    assert_eq!(instances.as_array().map(Vec::len), Some(2), "{instances}");

    let id = |title: &str| panel_id(&dashboard, title);
    assert_eq!(shown(&results, id("Live workers")), Some(2.0));
    assert_eq!(
        shown(&results, id("Ready workers")),
        Some(2.0),
        "sandq_worker_ready without anyone asking /readyz"
    );
    assert_eq!(shown(&results, id("Queue depth")), Some(0.0));
    assert_eq!(shown(&results, id("Slot usage")), Some(0.0));
    assert_eq!(
        shown(&results, id("Blocked syscalls (range)")),
        Some(1.0),
        "the one ptrace violation"
    );
    let (_, top) = &results[&(id("Blocked syscalls, top 10"), "A".to_owned())];
    let top: Vec<(String, f64)> = series(top)
        .into_iter()
        .map(|(l, points)| (l["syscall"].clone(), points[0].1.round()))
        .collect();
    assert_eq!(
        top,
        vec![("ptrace".to_owned(), 1.0)],
        "blocked syscalls, top 10"
    );

    // Processing depth: the sum of both workers' lists, at every step.
    let depth = id("Queue depth by list");
    let (_, by_list) = &results[&(depth, "A".to_owned())];
    let panel_processing: BTreeMap<u64, f64> = series(by_list)
        .into_iter()
        .find(|(l, _)| l.get("list").map(String::as_str) == Some("processing"))
        .expect("a processing series")
        .1
        .into_iter()
        .map(|(t, v)| ((t * 1e3) as u64, v))
        .collect();
    let aligned = end - (end - start).floor();
    let summed = prom
        .range("sum(sandq_queue_depth{list=\"processing\"})", aligned, end)
        .unwrap();
    let (_, summed) = series(&summed).pop().expect("processing series");
    for (t, v) in &summed {
        assert_eq!(
            panel_processing.get(&((t * 1e3) as u64)),
            Some(v),
            "processing depth at {t}: the panel against the sum over workers"
        );
    }
    let most = panel_processing.values().cloned().fold(0.0, f64::max);
    assert_eq!(most, 2.0, "both workers held a job at once");
    for list in ["queue", "dead"] {
        assert!(
            series(by_list)
                .iter()
                .any(|(l, _)| l.get("list").map(String::as_str) == Some(list)),
            "a {list} series"
        );
    }

    // Run time p99 near the truth (5.2 s sleeps; bucket edges 5, 10 read ~9.9 s).
    let (_, p99) = &results[&(id("Run time p50 / p95 / p99"), "C".to_owned())];
    let p99_max = series(p99)
        .into_iter()
        .flat_map(|(_, points)| points.into_iter().map(|(_, v)| v))
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    eprintln!("run time p99 reads {p99_max:.2} s for jobs of {longest_s:.2} s");
    assert!(
        p99_max >= longest_s * 0.8 && p99_max <= longest_s * 1.25,
        "run time p99 reads {p99_max} s, the longest job took {longest_s} s"
    );

    // Every alert rule evaluates, and none fires on healthy workers.
    let deadline = Instant::now() + Duration::from_secs(10);
    let rules = loop {
        let groups = prom.api("/api/v1/rules").unwrap()["groups"].clone();
        let rules: Vec<Value> = groups
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        if !rules.is_empty() && rules.iter().all(|r| r["health"] == "ok") {
            break rules;
        }
        assert!(
            Instant::now() < deadline,
            "rules not all evaluated: {rules:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let alerts = yaml_file("dashboards/alerts.yml");
    let declared = alerts["groups"][0]["rules"].as_sequence().unwrap().len();
    assert_eq!(rules.len(), declared, "every rule of alerts.yml is loaded");
    for r in &rules {
        assert_ne!(
            r["state"], "firing",
            "{} fires on healthy workers: {r}",
            r["name"]
        );
    }
    let spike = rules
        .iter()
        .find(|r| r["name"] == "SandqSyscallViolationSpike")
        .expect("the spike rule");
    assert_eq!(spike["state"], "inactive", "{spike}");

    // The workers go: the overview reads 0, not "No data".
    drop(w1);
    drop(w2);
    prom.until("the workers gone", "count(sandq_build_info)", |v| {
        v.is_none()
    });
    let end = now_s();
    let gone = evaluate_dashboard(&prom, &dashboard, start, end);
    assert_eq!(shown(&gone, id("Live workers")), Some(0.0));
    assert_eq!(shown(&gone, id("Ready workers")), Some(0.0));
    assert_eq!(shown(&gone, id("Queue depth")), Some(0.0));
    let (_, live) = &gone[&(id("Live and ready workers"), "A".to_owned())];
    let last = series(live)[0].1.last().copied();
    assert_eq!(
        last.map(|(_, v)| v),
        Some(0.0),
        "live workers over time end at 0"
    );

    // The spike rule's own unit tests: a new deployment does not fire, a
    // real spike does.
    if let Some(out) = promtool(&["test", "rules", "dashboards/alerts.test.yml"], None) {
        assert_promtool_ok("dashboards/alerts.test.yml", &out, "");
    }
    drop(prom);
    delete_prefix(&p);
}

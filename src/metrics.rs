//! Prometheus metrics and the HTTP endpoints `/metrics`, `/healthz`, `/readyz`.
//!
//! [`Metrics`] owns its registry and is passed to whoever records (no global
//! statics). Labels are bounded: language, status, syscall name, stream,
//! reason, list, layer, op; never a job id. Units are seconds and bytes.

use crate::job::{Language, Status};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// From 1 ms to 60 s: spawns are ~10 ms, jobs up to the max timeout.
const TIME_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0,
];
/// 4 MiB to 4 GiB.
const RSS_BUCKETS: &[f64] = &[
    4194304.0,
    8388608.0,
    16777216.0,
    33554432.0,
    67108864.0,
    134217728.0,
    268435456.0,
    536870912.0,
    1073741824.0,
    2147483648.0,
    4294967296.0,
];

pub struct Metrics {
    registry: Registry,
    jobs: IntCounterVec,
    job_duration: HistogramVec,
    queue_wait: HistogramVec,
    spawn_duration: HistogramVec,
    violations: IntCounterVec,
    pub in_flight: IntGauge,
    pub slots: IntGauge,
    queue_depth: IntGaugeVec,
    job_cpu: HistogramVec,
    job_rss: HistogramVec,
    output_truncated: IntCounterVec,
    requeued: IntCounterVec,
    dead_letters: IntCounterVec,
    dead_letters_trimmed: prometheus::IntCounter,
    redis_errors: IntCounterVec,
    layer_active: IntGaugeVec,
    ready: IntGauge,
    pool_hits: IntCounterVec,
    pool_misses: IntCounterVec,
    pool_size: IntGaugeVec,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    // Names are fixed and unique, so registration cannot collide.
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    reg(
        r,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: &[f64]) -> HistogramVec {
    reg(
        r,
        HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            &["language"],
        )
        .expect("valid metric"),
    )
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("process collector registered once");
        let build = reg(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "sandq_build_info",
                    "Always 1; the version label says which build.",
                ),
                &["version"],
            )
            .expect("valid metric"),
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let m = Metrics {
            jobs: counter(&r, "sandq_jobs_total", "Jobs finished, by language and status.", &["language", "status"]),
            job_duration: histogram(&r, "sandq_job_duration_seconds", "Wall time of the sandboxed run.", TIME_BUCKETS),
            queue_wait: histogram(&r, "sandq_queue_wait_seconds", "From the job's enqueued_at_ms to the start of its run.", TIME_BUCKETS),
            spawn_duration: histogram(&r, "sandq_spawn_duration_seconds", "From clone to the interpreter running, locked down.", TIME_BUCKETS),
            violations: counter(&r, "sandq_syscall_violations_total", "Jobs stopped by the seccomp filter, by blocked syscall.", &["language", "syscall"]),
            in_flight: reg(&r, IntGauge::new("sandq_jobs_in_flight", "Jobs running now.").expect("valid metric")),
            slots: reg(&r, IntGauge::new("sandq_concurrency_slots", "Jobs this worker runs at once, at most.").expect("valid metric")),
            queue_depth: reg(&r, IntGaugeVec::new(Opts::new("sandq_queue_depth", "Length of the queue, the dead-letter list and this worker's processing list."), &["list"]).expect("valid metric")),
            job_cpu: histogram(&r, "sandq_job_cpu_seconds", "CPU time (user + system) a job used.", TIME_BUCKETS),
            job_rss: histogram(&r, "sandq_job_max_rss_bytes", "Peak resident memory of a job.", RSS_BUCKETS),
            output_truncated: counter(&r, "sandq_output_truncated_total", "Streams cut at the output limit.", &["stream"]),
            requeued: counter(&r, "sandq_jobs_requeued_total", "Jobs put back on the queue.", &["reason"]),
            dead_letters: counter(&r, "sandq_dead_letters_total", "Payloads moved to the dead-letter list.", &["reason"]),
            dead_letters_trimmed: reg(&r, prometheus::IntCounter::new("sandq_dead_letters_trimmed_total", "Oldest dead-letter entries dropped to keep the list at --dead-letter-max.").expect("valid metric")),
            redis_errors: counter(&r, "sandq_redis_errors_total", "Failed Redis operations.", &["op"]),
            layer_active: reg(&r, IntGaugeVec::new(Opts::new("sandq_isolation_layer_active", "1 when the isolation layer is in force on this worker."), &["layer"]).expect("valid metric")),
            ready: reg(&r, IntGauge::new("sandq_worker_ready", "1 when /readyz answers 200.").expect("valid metric")),
            pool_hits: counter(&r, "sandq_pool_hits_total", "Jobs served by a pre-started interpreter.", &["language"]),
            pool_misses: counter(&r, "sandq_pool_misses_total", "Jobs that took the cold path.", &["language"]),
            pool_size: reg(&r, IntGaugeVec::new(Opts::new("sandq_pool_size", "Pre-started interpreters waiting."), &["language"]).expect("valid metric")),
            registry: r,
        };
        // Every series exists from the start, so rates and alerts see zeros.
        for l in Language::ALL {
            for s in Status::ALL {
                m.jobs.with_label_values(&[l.as_str(), s.as_str()]);
            }
            m.pool_hits.with_label_values(&[l.as_str()]);
            m.pool_misses.with_label_values(&[l.as_str()]);
            m.pool_size.with_label_values(&[l.as_str()]);
            for h in [
                &m.job_duration,
                &m.queue_wait,
                &m.spawn_duration,
                &m.job_cpu,
                &m.job_rss,
            ] {
                h.with_label_values(&[l.as_str()]);
            }
        }
        // A job whose language is not known is rejected under "unknown".
        m.jobs
            .with_label_values(&["unknown", Status::Rejected.as_str()]);
        for r in ["unreadable", "max_attempts", "undeliverable"] {
            m.dead_letters.with_label_values(&[r]);
        }
        for s in ["stdout", "stderr"] {
            m.output_truncated.with_label_values(&[s]);
        }
        for r in ["reaped", "shutdown"] {
            m.requeued.with_label_values(&[r]);
        }
        for list in ["queue", "dead", "processing"] {
            m.queue_depth.with_label_values(&[list]);
        }
        m
    }

    pub fn job_finished(&self, language: &str, status: Status) {
        self.jobs
            .with_label_values(&[language, status.as_str()])
            .inc();
    }

    pub fn job_ran(
        &self,
        language: Language,
        run: Duration,
        spawn: Duration,
        cpu_ms: u64,
        rss_kb: u64,
    ) {
        let l = [language.as_str()];
        self.job_duration
            .with_label_values(&l)
            .observe(run.as_secs_f64());
        self.spawn_duration
            .with_label_values(&l)
            .observe(spawn.as_secs_f64());
        self.job_cpu
            .with_label_values(&l)
            .observe(cpu_ms as f64 / 1e3);
        self.job_rss
            .with_label_values(&l)
            .observe(rss_kb as f64 * 1024.0);
    }

    pub fn queue_waited(&self, language: Language, wait: Duration) {
        self.queue_wait
            .with_label_values(&[language.as_str()])
            .observe(wait.as_secs_f64());
    }

    pub fn violation(&self, language: Language, syscall: &str) {
        self.violations
            .with_label_values(&[language.as_str(), syscall])
            .inc();
    }

    pub fn truncated(&self, stream: &'static str) {
        self.output_truncated.with_label_values(&[stream]).inc();
    }

    pub fn requeued(&self, reason: &'static str, n: u64) {
        self.requeued.with_label_values(&[reason]).inc_by(n);
    }

    pub fn dead_letter(&self, reason: &'static str) {
        self.dead_letters.with_label_values(&[reason]).inc();
    }

    pub fn dead_letters_trimmed(&self, n: u64) {
        self.dead_letters_trimmed.inc_by(n);
    }

    pub fn redis_error(&self, op: &'static str) {
        self.redis_errors.with_label_values(&[op]).inc();
    }

    pub fn queue_depths(&self, queue: u64, dead: u64, processing: u64) {
        self.queue_depth
            .with_label_values(&["queue"])
            .set(queue as i64);
        self.queue_depth
            .with_label_values(&["dead"])
            .set(dead as i64);
        self.queue_depth
            .with_label_values(&["processing"])
            .set(processing as i64);
    }

    pub fn layer(&self, layer: &str, active: bool) {
        self.layer_active
            .with_label_values(&[layer])
            .set(active as i64);
    }

    pub fn pool(&self, language: Language, hit: bool) {
        let l = [language.as_str()];
        if hit {
            self.pool_hits.with_label_values(&l).inc();
        } else {
            self.pool_misses.with_label_values(&l).inc();
        }
    }

    pub fn pool_size(&self, language: Language, size: usize) {
        self.pool_size
            .with_label_values(&[language.as_str()])
            .set(size as i64);
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.set(ready as i64);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// What `/readyz` checks.
#[derive(Default)]
pub struct Readiness {
    pub redis: AtomicBool,
    pub root: AtomicBool,
    pub self_test: AtomicBool,
    pub last_redis_error: Mutex<Option<String>>,
}

impl Readiness {
    /// `Ok` when ready, otherwise the reasons.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let mut why = Vec::new();
        if !self.redis.load(Ordering::Relaxed) {
            let detail = self
                .last_redis_error
                .lock()
                .ok()
                .and_then(|e| e.clone())
                .unwrap_or_else(|| "not connected yet".into());
            why.push(format!("redis unreachable: {detail}"));
        }
        if !self.root.load(Ordering::Relaxed) {
            why.push("runtime root not prepared".into());
        }
        if !self.self_test.load(Ordering::Relaxed) {
            why.push("sandbox self-test has not passed".into());
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why)
        }
    }
}

/// Serve `/metrics`, `/healthz` and `/readyz` until `shutdown`.
pub async fn serve(
    addr: String,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
    let m = metrics.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m.clone();
                async move {
                    (
                        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                        m.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let r = readiness.clone();
                let m = metrics.clone();
                async move {
                    match r.check() {
                        Ok(()) => {
                            m.set_ready(true);
                            (
                                StatusCode::OK,
                                axum::Json(serde_json::json!({"ready": true})),
                            )
                        }
                        Err(reasons) => {
                            m.set_ready(false);
                            (
                                StatusCode::SERVICE_UNAVAILABLE,
                                axum::Json(serde_json::json!({"ready": false, "reasons": reasons})),
                            )
                        }
                    }
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

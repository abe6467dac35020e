//! Prometheus metrics and the HTTP endpoints `/metrics`, `/healthz`, `/readyz`.
//!
//! [`Metrics`] owns its registry and is passed to whoever records (no global
//! statics). Labels are bounded: language, status, syscall name, stream,
//! reason, list, layer, op; never a job id. Units are seconds and bytes.
//!
//! Every series whose label values are known in advance exists from start-up
//! at 0, because Prometheus' `rate()` and `increase()` see nothing of a series
//! that is born at 1. Only the blocked syscall's name is open-ended; the
//! per-language count of those jobs is `sandq_jobs_total{status="violation"}`.
//!
//! Readiness ([`Readiness`]) is kept by the worker as things happen, not
//! computed when `/readyz` is asked: the `sandq_worker_ready` gauge and
//! `/readyz` always agree. On shutdown, [`Metrics::linger`] keeps the endpoint
//! up until a scrape has seen what the drain recorded.

use crate::job::{Language, Status};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Clone to interpreter running: ~2 ms warm, ~10 ms (Python) to ~35 ms
/// (Node) cold, seconds only when the machine is in trouble.
const SPAWN_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Wall and CPU time of a run, up to 65 s (the default max timeout, 60 s, and
/// what a timed-out run takes past it); [`run_buckets`] adds edges up to a
/// larger max timeout. From 5 s up, edges are at most 25 % apart, so that a
/// quantile interpolated inside a bucket is off by 25 % at worst (with edges
/// at 5, 10, 30, 60, the p99 of 10.02 s jobs read 29.8 s).
const RUN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0,
    5.0, 6.0, 7.5, 9.0, 10.5, 12.5, 15.0, 17.5, 20.0, 22.5, 25.0, 27.5, 30.0, 35.0, 40.0, 45.0,
    50.0, 55.0, 60.0, 65.0,
];
/// Edges past [`RUN_BUCKETS`], taken up to the first one beyond the max timeout.
const LONG_RUN_BUCKETS: &[f64] = &[
    75.0, 90.0, 120.0, 150.0, 180.0, 240.0, 300.0, 450.0, 600.0, 900.0, 1200.0, 1800.0, 2700.0,
    3600.0, 5400.0, 7200.0, 10800.0, 14400.0, 21600.0, 43200.0, 86400.0,
];
/// Enqueue to run: milliseconds on an idle fleet, hours behind a backlog (a
/// 50,000-job backlog waits far past a minute).
const WAIT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 900.0, 1800.0, 2700.0, 3600.0, 5400.0, 7200.0, 10800.0, 14400.0, 21600.0, 43200.0,
    86400.0,
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

/// Run-time edges for a worker whose longest job is `max_timeout`: a run
/// stopped at its timeout ends a little past it, and must land in a finite
/// bucket.
fn run_buckets(max_timeout: Duration) -> Vec<f64> {
    let need = max_timeout.as_secs_f64() * 1.05;
    let mut edges = RUN_BUCKETS.to_vec();
    for &edge in LONG_RUN_BUCKETS {
        if edges.last().is_some_and(|&last| last >= need) {
            break;
        }
        edges.push(edge);
    }
    edges
}

/// How long Redis must keep answering with no failure at all before a worker
/// that saw one is ready again. Longer than the worker's longest retry
/// backoff (5 s): an operation that fails at every retry (writes under Redis'
/// `maxmemory`, while PING and reads still succeed) keeps the worker not
/// ready instead of flipping it every time a read succeeds in between.
pub const READY_HOLD: Duration = Duration::from_secs(6);

const JOBS: &str = "sandq_jobs_total";
const VIOLATIONS: &str = "sandq_syscall_violations_total";
const TRUNCATED: &str = "sandq_output_truncated_total";
const REQUEUED: &str = "sandq_jobs_requeued_total";
const DEAD_LETTERS: &str = "sandq_dead_letters_total";
const DEAD_LETTERS_TRIMMED: &str = "sandq_dead_letters_trimmed_total";
const REDIS_ERRORS: &str = "sandq_redis_errors_total";
const POOL_HITS: &str = "sandq_pool_hits_total";
const POOL_MISSES: &str = "sandq_pool_misses_total";
const JOB_DURATION: &str = "sandq_job_duration_seconds";
const QUEUE_WAIT: &str = "sandq_queue_wait_seconds";

/// What was recorded since the last scrape.
#[derive(Default)]
struct Unscraped {
    /// Bumped by every record; a scrape notes the value it rendered.
    generation: u64,
    /// The families recorded into since the last scrape (for the log).
    families: BTreeSet<&'static str>,
}

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
    unscraped: Mutex<Unscraped>,
    /// The generation the latest scrape rendered.
    scraped: tokio::sync::watch::Sender<u64>,
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
    /// The registry of a worker whose longest job is `max_timeout`.
    pub fn new(max_timeout: Duration) -> Metrics {
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
            jobs: counter(&r, JOBS, "Jobs finished, by language and status.", &["language", "status"]),
            job_duration: histogram(&r, JOB_DURATION, "Wall time of the sandboxed run.", &run_buckets(max_timeout)),
            queue_wait: histogram(&r, QUEUE_WAIT, "From the job's enqueued_at_ms to the start of its run.", WAIT_BUCKETS),
            spawn_duration: histogram(&r, "sandq_spawn_duration_seconds", "From clone to the interpreter running, locked down.", SPAWN_BUCKETS),
            violations: counter(&r, VIOLATIONS, "Jobs stopped by the seccomp filter, by blocked syscall (a series appears with its syscall's first job).", &["language", "syscall"]),
            in_flight: reg(&r, IntGauge::new("sandq_jobs_in_flight", "Jobs running now.").expect("valid metric")),
            slots: reg(&r, IntGauge::new("sandq_concurrency_slots", "Jobs this worker runs at once, at most.").expect("valid metric")),
            queue_depth: reg(&r, IntGaugeVec::new(Opts::new("sandq_queue_depth", "Length of the queue and the dead-letter list (the same on every worker), and of this worker's own processing list."), &["list"]).expect("valid metric")),
            job_cpu: histogram(&r, "sandq_job_cpu_seconds", "CPU time (user + system) a job used.", &run_buckets(max_timeout)),
            job_rss: histogram(&r, "sandq_job_max_rss_bytes", "Peak resident memory of a job.", RSS_BUCKETS),
            output_truncated: counter(&r, TRUNCATED, "Streams cut at the output limit.", &["stream"]),
            requeued: counter(&r, REQUEUED, "Jobs put back on the queue.", &["reason"]),
            dead_letters: counter(&r, DEAD_LETTERS, "Payloads moved to the dead-letter list.", &["reason"]),
            dead_letters_trimmed: reg(&r, prometheus::IntCounter::new(DEAD_LETTERS_TRIMMED, "Oldest dead-letter entries dropped to keep the list at --dead-letter-max.").expect("valid metric")),
            redis_errors: counter(&r, REDIS_ERRORS, "Failed Redis operations.", &["op"]),
            layer_active: reg(&r, IntGaugeVec::new(Opts::new("sandq_isolation_layer_active", "1 when the isolation layer is in force on this worker."), &["layer"]).expect("valid metric")),
            ready: reg(&r, IntGauge::new("sandq_worker_ready", "1 when the worker is ready (what /readyz answers).").expect("valid metric")),
            pool_hits: counter(&r, POOL_HITS, "Jobs served by a pre-started interpreter.", &["language"]),
            pool_misses: counter(&r, POOL_MISSES, "Jobs that took the cold path.", &["language"]),
            pool_size: reg(&r, IntGaugeVec::new(Opts::new("sandq_pool_size", "Pre-started interpreters waiting."), &["language"]).expect("valid metric")),
            unscraped: Mutex::default(),
            scraped: tokio::sync::watch::Sender::new(0),
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
        for op in crate::queue::OPS {
            m.redis_errors.with_label_values(&[op]);
        }
        m
    }

    /// Note a record into `family`, for [`Metrics::linger`].
    fn touch(&self, family: &'static str) {
        if let Ok(mut u) = self.unscraped.lock() {
            u.generation += 1;
            u.families.insert(family);
        }
    }

    pub fn job_finished(&self, language: &str, status: Status) {
        self.jobs
            .with_label_values(&[language, status.as_str()])
            .inc();
        self.touch(JOBS);
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
        self.touch(JOB_DURATION);
    }

    pub fn queue_waited(&self, language: Language, wait: Duration) {
        self.queue_wait
            .with_label_values(&[language.as_str()])
            .observe(wait.as_secs_f64());
        self.touch(QUEUE_WAIT);
    }

    pub fn violation(&self, language: Language, syscall: &str) {
        self.violations
            .with_label_values(&[language.as_str(), syscall])
            .inc();
        self.touch(VIOLATIONS);
    }

    pub fn truncated(&self, stream: &'static str) {
        self.output_truncated.with_label_values(&[stream]).inc();
        self.touch(TRUNCATED);
    }

    pub fn requeued(&self, reason: &'static str, n: u64) {
        if n > 0 {
            self.requeued.with_label_values(&[reason]).inc_by(n);
            self.touch(REQUEUED);
        }
    }

    pub fn dead_letter(&self, reason: &'static str) {
        self.dead_letters.with_label_values(&[reason]).inc();
        self.touch(DEAD_LETTERS);
    }

    pub fn dead_letters_trimmed(&self, n: u64) {
        self.dead_letters_trimmed.inc_by(n);
        self.touch(DEAD_LETTERS_TRIMMED);
    }

    pub fn redis_error(&self, op: &'static str) {
        self.redis_errors.with_label_values(&[op]).inc();
        self.touch(REDIS_ERRORS);
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
            self.touch(POOL_HITS);
        } else {
            self.pool_misses.with_label_values(&l).inc();
            self.touch(POOL_MISSES);
        }
    }

    pub fn pool_size(&self, language: Language, size: usize) {
        self.pool_size
            .with_label_values(&[language.as_str()])
            .set(size as i64);
    }

    /// The Prometheus text exposition. Counts as a scrape for
    /// [`Metrics::linger`].
    pub fn render(&self) -> String {
        let generation = self
            .unscraped
            .lock()
            .map(|mut u| {
                u.families.clear();
                u.generation
            })
            .unwrap_or(0);
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        self.scraped.send_if_modified(|seen| {
            let newer = generation > *seen;
            *seen = (*seen).max(generation);
            newer
        });
        String::from_utf8(buf).unwrap_or_default()
    }

    /// After the drain: keep the endpoint up (the caller stops it afterwards)
    /// until a scrape has rendered everything recorded so far, for at most
    /// `max`. What moves during the drain (jobs finished in the grace period,
    /// jobs handed back) would otherwise never reach Prometheus. Returns at
    /// once when nothing was recorded since the last scrape.
    pub async fn linger(&self, max: Duration) {
        if max.is_zero() {
            return;
        }
        let (generation, families) = self
            .unscraped
            .lock()
            .map(|u| (u.generation, u.families.iter().copied().collect::<Vec<_>>()))
            .unwrap_or_default();
        let mut scraped = self.scraped.subscribe();
        if *scraped.borrow() >= generation {
            tracing::info!("nothing recorded since the last scrape; not lingering");
            return;
        }
        tracing::info!(
            max_ms = max.as_millis() as u64,
            unscraped = ?families,
            "waiting for a scrape to see the final values"
        );
        let started = Instant::now();
        let seen = tokio::time::timeout(max, scraped.wait_for(|&s| s >= generation)).await;
        let waited_ms = started.elapsed().as_millis() as u64;
        if matches!(seen, Ok(Ok(_))) {
            tracing::info!(waited_ms, "final values scraped");
        } else {
            tracing::warn!(
                waited_ms,
                unscraped = ?families,
                "no scrape came within the linger; Prometheus misses the final values"
            );
        }
    }
}

impl Default for Metrics {
    /// With the default max timeout.
    fn default() -> Self {
        Metrics::new(Duration::from_millis(
            crate::job::Limits::default().max_timeout_ms,
        ))
    }
}

/// Whether the worker takes jobs, kept as its inputs change, with the
/// `sandq_worker_ready` gauge set on every change.
///
/// A Redis failure makes the worker not ready at once; it is ready again only
/// after a success that comes [`READY_HOLD`] or more after the last failure.
pub struct Readiness {
    gauge: IntGauge,
    state: Mutex<ReadyState>,
}

#[derive(Default)]
struct ReadyState {
    /// Runtime root prepared and sandbox self-test passed.
    sandbox: bool,
    /// Shutting down: no new jobs are taken.
    draining: bool,
    /// Why this worker takes no job at all (a required layer is missing).
    refused: Option<String>,
    /// Redis counts as working.
    redis: bool,
    /// The last Redis failure: when, and the error.
    failure: Option<(Instant, String)>,
}

impl ReadyState {
    fn ready(&self) -> bool {
        self.sandbox && self.redis && !self.draining && self.refused.is_none()
    }
}

impl Readiness {
    /// Not ready until the sandbox is prepared and Redis has answered.
    pub fn new(metrics: &Metrics) -> Readiness {
        metrics.ready.set(0);
        Readiness {
            gauge: metrics.ready.clone(),
            state: Mutex::default(),
        }
    }

    /// Change the state and set the gauge, under one lock so that the gauge
    /// never shows an older state than `/readyz`. Returns what `change` does.
    fn update<T>(&self, change: impl FnOnce(&mut ReadyState) -> T) -> T {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let out = change(&mut state);
        self.gauge.set(state.ready() as i64);
        out
    }

    /// The runtime root is prepared and the self-test passed.
    pub fn sandbox_ready(&self) {
        self.update(|s| s.sandbox = true);
    }

    /// The worker takes no job, for this reason, for as long as it runs.
    pub fn refuse_jobs(&self, reason: String) {
        self.update(|s| s.refused = Some(reason));
    }

    /// Shutdown began: not ready from now on.
    pub fn draining(&self) {
        self.update(|s| s.draining = true);
    }

    /// A Redis operation failed. True when this made Redis count as down.
    pub fn redis_failed(&self, error: &str) -> bool {
        self.redis_failed_at(Instant::now(), error)
    }

    /// A Redis operation succeeded. True when this made Redis count as up.
    pub fn redis_succeeded(&self) -> bool {
        self.redis_succeeded_at(Instant::now())
    }

    fn redis_failed_at(&self, now: Instant, error: &str) -> bool {
        self.update(|s| {
            s.failure = Some((now, error.to_owned()));
            std::mem::replace(&mut s.redis, false)
        })
    }

    fn redis_succeeded_at(&self, now: Instant) -> bool {
        self.update(|s| {
            let held = s
                .failure
                .as_ref()
                .is_none_or(|(at, _)| now.saturating_duration_since(*at) >= READY_HOLD);
            let came_up = !s.redis && held;
            s.redis |= held;
            came_up
        })
    }

    /// `Ok` when ready, otherwise the reasons.
    pub fn check(&self) -> Result<(), Vec<String>> {
        self.check_at(Instant::now())
    }

    fn check_at(&self, now: Instant) -> Result<(), Vec<String>> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut why = Vec::new();
        if !state.sandbox {
            why.push("sandbox not prepared (runtime root, self-test)".to_owned());
        }
        if state.draining {
            why.push("draining: shutting down, taking no new jobs".to_owned());
        }
        if let Some(reason) = &state.refused {
            why.push(reason.clone());
        }
        if !state.redis {
            why.push(match &state.failure {
                None => "redis: not connected yet".to_owned(),
                Some((at, error)) => format!(
                    "redis: last failure {:.1} s ago: {error}; ready again after {} s without a failure",
                    now.saturating_duration_since(*at).as_secs_f64(),
                    READY_HOLD.as_secs()
                ),
            });
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why)
        }
    }
}

/// Serve `/metrics`, `/healthz` and `/readyz` until `shutdown`. The worker
/// stops it after the drain and [`Metrics::linger`], not at SIGTERM: during
/// the drain `/readyz` says "draining" and the counts keep being scraped.
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
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
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
                async move {
                    match r.check() {
                        Ok(()) => (
                            StatusCode::OK,
                            axum::Json(serde_json::json!({"ready": true})),
                        ),
                        Err(reasons) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            axum::Json(serde_json::json!({"ready": false, "reasons": reasons})),
                        ),
                    }
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (upper bound, cumulative count) of `family`'s python3 histogram, from
    /// the exposition.
    fn buckets(text: &str, family: &str) -> Vec<(f64, f64)> {
        let head = format!("{family}_bucket{{language=\"python3\",le=\"");
        text.lines()
            .filter_map(|l| l.strip_prefix(&head))
            .map(|rest| {
                let (le, count) = rest.split_once("\"} ").expect("a bucket line");
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().expect("a bound")
                };
                (le, count.parse().expect("a count"))
            })
            .collect()
    }

    /// Prometheus' `histogram_quantile`: linear inside the bucket the rank
    /// falls in; the highest finite bound when it falls in `+Inf`.
    fn quantile(q: f64, buckets: &[(f64, f64)]) -> f64 {
        let total = buckets.last().expect("+Inf").1;
        let rank = q * total;
        let i = buckets.iter().position(|b| b.1 >= rank).expect("rank");
        if buckets[i].0.is_infinite() {
            return buckets[i - 1].0;
        }
        let (low, below) = if i == 0 { (0.0, 0.0) } else { buckets[i - 1] };
        low + (buckets[i].0 - low) * (rank - below) / (buckets[i].1 - below)
    }

    fn ran(m: &Metrics, secs: f64) {
        let d = Duration::from_secs_f64(secs);
        m.job_ran(Language::Python3, d, Duration::from_millis(10), 5, 10_000);
    }

    #[test]
    fn run_time_quantiles_read_close_to_the_truth() {
        // Jobs that sleep a round number of seconds take a little more, which
        // puts them just above a round bucket edge.
        for secs in [5.02, 10.02, 12.0, 20.03, 30.05, 45.0, 59.9, 60.02] {
            let m = Metrics::default();
            for _ in 0..100 {
                ran(&m, secs);
            }
            let p99 = quantile(0.99, &buckets(&m.render(), JOB_DURATION));
            assert!(
                p99 >= secs * 0.75 && p99 <= secs * 1.25,
                "p99 of {secs} s jobs reads {p99} s"
            );
        }
    }

    #[test]
    fn run_time_buckets_reach_the_max_timeout() {
        for max_s in [1, 60, 300, 3600] {
            let edges = run_buckets(Duration::from_secs(max_s));
            let top = *edges.last().unwrap();
            assert!(top > max_s as f64 * 1.05, "max {max_s} s: top edge {top}");
            assert!(edges.windows(2).all(|w| w[0] < w[1]), "{edges:?}");
        }
        // A run stopped at a 300 s timeout lands in a finite bucket.
        let m = Metrics::new(Duration::from_secs(300));
        ran(&m, 300.4);
        let b = buckets(&m.render(), JOB_DURATION);
        let inf = b.last().unwrap().1;
        let below_inf = b[b.len() - 2].1;
        assert_eq!((inf, below_inf), (1.0, 1.0), "{b:?}");
    }

    #[test]
    fn queue_waits_of_hours_land_in_finite_buckets() {
        let m = Metrics::default();
        for secs in [0.01, 45.0, 600.0, 2.0 * 3600.0, 5.0 * 3600.0] {
            m.queue_waited(Language::Python3, Duration::from_secs_f64(secs));
        }
        let b = buckets(&m.render(), QUEUE_WAIT);
        let finite = b[b.len() - 2];
        assert_eq!(finite.1, 5.0, "every wait below the top finite edge: {b:?}");
        // p50 of these waits is 600 s; edges around it keep it within 50 %.
        let p50 = quantile(0.5, &b);
        assert!((300.0..=900.0).contains(&p50), "p50 {p50}");
    }

    #[test]
    fn every_redis_op_is_exported_from_the_start() {
        let text = Metrics::default().render();
        for op in crate::queue::OPS {
            let line = format!("{REDIS_ERRORS}{{op=\"{op}\"}} 0");
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
    }

    /// Whether `/readyz` would answer ready at `now`; the gauge must agree.
    fn ready(r: &Readiness, now: Instant) -> bool {
        let ready = r.check_at(now).is_ok();
        assert_eq!(r.gauge.get(), ready as i64, "the gauge follows the state");
        ready
    }

    #[test]
    fn readiness_goes_down_at_once_and_comes_back_after_the_hold() {
        let m = Metrics::default();
        let r = Readiness::new(&m);
        let t0 = Instant::now();
        assert!(!ready(&r, t0), "not ready before anything happened");
        r.sandbox_ready();
        assert!(!ready(&r, t0), "nor before Redis answered");
        assert!(r.redis_succeeded_at(t0), "the first success makes it ready");
        assert!(ready(&r, t0));

        let t1 = t0 + Duration::from_secs(10);
        assert!(r.redis_failed_at(t1, "OOM command not allowed"));
        assert!(!ready(&r, t1), "a failure is not ready at once");
        let why = r.check_at(t1).unwrap_err().join("; ");
        assert!(why.contains("redis") && why.contains("OOM"), "{why}");
        assert!(!r.redis_failed_at(t1, "again"), "already down");

        let soon = t1 + READY_HOLD - Duration::from_millis(1);
        assert!(!r.redis_succeeded_at(soon));
        assert!(!ready(&r, soon), "a success inside the hold is not enough");
        let later = t1 + READY_HOLD;
        assert!(r.redis_succeeded_at(later));
        assert!(ready(&r, later));
    }

    #[test]
    fn alternating_failures_and_successes_do_not_flap() {
        // Redis under maxmemory: writes fail, reads succeed, every 0.5 s.
        let m = Metrics::default();
        let r = Readiness::new(&m);
        r.sandbox_ready();
        let t0 = Instant::now();
        r.redis_succeeded_at(t0);
        let mut states = Vec::new();
        for i in 1..=80 {
            let now = t0 + Duration::from_millis(500 * i);
            if i % 2 == 1 {
                r.redis_failed_at(now, "OOM");
            } else {
                r.redis_succeeded_at(now);
            }
            states.push(ready(&r, now));
        }
        assert!(states.iter().all(|&s| !s), "{states:?}");
    }

    #[test]
    fn draining_is_not_ready_and_says_why() {
        let m = Metrics::default();
        let r = Readiness::new(&m);
        r.sandbox_ready();
        r.redis_succeeded();
        assert!(r.check().is_ok());
        r.draining();
        let why = r.check().unwrap_err();
        assert_eq!(why.len(), 1, "{why:?}");
        assert!(why[0].starts_with("draining"), "{why:?}");
        assert_eq!(m.ready.get(), 0);
    }

    #[tokio::test]
    async fn linger_waits_for_a_scrape_of_what_was_recorded() {
        let m = Arc::new(Metrics::default());
        // Nothing recorded: no wait, however long the limit.
        let t = Instant::now();
        m.linger(Duration::from_secs(60)).await;
        assert!(t.elapsed() < Duration::from_secs(5));

        // Recorded and scraped: no wait.
        m.requeued("shutdown", 1);
        m.render();
        let t = Instant::now();
        m.linger(Duration::from_secs(60)).await;
        assert!(t.elapsed() < Duration::from_secs(5));

        // Recorded after the last scrape: the scrape ends the wait, and it
        // renders the new value.
        m.requeued("shutdown", 2);
        let scraper = {
            let m = m.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                m.render()
            })
        };
        let t = Instant::now();
        m.linger(Duration::from_secs(60)).await;
        assert!(t.elapsed() < Duration::from_secs(30));
        let text = scraper.await.unwrap();
        assert!(
            text.contains("sandq_jobs_requeued_total{reason=\"shutdown\"} 3"),
            "{text}"
        );

        // No scrape: the limit ends it.
        m.requeued("shutdown", 1);
        let t = Instant::now();
        m.linger(Duration::from_millis(100)).await;
        assert!(t.elapsed() >= Duration::from_millis(100));
        // And zero turns it off.
        m.linger(Duration::ZERO).await;
    }
}

//! The only module that knows both the queue and the runner: fetch, run, ack.
//!
//! One fetch loop takes a job when fewer than `concurrency + prefetch` are
//! held (so the rest wait in Redis, where another worker can take them), then
//! hands it to a task that validates it, waits for one of the `concurrency`
//! run slots, counts the delivery, runs it on a blocking thread, and delivers
//! the result. The slot is free again once the process is gone, while the
//! result is still on its way; with `--prefetch`, the next job is taken
//! while the slots are busy too. Redis errors never end the worker: it backs
//! off (capped, exponential), reports not-ready, keeps running the jobs it
//! holds and retries their results.
//!
//! Shutdown (SIGTERM/SIGINT): stop fetching, give running jobs the grace
//! period, then kill what is left and hand those jobs back to the queue.

use crate::config::WorkerConfig;
use crate::job::{self, Job, JobError, JobResult, Status};
use crate::metrics::{Metrics, Readiness};
use crate::queue::{now_ms, Begin, Queue, QueueError};
use crate::runner::egress::EgressPolicy;
use crate::runner::pool::Pool;
use crate::runner::{Finished, Outcome, RunOptions, Runner};
use crate::sandbox::Sandbox;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, info_span, warn, Instrument};

/// How long one BLMOVE blocks; also the worst-case delay before shutdown is noticed.
const FETCH_BLOCK: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Queue(#[from] QueueError),
}

/// Everything a job task needs, shared.
struct Shared {
    cfg: WorkerConfig,
    queue: Queue,
    sandbox: Arc<Sandbox>,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    /// Read end of the kill switch: closing the write end stops every running job.
    kill_switch: OwnedFd,
    /// Egress policy for jobs with network, with this worker's own Redis and
    /// metrics addresses always refused.
    egress: Arc<EgressPolicy>,
    /// Run slots: interpreters running at once.
    running: Arc<Semaphore>,
    /// Fired on SIGTERM/SIGINT: a job still waiting for a run slot is handed back.
    shutdown: CancellationToken,
}

/// The configured egress policy plus the worker's own endpoints, refused.
fn egress_policy(cfg: &WorkerConfig) -> EgressPolicy {
    use std::net::ToSocketAddrs;
    let mut policy = cfg.settings.egress.clone();
    let redis_host = redis::IntoConnectionInfo::into_connection_info(cfg.redis_url.as_str())
        .ok()
        .and_then(|info| match info.addr() {
            redis::ConnectionAddr::Tcp(host, port)
            | redis::ConnectionAddr::TcpTls { host, port, .. } => Some(format!("{host}:{port}")),
            _ => None,
        });
    for endpoint in redis_host.iter().chain(cfg.metrics_addr.iter()) {
        if let Ok(addrs) = endpoint.to_socket_addrs() {
            policy.deny.extend(addrs);
        }
    }
    policy
}

/// Raw payloads this worker has taken and not finished with, and the job id
/// once known (a multiset: producers may push identical payloads).
#[derive(Default)]
struct InFlight(Mutex<Vec<(Vec<u8>, Option<String>)>>);

impl InFlight {
    fn add(&self, raw: &[u8]) {
        if let Ok(mut v) = self.0.lock() {
            v.push((raw.to_vec(), None));
        }
    }
    fn set_id(&self, raw: &[u8], id: &str) {
        if let Ok(mut v) = self.0.lock() {
            if let Some(e) = v.iter_mut().find(|(r, i)| r == raw && i.is_none()) {
                e.1 = Some(id.to_owned());
            }
        }
    }
    fn remove(&self, raw: &[u8]) {
        if let Ok(mut v) = self.0.lock() {
            if let Some(i) = v.iter().position(|(r, _)| r == raw) {
                v.swap_remove(i);
            }
        }
    }
    fn len(&self) -> usize {
        self.0.lock().map(|v| v.len()).unwrap_or(0)
    }
    fn take(&self) -> Vec<(Vec<u8>, Option<String>)> {
        self.0
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }
    /// Payloads in `listed` that no task of ours holds.
    fn orphans(&self, mut listed: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
        if let Ok(v) = self.0.lock() {
            for (raw, _) in v.iter() {
                if let Some(i) = listed.iter().position(|r| r == raw) {
                    listed.swap_remove(i);
                }
            }
        }
        listed
    }
}

/// Hand back jobs in our processing list that no task of ours is running.
async fn recover_orphans(shared: &Shared, in_flight: &InFlight) -> Result<(), QueueError> {
    let listed = shared.queue.processing_list().await?;
    for raw in in_flight.orphans(listed) {
        if shared.queue.requeue(&raw, None).await? {
            warn!("handed back a job taken during a lost connection");
        }
    }
    Ok(())
}

/// Capped exponential backoff.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Backoff {
        Backoff(BACKOFF_MIN)
    }
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        d
    }
    fn reset(&mut self) {
        self.0 = BACKOFF_MIN;
    }
}

/// Run the worker until `shutdown` fires and the drain is done.
pub async fn run(
    cfg: WorkerConfig,
    sandbox: Arc<Sandbox>,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let queue = Queue::new(&cfg.redis_url, &cfg.prefix, &cfg.worker_id)?;
    let (kill_r, kill_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| QueueError::Pool(format!("kill switch pipe: {e}")))?;
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        queue: queue.clone(),
        sandbox,
        pool,
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        kill_switch: kill_r,
        egress: Arc::new(egress_policy(&cfg)),
        running: Arc::new(Semaphore::new(cfg.concurrency)),
        shutdown: shutdown.clone(),
    });
    metrics.slots.set(cfg.concurrency as i64);
    // Jobs held at once: running, taken ahead, or delivering their result;
    // so also the bound on results waiting for Redis during an outage.
    let capacity = cfg.concurrency + cfg.prefetch;
    let held = Arc::new(Semaphore::new(capacity));
    let tracker = TaskTracker::new();
    let in_flight = Arc::new(InFlight::default());

    // Heartbeat and gauges go on through the drain, until deregistration:
    // a worker that stopped beating while it finishes jobs would be reaped.
    let background = CancellationToken::new();
    let beat = tokio::spawn(heartbeat(shared.clone(), background.clone()));
    let depths = tokio::spawn(depth_reporter(shared.clone(), background.clone()));

    // Register before taking anything, so a crash after the first fetch
    // always leaves a heartbeat for the reaper to notice expiring.
    let mut backoff = Backoff::new();
    let ttl = Duration::from_millis(cfg.heartbeat_ttl_ms);
    while let Err(e) = queue.heartbeat(ttl, "{}").await {
        redis_down(&shared, &e);
        sleep_or_cancel(backoff.next(), &shutdown).await;
        if shutdown.is_cancelled() {
            background.cancel();
            return Ok(());
        }
    }
    let mut conn = None;
    // After a lost connection, a BLMOVE may have moved a job whose reply we
    // never read: look for such orphans in our own processing list.
    let mut reconcile = true;
    info!(
        worker = %cfg.worker_id,
        queue = %queue.keys.queue(),
        concurrency = cfg.concurrency,
        prefetch = cfg.prefetch,
        "waiting for jobs"
    );
    while !shutdown.is_cancelled() {
        let permit = tokio::select! {
            p = held.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = shutdown.cancelled() => break,
        };
        if conn.is_none() {
            match queue.blocking_connection().await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    redis_down(&shared, &e);
                    sleep_or_cancel(backoff.next(), &shutdown).await;
                    continue;
                }
            }
        }
        if reconcile {
            match recover_orphans(&shared, &in_flight).await {
                Ok(()) => reconcile = false,
                Err(e) => {
                    redis_down(&shared, &e);
                    sleep_or_cancel(backoff.next(), &shutdown).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        // Not raced against shutdown: dropping a BLMOVE in flight could leave
        // a job moved but unseen. It returns within FETCH_BLOCK anyway.
        match queue.fetch(c, FETCH_BLOCK).await {
            Ok(Some(raw)) => {
                backoff.reset();
                redis_up(&shared);
                in_flight.add(&raw);
                let shared = shared.clone();
                let in_flight = in_flight.clone();
                tracker.spawn(async move {
                    handle(shared, raw, in_flight).await;
                    drop(permit);
                });
            }
            Ok(None) => {
                backoff.reset();
                redis_up(&shared);
            }
            Err(e) => {
                redis_down(&shared, &e);
                conn = None;
                reconcile = true;
                sleep_or_cancel(backoff.next(), &shutdown).await;
            }
        }
    }

    // Drain.
    tracker.close();
    let grace = Duration::from_millis(cfg.shutdown_grace_ms);
    info!(
        held = capacity - held.available_permits(),
        running = cfg.concurrency - shared.running.available_permits(),
        grace_ms = cfg.shutdown_grace_ms,
        "shutting down: no new jobs"
    );
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(
            jobs = in_flight.len(),
            "grace period over: stopping the jobs still running and handing them back"
        );
        // Closing the kill switch stops every running job; their tasks see
        // `cancelled`, deliver nothing and leave their entry in `in_flight`.
        drop(kill_w);
        tracker.wait().await;
    }
    // What is left in `in_flight` was stopped by the drain: killed after the
    // grace period, or taken ahead and never started.
    let mut n = 0;
    for (raw, id) in in_flight.take() {
        match queue.requeue(&raw, id.as_deref()).await {
            Ok(true) => n += 1,
            Ok(false) => {}
            Err(e) => {
                error!(error = %e, "could not hand a job back; the reaper will recover it")
            }
        }
    }
    metrics.requeued("shutdown", n);
    if n > 0 {
        info!(requeued = n, "jobs handed back to the queue");
    }
    background.cancel();
    let _ = tokio::join!(beat, depths);
    match queue.deregister().await {
        Ok(0) => info!("deregistered"),
        Ok(n) => info!(
            requeued = n,
            "deregistered; handed back jobs left in the processing list"
        ),
        Err(e) => warn!(error = %e, "could not deregister; the reaper will clean up"),
    }
    Ok(())
}

fn redis_down(shared: &Shared, e: &QueueError) {
    shared.metrics.redis_error(e.op());
    if shared.readiness.redis_failed(&e.to_string()) {
        error!(error = %e, "Redis failing: not ready; retrying with backoff");
    } else {
        debug!(error = %e, "Redis still failing");
    }
}

fn redis_up(shared: &Shared) {
    // Ready only once Redis has answered for a while without a failure (see
    // `Readiness`), so this logs once per recovery, not at every success.
    if shared.readiness.redis_succeeded() {
        info!("Redis answering");
    }
}

/// Run a Redis operation until it succeeds, backing off between tries. For
/// what a job must not lose (its result, its dead letter): the job is safe in
/// the processing list meanwhile, and stays held (no new job is taken in its
/// place), which bounds how much waits this way.
async fn until_done<T, F, Fut>(shared: &Shared, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, QueueError>>,
{
    let mut backoff = Backoff::new();
    loop {
        match op().await {
            Ok(v) => {
                redis_up(shared);
                return v;
            }
            Err(e) => {
                redis_down(shared, &e);
                tokio::time::sleep(backoff.next()).await;
            }
        }
    }
}

async fn sleep_or_cancel(d: Duration, token: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = token.cancelled() => {}
    }
}

/// Beat, then reap: every worker runs the (atomic, idempotent) reaper, so no
/// leader is needed. The first beat is sent before the first fetch can be
/// acknowledged, so a worker is never reaped for want of one.
async fn heartbeat(shared: Arc<Shared>, shutdown: CancellationToken) {
    let every = Duration::from_millis(shared.cfg.heartbeat_ms);
    let ttl = Duration::from_millis(shared.cfg.heartbeat_ttl_ms);
    let info = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "concurrency": shared.cfg.concurrency,
        "pid": std::process::id(),
    })
    .to_string();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if let Err(e) = shared.queue.heartbeat(ttl, &info).await {
            redis_down(&shared, &e);
            continue;
        }
        match shared.queue.reap(ttl).await {
            Ok((0, _)) => {}
            Ok((moved, reaped)) => {
                warn!(
                    jobs = moved,
                    workers = reaped,
                    "reaped the jobs of dead workers back onto the queue"
                );
                shared.metrics.requeued("reaped", moved);
            }
            Err(e) => redis_down(&shared, &e),
        }
    }
}

/// Refresh the queue-depth gauges and check Redis every few seconds.
async fn depth_reporter(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        for language in crate::job::Language::ALL {
            let idle = shared
                .pool
                .sizes()
                .iter()
                .filter(|((l, _), _)| *l == language)
                .map(|(_, n)| n)
                .sum();
            shared.metrics.pool_size(language, idle);
        }
        match shared.queue.depths().await {
            Ok((q, d, p)) => {
                redis_up(&shared);
                shared.metrics.queue_depths(q, d, p);
            }
            Err(e) => redis_down(&shared, &e),
        }
    }
}

/// Deliver a result, retrying through Redis outages; results are never dropped
/// while the worker lives. Results of jobs that ran (or were given up on) are
/// remembered under the job id; rejections are not.
async fn deliver(shared: &Shared, raw: &[u8], result: &JobResult, reply_key: &str, ttl_s: u64) {
    let remember = result.status != Status::Rejected;
    push_result(
        shared,
        raw,
        &result.id,
        &result.to_json(),
        reply_key,
        ttl_s,
        remember,
    )
    .await;
}

async fn push_result(
    shared: &Shared,
    raw: &[u8],
    id: &str,
    json: &str,
    reply_key: &str,
    ttl_s: u64,
    remember: bool,
) {
    let first = until_done(shared, || {
        shared
            .queue
            .complete(raw, id, reply_key, json, ttl_s, remember)
    })
    .await;
    if !first {
        info!("a result for this id was already delivered; this one is dropped");
    }
}

async fn handle(shared: Arc<Shared>, raw: Vec<u8>, in_flight: Arc<InFlight>) {
    if handle_job(&shared, &raw, &in_flight).await == Done::Finished {
        in_flight.remove(&raw);
    }
}

#[derive(PartialEq)]
enum Done {
    /// The payload left the processing list (result, rejection, dead letter).
    Finished,
    /// Stopped by the drain; the entry stays in `InFlight` to be handed back.
    Stopped,
}

async fn handle_job(shared: &Arc<Shared>, raw: &[u8], in_flight: &InFlight) -> Done {
    let taken = Instant::now();
    let cfg = shared.cfg.clone();
    let job = match job::parse(raw, &cfg.settings.limits) {
        Ok(job) => job,
        Err(JobError::Unreadable(reason)) => {
            warn!(%reason, bytes = raw.len(), "payload is not a job: dead-lettered");
            until_done(shared, || shared.queue.dead_letter(raw, &reason, None)).await;
            shared.metrics.dead_letter("unreadable");
            return Done::Finished;
        }
        Err(JobError::Invalid {
            id,
            reply_to,
            message,
        }) => {
            let reply_key = reply_to
                .filter(|k| shared.queue.keys.reply_key_allowed(k))
                .unwrap_or_else(|| shared.queue.keys.result(&id));
            info!(job_id = %id, error = %message, "job rejected");
            let result = JobResult::not_run(&id, Status::Rejected, message, &cfg.worker_id);
            deliver(
                shared,
                raw,
                &result,
                &reply_key,
                cfg.settings.limits.default_result_ttl_s,
            )
            .await;
            shared.metrics.job_finished("unknown", Status::Rejected);
            return Done::Finished;
        }
    };
    let span = info_span!("job", job_id = %job.id, language = %job.language);
    let cfg = &cfg;
    async move {
        let reply_key = match &job.reply_to {
            Some(k) if !shared.queue.keys.reply_key_allowed(k) => {
                let result = JobResult::not_run(
                    &job.id,
                    Status::Rejected,
                    format!("field `reply_to`: {k:?} is one of sandq's own keys"),
                    &cfg.worker_id,
                );
                let fallback = shared.queue.keys.result(&job.id);
                deliver(shared, raw, &result, &fallback, job.result_ttl_s).await;
                shared.metrics.job_finished(job.language.as_str(), Status::Rejected);
                return Done::Finished;
            }
            Some(k) => k.clone(),
            None => shared.queue.keys.result(&job.id),
        };
        // A job taken ahead waits here for a run slot; if the drain starts
        // first, it is handed back without running. Its delivery is counted
        // only once it has a slot: a prefetched job has not run, and must not
        // be blamed if another job takes the worker down.
        let slot = tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => return Done::Stopped,
            p = shared.running.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        if reject_if_expired(shared, raw, &job, &reply_key).await {
            return Done::Finished;
        }
        // Count the delivery (or find the id's stored result).
        let attempt = match until_done(shared, || shared.queue.begin(&job.id)).await {
            Begin::Run { attempt } => attempt.max(1),
            Begin::Answered(stored) => {
                // One result per job id: this id has had its result (this is
                // a re-delivery of a job that was answered, or a new push
                // reusing the id). Not run, nothing pushed: the remembering
                // push finds the result stored and only drops the job.
                info!("this id already has its result; not run again");
                push_result(shared, raw, &job.id, &stored, &reply_key, job.result_ttl_s, true).await;
                return Done::Finished;
            }
        };
        if attempt > cfg.max_attempts {
            let reason = format!(
                "delivered {attempt} times, more than max_attempts {}: the job keeps killing its worker",
                cfg.max_attempts
            );
            warn!(attempt, "poison job: dead-lettered");
            until_done(shared, || shared.queue.dead_letter(raw, &reason, Some(&job.id))).await;
            shared.metrics.dead_letter("max_attempts");
            let mut result = JobResult::not_run(&job.id, Status::InternalError, reason, &cfg.worker_id);
            result.attempt = attempt;
            deliver(shared, raw, &result, &reply_key, job.result_ttl_s).await;
            shared.metrics.job_finished(job.language.as_str(), Status::InternalError);
            return Done::Finished;
        }
        if let Some(at) = job.enqueued_at_ms {
            shared
                .metrics
                .queue_waited(job.language, Duration::from_millis(now_ms().saturating_sub(at)));
        }

        in_flight.set_id(raw, &job.id);
        shared.metrics.in_flight.inc();
        let started = Instant::now();
        let finished = run_blocking(shared, job.clone()).await;
        shared.metrics.in_flight.dec();
        // The kernel tears the process down while the result goes out (see
        // the join below).
        let (outcome, teardown) = match finished {
            Ok(Finished { outcome, teardown }) => (Ok(outcome), Some(teardown)),
            Err(e) => (Err(e), None),
        };
        let teardown = teardown.map(|t| tokio::task::spawn_blocking(move || drop(t)));
        if outcome.as_ref().is_ok_and(|o| o.cancelled) {
            // Stopped by the drain, which hands it back to the queue.
            settle(teardown).await;
            return Done::Stopped;
        }
        let result = match outcome {
            Ok(o) => {
                record(shared, &job, &o);
                to_result(&job, o, &cfg.worker_id, attempt)
            }
            Err(e) => {
                error!(error = %e, "the sandbox could not run the job");
                let mut r = JobResult::not_run(
                    &job.id,
                    Status::InternalError,
                    format!("the sandbox could not run the job: {e}"),
                    &cfg.worker_id,
                );
                r.attempt = attempt;
                r.language = Some(job.language.as_str());
                r.duration_ms = started.elapsed().as_millis() as u64;
                r
            }
        };
        shared.metrics.job_finished(job.language.as_str(), result.status);
        info!(
            status = result.status.as_str(),
            duration_ms = result.duration_ms,
            stdout_bytes = result.stdout.len(),
            stderr_bytes = result.stderr.len(),
            "job finished"
        );
        // The run slot (and the uid it stands for) is free once the process
        // is gone, whether or not the result is delivered yet: the next job
        // starts meanwhile. The job stays held (see `held`) until delivered.
        let ran = Instant::now();
        let free_slot = async {
            settle(teardown).await;
            drop(slot);
            ran.elapsed()
        };
        let deliver = async {
            deliver(shared, raw, &result, &reply_key, job.result_ttl_s).await;
            ran.elapsed()
        };
        let (settled, delivered) = tokio::join!(free_slot, deliver);
        debug!(
            before_run_ms = (started - taken).as_secs_f64() * 1e3,
            run_ms = (ran - started).as_secs_f64() * 1e3,
            deliver_ms = delivered.as_secs_f64() * 1e3,
            settle_ms = settled.as_secs_f64() * 1e3,
            "where the time went"
        );
        Done::Finished
    }
    .instrument(span)
    .await
}

/// Wait for a run's teardown (see `runner::Teardown`) to be done.
async fn settle(teardown: Option<tokio::task::JoinHandle<()>>) {
    if let Some(t) = teardown {
        if let Err(e) = t.await {
            error!(error = %e, "a job's teardown failed");
        }
    }
}

/// A job past its `expires_at_ms` is answered `rejected` instead of run.
async fn reject_if_expired(shared: &Shared, raw: &[u8], job: &Job, reply_key: &str) -> bool {
    if job.expires_at_ms.is_none_or(|at| now_ms() <= at) {
        return false;
    }
    let result = JobResult::not_run(
        &job.id,
        Status::Rejected,
        "expired before it started".into(),
        &shared.cfg.worker_id,
    );
    info!("expired before it started");
    deliver(shared, raw, &result, reply_key, job.result_ttl_s).await;
    shared
        .metrics
        .job_finished(job.language.as_str(), Status::Rejected);
    true
}

async fn run_blocking(shared: &Arc<Shared>, job: Job) -> Result<Finished, String> {
    let s = shared.clone();
    tokio::task::spawn_blocking(move || {
        let opts = RunOptions {
            output_limit: s.cfg.settings.output_limit,
            learn: false,
            cancel: Some(s.kill_switch.as_raw_fd()),
            egress: s.egress.clone(),
        };
        let runner = Runner {
            sandbox: &s.sandbox,
        };
        // Warm path when a pre-started interpreter fits, cold otherwise.
        let warm = s.pool.take(&job);
        s.metrics.pool(job.language, warm.is_some());
        let outcome = match warm {
            Some(started) => {
                let outcome = runner.finish(started, &job, &opts);
                s.pool.replenish();
                outcome
            }
            None => runner.run(&job, &opts),
        };
        outcome.map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(format!("the run thread failed: {e}")))
}

fn record(shared: &Shared, job: &Job, o: &Outcome) {
    let m = &shared.metrics;
    m.job_ran(
        job.language,
        o.duration,
        o.spawn_duration,
        o.usage.cpu_ms,
        o.usage.max_rss_kb,
    );
    if let Some(v) = &o.violation {
        m.violation(job.language, &v.syscall);
    }
    if o.stdout_truncated {
        m.truncated("stdout");
    }
    if o.stderr_truncated {
        m.truncated("stderr");
    }
}

/// The wire result for a run.
pub fn to_result(job: &Job, o: Outcome, worker: &str, attempt: u32) -> JobResult {
    JobResult {
        id: job.id.clone(),
        status: o.status,
        exit_code: o.exit_code,
        signal: o.signal,
        stdout: o.stdout,
        stderr: o.stderr,
        stdout_truncated: o.stdout_truncated,
        stderr_truncated: o.stderr_truncated,
        error: o.error,
        violation: o.violation,
        duration_ms: o.duration.as_millis() as u64,
        cpu_ms: Some(o.usage.cpu_ms),
        max_rss_kb: Some(o.usage.max_rss_kb),
        language: Some(job.language.as_str()),
        worker: worker.to_owned(),
        attempt,
    }
}

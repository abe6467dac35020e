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
//! Errors Redis cannot fix by waiting (a script error, a key of the wrong
//! type) are not retried: the job ends in an `internal_error` result to its
//! default key plus a dead-letter entry (see [`QueueError::is_outage`]).
//!
//! A worker's id is its own: it refuses to start while another process holds
//! the id's live heartbeat, and stops if it ever finds the id taken. It reaps
//! dead workers only after it has itself been connected for a heartbeat TTL,
//! so that after an outage every live worker has beaten again first.
//!
//! Shutdown (SIGTERM/SIGINT): stop fetching, give running jobs the grace
//! period, then kill what is left and hand those jobs back to the queue. The
//! drain ends at the grace period whatever Redis does: results that could
//! not be delivered by then stay in Redis (the job is in the processing list)
//! for the reaper.

use crate::config::WorkerConfig;
use crate::job::{self, Job, JobError, JobResult, Status};
use crate::metrics::{Metrics, Readiness};
use crate::queue::{Begin, Completed, Completion, Queue, QueueError, Reply};
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

/// How long one BLMOVE blocks; also the usual delay before shutdown is noticed.
const FETCH_BLOCK: Duration = Duration::from_secs(1);
/// How often the processing list is checked for jobs no task holds.
const RECONCILE_EVERY: Duration = Duration::from_secs(30);
/// After the grace period: how long killed jobs and abandoned deliveries get
/// to wind down, and how long each of the last steps (hand-backs, the
/// heartbeat's last call, deregistration) may take, so that a drain ends
/// within the grace period plus four of these whatever Redis does.
const WIND_DOWN: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("worker id {id:?} is held by a live worker ({holder}); give this one another --worker-id, or wait for that heartbeat to expire")]
    IdInUse { id: String, holder: String },
    #[error("worker id {id:?} was taken by another process ({holder}) while this one was cut off; stopped without touching its jobs")]
    IdLost { id: String, holder: String },
    #[error("Redis {0} is too old: sandq needs 6.2 or later (BLMOVE); 7.0 or later is what it is tested with")]
    RedisTooOld(String),
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
    /// Fired when the drain's grace period is over: Redis calls still being
    /// retried give up (the job stays in the processing list, in Redis).
    abandon: CancellationToken,
    /// Set when another process took this worker's id.
    lost_id: Mutex<Option<String>>,
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

/// Claim the worker id (refused while another live process holds it), then
/// learn what this Redis allows. `false` when shutdown came first.
async fn claim_id(shared: &Shared) -> Result<bool, WorkerError> {
    let ttl = Duration::from_millis(shared.cfg.heartbeat_ttl_ms);
    let mut backoff = Backoff::new();
    let mut claimed = false;
    loop {
        let step = if claimed {
            shared.queue.read_server().await.map(Some)
        } else {
            shared.queue.heartbeat(ttl).await.map(|ours| {
                claimed = ours;
                None
            })
        };
        match step {
            Ok(Some(server)) => {
                redis_up(shared);
                check_server(&server)?;
                return Ok(true);
            }
            Ok(None) if claimed => redis_up(shared),
            Ok(None) => {
                let holder = shared.queue.id_holder().await.ok().flatten();
                return Err(WorkerError::IdInUse {
                    id: shared.cfg.worker_id.clone(),
                    holder: holder.unwrap_or_else(|| "unknown".into()),
                });
            }
            Err(e) => {
                redis_failed(shared, &e);
                sleep_or_cancel(backoff.next(), &shared.shutdown).await;
                if shared.shutdown.is_cancelled() {
                    return Ok(false);
                }
            }
        }
    }
}

/// What the queue's guarantees need of Redis: 6.2 for `BLMOVE`, and no
/// eviction (an evicted heartbeat gets a live worker reaped, an evicted done
/// marker a second result, an evicted queue its jobs lost).
fn check_server(server: &crate::queue::Server) -> Result<(), WorkerError> {
    let version: Vec<u32> = server
        .version
        .split('.')
        .map(|p| p.parse().unwrap_or(0))
        .collect();
    if !version.is_empty() && version < vec![6, 2] {
        return Err(WorkerError::RedisTooOld(server.version.clone()));
    }
    match server.eviction.as_deref() {
        None | Some("noeviction") => {}
        Some(policy) => error!(
            policy,
            "Redis may evict keys (maxmemory-policy is not noeviction): heartbeats, done \
             markers and queued jobs can be lost under memory pressure; set it to noeviction"
        ),
    }
    info!(
        version = %server.version,
        proto_max_bulk_len = server.max_bulk,
        eviction = server.eviction.as_deref().unwrap_or("unknown"),
        "Redis"
    );
    Ok(())
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
        abandon: CancellationToken::new(),
        lost_id: Mutex::new(None),
    });
    metrics.slots.set(cfg.concurrency as i64);

    // Claim the id before taking anything, so a crash after the first fetch
    // always leaves a heartbeat for the reaper to notice expiring.
    if !claim_id(&shared).await? {
        return Ok(());
    }

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

    let mut backoff = Backoff::new();
    let mut conn = None;
    // After a lost connection, a BLMOVE may have moved a job whose reply we
    // never read: look for such orphans in our own processing list. At
    // start-up this hands back what an earlier process with this id left,
    // and it is done every RECONCILE_EVERY too (a job no task holds, however
    // it got there, is not stranded in a live worker's list). Here, between
    // fetches, no BLMOVE is in flight whose job is not in `in_flight` yet.
    let mut reconcile = true;
    let mut reconciled = Instant::now();
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
                    redis_failed(&shared, &e);
                    sleep_or_cancel(backoff.next(), &shutdown).await;
                    continue;
                }
            }
        }
        if reconcile || reconciled.elapsed() >= RECONCILE_EVERY {
            match recover_orphans(&shared, &in_flight).await {
                Ok(()) => (reconcile, reconciled) = (false, Instant::now()),
                Err(e) => {
                    redis_failed(&shared, &e);
                    sleep_or_cancel(backoff.next(), &shutdown).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        // Not raced against shutdown: dropping a BLMOVE in flight could leave
        // a job moved but unseen. It returns within FETCH_BLOCK, or fails
        // soon after on a connection that went silent.
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
                redis_failed(&shared, &e);
                conn = None;
                reconcile = true;
                sleep_or_cancel(backoff.next(), &shutdown).await;
            }
        }
    }

    drain(
        &shared,
        &tracker,
        kill_w,
        &in_flight,
        capacity - held.available_permits(),
    )
    .await;
    background.cancel();
    // Each is at most one Redis call from seeing the cancellation.
    let _ = tokio::time::timeout(WIND_DOWN, async { tokio::join!(beat, depths) }).await;
    let lost = shared.lost_id.lock().ok().and_then(|l| l.clone());
    if let Some(holder) = lost {
        return Err(WorkerError::IdLost {
            id: cfg.worker_id.clone(),
            holder,
        });
    }
    match tokio::time::timeout(WIND_DOWN, queue.deregister()).await {
        Ok(Ok(Some(0))) => info!("deregistered"),
        Ok(Ok(Some(n))) => info!(
            requeued = n,
            "deregistered; handed back jobs left in the processing list"
        ),
        Ok(Ok(None)) => warn!("another process holds this worker id now; left its keys alone"),
        Ok(Err(e)) => warn!(error = %e, "could not deregister; the reaper will clean up"),
        Err(_) => {
            warn!("Redis did not answer the deregistration in time; the reaper will clean up")
        }
    }
    Ok(())
}

/// Stop taking jobs; let running ones finish within the grace period; then
/// stop the rest and hand back what was stopped. Bounded: the grace period
/// plus [`WIND_DOWN`] twice, whatever Redis does.
async fn drain(
    shared: &Shared,
    tracker: &TaskTracker,
    kill_switch: OwnedFd,
    in_flight: &InFlight,
    held: usize,
) {
    tracker.close();
    let grace = Duration::from_millis(shared.cfg.shutdown_grace_ms);
    info!(
        held,
        running = shared.cfg.concurrency - shared.running.available_permits(),
        grace_ms = shared.cfg.shutdown_grace_ms,
        "shutting down: no new jobs"
    );
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(
            jobs = in_flight.len(),
            "grace period over: stopping the jobs still running and handing them back"
        );
        // Closing the kill switch stops every running job; their tasks see
        // `cancelled`, deliver nothing and leave their entry in `in_flight`.
        // Deliveries still waiting for Redis give up the same way.
        drop(kill_switch);
        shared.abandon.cancel();
        if tokio::time::timeout(WIND_DOWN, tracker.wait())
            .await
            .is_err()
        {
            warn!("some jobs did not wind down in time");
        }
    }
    // What is left in `in_flight` was stopped by the drain: killed after the
    // grace period, taken ahead and never started, or finished with a
    // result Redis did not take in time.
    if shared.lost_id.lock().is_ok_and(|l| l.is_some()) {
        // The id's processing list is another process's now.
        return;
    }
    let left = in_flight.take();
    let (mut requeued, mut stranded) = (0, 0);
    let hand_back = async {
        for (raw, id) in &left {
            match shared.queue.requeue(raw, id.as_deref()).await {
                Ok(true) => requeued += 1,
                Ok(false) => {}
                Err(e) => {
                    redis_failed(shared, &e);
                    stranded += 1;
                }
            }
        }
    };
    if tokio::time::timeout(WIND_DOWN, hand_back).await.is_err() {
        stranded = left.len() - requeued;
    }
    shared.metrics.requeued("shutdown", requeued as u64);
    if requeued > 0 {
        info!(requeued, "jobs handed back to the queue");
    }
    if stranded > 0 {
        warn!(
            jobs = stranded,
            "Redis is unreachable: these jobs stay in this worker's processing list, where the reaper finds them"
        );
    }
}

/// A Redis call failed. An outage makes the worker not ready (until Redis
/// answers again for a while); an error that waiting cannot fix (a key of
/// the wrong type, a refused permission) is counted and logged, but Redis
/// itself is up.
fn redis_failed(shared: &Shared, e: &QueueError) {
    shared.metrics.redis_error(e.op());
    if !e.is_outage() {
        warn!(error = %e, "Redis refused a call");
    } else if shared.readiness.redis_failed(&e.to_string()) {
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

/// Why a Redis operation a job needs did not happen.
#[derive(Debug)]
enum Undone {
    /// Redis answered with an error that retrying cannot fix.
    Refused(QueueError),
    /// The drain's grace period ended while Redis was still away.
    Abandoned,
}

/// Run a Redis operation a job must not lose (its start, its result, its
/// dead letter) through outages, backing off between tries. The job is safe
/// in the processing list meanwhile, and stays held (no new job is taken in
/// its place), which bounds how much waits this way. Errors that waiting
/// cannot fix end the retries at once.
async fn until_done<T, F, Fut>(shared: &Shared, mut op: F) -> Result<T, Undone>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, QueueError>>,
{
    let mut backoff = Backoff::new();
    loop {
        match op().await {
            Ok(v) => {
                redis_up(shared);
                return Ok(v);
            }
            Err(e) if e.is_outage() => {
                redis_failed(shared, &e);
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next()) => {}
                    _ = shared.abandon.cancelled() => return Err(Undone::Abandoned),
                }
            }
            Err(e) => {
                shared.metrics.redis_error(e.op());
                return Err(Undone::Refused(e));
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
/// leader is needed. The id was claimed before the first fetch, so a worker
/// is never reaped for want of a beat. A worker reaps only once it has been
/// connected for a whole TTL: after an outage every live worker gets to beat
/// again before anyone judges it dead.
async fn heartbeat(shared: Arc<Shared>, stop: CancellationToken) {
    let every = Duration::from_millis(shared.cfg.heartbeat_ms);
    let ttl = Duration::from_millis(shared.cfg.heartbeat_ttl_ms);
    // Since when the heartbeat has gone through every time. Only this
    // worker's own beats count: what other calls run into (a key someone
    // set to the wrong type, a telemetry read) says nothing of whether the
    // other workers could beat.
    let mut beating_since = Instant::now();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        match shared.queue.heartbeat(ttl).await {
            Ok(true) => {}
            Ok(false) => {
                let holder = shared.queue.id_holder().await.ok().flatten();
                let holder = holder.unwrap_or_else(|| "unknown".into());
                error!(%holder, "another process took this worker's id; stopping");
                if let Ok(mut lost) = shared.lost_id.lock() {
                    *lost = Some(holder);
                }
                shared.shutdown.cancel();
                return;
            }
            Err(e) => {
                redis_failed(&shared, &e);
                beating_since = Instant::now();
                continue;
            }
        }
        if beating_since.elapsed() < ttl {
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
            Err(e) => redis_failed(&shared, &e),
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
            Err(e) => redis_failed(&shared, &e),
        }
    }
}

/// How a job's last Redis step went.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Done {
    /// Its result (or rejection, or dead letter) is in Redis and the payload
    /// left the processing list.
    Delivered,
    /// Finished without a result of ours: the id was already answered,
    /// another worker holds the job now, or Redis refused even the fallback.
    Dropped,
    /// Stopped by the drain, or its result could not be delivered before the
    /// drain ended; the entry stays in `InFlight` to be handed back.
    Stopped,
}

/// Where a job's result goes and for how long.
struct Destination<'a> {
    raw: &'a [u8],
    id: &'a str,
    reply_key: &'a str,
    ttl_s: u64,
}

/// Deliver a result to a job this worker holds, through Redis outages, and
/// with it a dead-letter entry if given. A result Redis cannot take (an
/// error retrying cannot fix) becomes an `internal_error` result to the
/// job's default key plus a dead-letter entry; never an endless retry.
async fn deliver(
    shared: &Shared,
    to: &Destination<'_>,
    result: &mut JobResult,
    dead: Option<String>,
) -> Done {
    let e = match push(shared, to, result, dead).await {
        Ok(done) => return done,
        Err(e) => e,
    };
    error!(error = %e, "Redis refused the result; answering internal_error on the default key instead");
    let why = format!("the result could not be delivered: {e}");
    let mut failed = JobResult::not_run(
        to.id,
        Status::InternalError,
        why.clone(),
        &shared.cfg.worker_id,
    );
    failed.attempt = result.attempt;
    failed.language = result.language;
    let default_key = shared.queue.keys.result(to.id);
    let to = Destination {
        reply_key: &default_key,
        ..*to
    };
    let dead = shared.queue.dead_entry(to.raw, &why, Some(to.id));
    match push(shared, &to, &mut failed, Some(dead)).await {
        // What the client gets is not this result.
        Ok(Done::Delivered) => {
            shared.metrics.dead_letter("undeliverable");
            Done::Dropped
        }
        Ok(done) => done,
        Err(e) => {
            error!(error = %e, "Redis refused the fallback too; the job stays in the processing list");
            Done::Dropped
        }
    }
}

/// One try at `deliver`'s completion: `Err` when Redis refused it.
async fn push(
    shared: &Shared,
    to: &Destination<'_>,
    result: &mut JobResult,
    dead: Option<String>,
) -> Result<Done, QueueError> {
    let json = result.to_json_within(shared.queue.max_result_bytes());
    let if_unusable = JobResult::not_run(
        to.id,
        Status::Rejected,
        format!(
            "field `reply_to`: {:?} holds a value that is not a list; the result could not be pushed there",
            to.reply_key
        ),
        &shared.cfg.worker_id,
    )
    .to_json();
    let completion = Completion {
        raw: to.raw,
        id: Some(to.id),
        reply: Some(Reply {
            key: to.reply_key,
            json: &json,
            ttl_s: to.ttl_s,
            remember: result.status != Status::Rejected,
            status: result.status.as_str(),
            if_unusable: &if_unusable,
        }),
        dead,
        dead_max: shared.cfg.dead_letter_max,
    };
    let mut tries = 0;
    let pushed = until_done(shared, || {
        tries += 1;
        shared.queue.complete(&completion)
    });
    Ok(match pushed.await {
        // A try that failed on the client may have gone through on Redis:
        // then this one finds the job gone, and the result is in place.
        Ok((Completed::NotHeld, _)) if tries > 1 => {
            info!("an earlier try of this delivery went through");
            Done::Delivered
        }
        Ok((Completed::Undeliverable, _)) => {
            let why = format!(
                "the result could not be delivered: neither the reply key {:?} nor {:?} holds a list",
                to.reply_key,
                shared.queue.keys.result(to.id)
            );
            error!("{why}; dead-lettered");
            dead_letter(shared, to.raw, Some(to.id), &why, "undeliverable").await
        }
        Ok((outcome, trimmed)) => completed(shared, outcome, trimmed, to.reply_key),
        Err(Undone::Abandoned) => Done::Stopped,
        Err(Undone::Refused(e)) => return Err(e),
    })
}

/// Record a dead letter for a payload and drop it from the processing list:
/// one that is not a job, or whose result nothing could take. A payload
/// Redis refuses even this for stays in the processing list, where the
/// next reconciliation finds it; if that keeps failing, the log says so.
async fn dead_letter(
    shared: &Shared,
    raw: &[u8],
    id: Option<&str>,
    reason: &str,
    metric: &'static str,
) -> Done {
    let completion = Completion {
        raw,
        id,
        reply: None,
        dead: Some(shared.queue.dead_entry(raw, reason, id)),
        dead_max: shared.cfg.dead_letter_max,
    };
    match until_done(shared, || shared.queue.complete(&completion)).await {
        Ok((outcome, trimmed)) => {
            let done = completed(shared, outcome, trimmed, "");
            if done == Done::Delivered {
                shared.metrics.dead_letter(metric);
            }
            done
        }
        Err(Undone::Abandoned) => Done::Stopped,
        Err(Undone::Refused(e)) => {
            error!(error = %e, "Redis refused the dead letter; the payload stays in the processing list");
            Done::Dropped
        }
    }
}

fn completed(shared: &Shared, outcome: Completed, trimmed: u64, reply_key: &str) -> Done {
    if trimmed > 0 {
        shared.metrics.dead_letters_trimmed(trimmed);
    }
    match outcome {
        Completed::Pushed => Done::Delivered,
        Completed::Redirected => {
            warn!(
                reply_key,
                "the reply key is not a list: a `rejected` result went to the default key"
            );
            Done::Delivered
        }
        Completed::AlreadyAnswered => {
            info!("a result for this id was already delivered; this one is dropped");
            Done::Dropped
        }
        Completed::NotHeld => {
            warn!("this worker no longer holds the job (it was reaped and handed on); its result is dropped");
            Done::Dropped
        }
        // Nothing was written; only a dead-letter call gets here (its
        // default key is not looked at), so this does not happen.
        Completed::Undeliverable => Done::Dropped,
    }
}

/// Answer a job `rejected` without running it.
async fn reject(shared: &Shared, to: &Destination<'_>, language: &str, message: String) -> Done {
    info!(error = %message, "job rejected");
    let mut result = JobResult::not_run(to.id, Status::Rejected, message, &shared.cfg.worker_id);
    // Counted when decided, before the client can see it.
    shared.metrics.job_finished(language, Status::Rejected);
    deliver(shared, to, &mut result, None).await
}

async fn handle(shared: Arc<Shared>, raw: Vec<u8>, in_flight: Arc<InFlight>) {
    if handle_job(&shared, &raw, &in_flight).await != Done::Stopped {
        in_flight.remove(&raw);
    }
}

async fn handle_job(shared: &Arc<Shared>, raw: &[u8], in_flight: &InFlight) -> Done {
    let taken = Instant::now();
    let cfg = shared.cfg.clone();
    let job = match job::parse(raw, &cfg.settings.limits) {
        Ok(job) => job,
        Err(JobError::Unreadable(reason)) => {
            warn!(%reason, bytes = raw.len(), "payload is not a job: dead-lettered");
            return dead_letter(shared, raw, None, &reason, "unreadable").await;
        }
        Err(JobError::Invalid {
            id,
            reply_to,
            message,
        }) => {
            let reply_key = reply_to
                .filter(|k| shared.queue.keys.reply_key_allowed(k))
                .unwrap_or_else(|| shared.queue.keys.result(&id));
            let to = Destination {
                raw,
                id: &id,
                reply_key: &reply_key,
                ttl_s: cfg.settings.limits.default_result_ttl_s,
            };
            return reject(shared, &to, "unknown", message)
                .instrument(info_span!("job", job_id = %id))
                .await;
        }
    };
    let span = info_span!("job", job_id = %job.id, language = %job.language);
    let cfg = &cfg;
    async move {
        let language = job.language.as_str();
        let default_key = shared.queue.keys.result(&job.id);
        let (reply_key, refused) = match &job.reply_to {
            Some(k) if !shared.queue.keys.reply_key_allowed(k) => (default_key.clone(), Some(k)),
            Some(k) => (k.clone(), None),
            None => (default_key.clone(), None),
        };
        let to = Destination {
            raw,
            id: &job.id,
            reply_key: &reply_key,
            ttl_s: job.result_ttl_s,
        };
        if let Some(k) = refused {
            let why = format!("field `reply_to`: {k:?} is one of sandq's own keys");
            return reject(shared, &to, language, why).await;
        }
        // A job taken ahead waits here for a run slot; if the drain starts
        // first, it is handed back without running. Its delivery is counted
        // only once it has a slot: a prefetched job has not run, and must not
        // be blamed if another job takes the worker down.
        let slot = tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => return Done::Stopped,
            p = shared.running.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        // Count the delivery (or find the id answered, or its reply key unusable).
        let delivery = uuid::Uuid::new_v4().to_string();
        let begun = until_done(shared, || shared.queue.begin(raw, &job.id, &reply_key, &delivery));
        let (attempt, now_ms) = match begun.await {
            Ok(Begin::Run { attempt, now_ms }) => (attempt, now_ms),
            Ok(Begin::Answered) => {
                // One result per job id: this id has had its result (this is
                // a re-delivery of a job that was answered, or a new push
                // reusing the id). Not run, nothing pushed: only dropped.
                info!("this id already has its result; not run again");
                let drop_only = Completion { raw, id: Some(&job.id), reply: None, dead: None, dead_max: cfg.dead_letter_max };
                return match until_done(shared, || shared.queue.complete(&drop_only)).await {
                    Err(Undone::Abandoned) => Done::Stopped,
                    _ => Done::Dropped,
                };
            }
            Ok(Begin::NotHeld) => {
                // Reaped while it waited for a slot: another worker runs it.
                warn!("this worker no longer holds the job (it was reaped and handed on); not run");
                return Done::Dropped;
            }
            Ok(Begin::UnusableReplyKey { .. }) => {
                let to = Destination { reply_key: &default_key, ..to };
                let why = format!("field `reply_to`: {reply_key:?} holds a value that is not a list");
                return reject(shared, &to, language, why).await;
            }
            Err(Undone::Abandoned) => return Done::Stopped,
            Err(Undone::Refused(e)) => {
                error!(error = %e, "Redis refused to start the job");
                let mut result = JobResult::not_run(&job.id, Status::InternalError, format!("the job could not be started: {e}"), &cfg.worker_id);
                let dead = shared.queue.dead_entry(raw, &format!("the job could not be started: {e}"), Some(&job.id));
                let to = Destination { reply_key: &default_key, ..to };
                return deliver(shared, &to, &mut result, Some(dead)).await;
            }
        };
        // Expiry is judged on Redis' clock, the one producers can share.
        if job.expires_at_ms.is_some_and(|at| now_ms > at) {
            return reject(shared, &to, language, "expired before it started".into()).await;
        }
        if attempt > cfg.max_attempts {
            let reason = format!(
                "delivered {attempt} times, more than max_attempts {}: the job keeps killing its worker",
                cfg.max_attempts
            );
            warn!(attempt, "poison job: dead-lettered");
            let mut result = JobResult::not_run(&job.id, Status::InternalError, reason.clone(), &cfg.worker_id);
            result.attempt = attempt;
            let dead = shared.queue.dead_entry(raw, &reason, Some(&job.id));
            shared.metrics.dead_letter("max_attempts");
            shared.metrics.job_finished(language, Status::InternalError);
            return deliver(shared, &to, &mut result, Some(dead)).await;
        }
        if let Some(at) = job.enqueued_at_ms {
            shared
                .metrics
                .queue_waited(job.language, Duration::from_millis(now_ms.saturating_sub(at)));
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
            torn_down(teardown).await;
            return Done::Stopped;
        }
        let mut result = match outcome {
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
                r.language = Some(language);
                r.duration_ms = started.elapsed().as_millis() as u64;
                r
            }
        };
        // Counted when the run ends, before the client can see its result.
        shared.metrics.job_finished(language, result.status);
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
            torn_down(teardown).await;
            drop(slot);
            ran.elapsed()
        };
        let deliver = async {
            let done = deliver(shared, &to, &mut result, None).await;
            (done, ran.elapsed())
        };
        let (settled, (done, delivered)) = tokio::join!(free_slot, deliver);
        debug!(
            before_run_ms = (started - taken).as_secs_f64() * 1e3,
            run_ms = (ran - started).as_secs_f64() * 1e3,
            deliver_ms = delivered.as_secs_f64() * 1e3,
            settle_ms = settled.as_secs_f64() * 1e3,
            "where the time went"
        );
        done
    }
    .instrument(span)
    .await
}

/// Wait for a run's teardown (see `runner::Teardown`) to be done.
async fn torn_down(teardown: Option<tokio::task::JoinHandle<()>>) {
    if let Some(t) = teardown {
        if let Err(e) = t.await {
            error!(error = %e, "a job's teardown failed");
        }
    }
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

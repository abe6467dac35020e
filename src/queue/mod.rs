//! The Redis side: keys, fetching, results, dead letters. Nothing of processes.
//!
//! The protocol (documented for producers in README.md, "The wire contract"):
//! 1. a worker claims its id (`heartbeat.lua`: a live heartbeat key of another
//!    process with the same id makes it refuse to start);
//! 2. producers `RPUSH <p>:queue <job JSON>`;
//! 3. a worker with a free slot takes one with
//!    `BLMOVE <p>:queue <p>:processing:<worker> LEFT RIGHT <t>`, so a job in
//!    flight is always in Redis, never only in a worker's memory;
//! 4. it counts the delivery (`begin.lua`), unless the id already has a result;
//! 5. it pushes the result, or a dead-letter entry, and removes the job from
//!    its processing list in one Lua script (`complete.lua`), which writes
//!    only while the worker still holds the job and pushes only the first
//!    result for an id;
//! 6. every worker beats and reaps (`heartbeat.lua`, `reap.lua`) on Redis'
//!    clock: the jobs of a worker whose heartbeat expired go back to the queue.
//!
//! Every call has a deadline of its own, scaled to the bytes it sends
//! ([`deadline`]): the client library's fixed response timeout (500 ms) would
//! abort a large result half-sent, and retry it from scratch forever on a slow
//! link. A call past its deadline is an outage: its connection is dropped and
//! the call retried. Blocking commands run on a connection of their own:
//! a client timeout shorter than the block time makes the client give up
//! while the server still moves the job, and the job would sit in the
//! processing list with nobody running it. After such a timeout the worker
//! reconciles its processing list (see `worker`).

mod keys;

pub use keys::Keys;

use deadpool_redis::{Manager, Pool, Runtime};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ErrorKind, Script, ServerErrorKind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Largest bulk string Redis accepts unless configured otherwise
/// (`proto-max-bulk-len`).
pub const DEFAULT_MAX_BULK: usize = 512 * 1024 * 1024;
/// What any call may take, before the time its bytes need.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// The slowest link a call's bytes are allowed for: 1 MiB/s.
const SLOWEST_LINK: f64 = 1024.0 * 1024.0;
/// Longest a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a call that sends `bytes` may take before it counts as an outage.
pub fn deadline(bytes: usize) -> Duration {
    CALL_TIMEOUT + Duration::from_secs_f64(bytes as f64 / SLOWEST_LINK)
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("invalid Redis URL {url:?}: {source}")]
    Url {
        url: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("creating the Redis pool: {0}")]
    Pool(String),
    #[error("Redis {op}: {source}")]
    Redis {
        op: &'static str,
        #[source]
        source: redis::RedisError,
    },
    #[error("Redis {op}: no connection from the pool: {message}")]
    Connection { op: &'static str, message: String },
    #[error("Redis {op}: no answer within {after:?}")]
    Timeout { op: &'static str, after: Duration },
}

/// Every name [`QueueError::op`] can return: `sandq_redis_errors_total`
/// exports a series for each from start-up, so that a first failure shows as
/// an increase (a unit test below checks this list against the file).
pub const OPS: &[&str] = &[
    "connect",
    "fetch",
    "begin",
    "complete",
    "config",
    "requeue",
    "heartbeat",
    "reap",
    "deregister",
    "reconcile",
    "ping",
    "depth",
];

impl QueueError {
    /// The operation that failed, for the errors metric.
    pub fn op(&self) -> &'static str {
        match self {
            QueueError::Redis { op, .. }
            | QueueError::Connection { op, .. }
            | QueueError::Timeout { op, .. } => op,
            QueueError::Url { .. } | QueueError::Pool(_) => "connect",
        }
    }

    /// Whether waiting can fix this: Redis unreachable, slow, loading,
    /// out of memory, busy with a script, read-only during a failover. Errors
    /// that say the command itself cannot succeed (a script error, WRONGTYPE,
    /// a protocol limit, a bad argument, a missing permission) are not: retrying
    /// those would loop forever.
    pub fn is_outage(&self) -> bool {
        let QueueError::Redis { source, .. } = self else {
            // No connection at all, or no answer in time: Redis is away.
            return matches!(
                self,
                QueueError::Connection { .. } | QueueError::Pool(_) | QueueError::Timeout { .. }
            );
        };
        match source.kind() {
            ErrorKind::Io | ErrorKind::Parse | ErrorKind::AuthenticationFailed => true,
            // Redis before 7.0 wraps an error raised inside a script:
            // "ERR Error running script ...: -OOM command not allowed ...".
            ErrorKind::Server(ServerErrorKind::ResponseError) => {
                source.detail().is_some_and(|detail| {
                    detail.starts_with("Error running script")
                        && OUTAGE_CODES
                            .iter()
                            .chain(&["READONLY", "MASTERDOWN", "TRYAGAIN"])
                            .any(|code| detail.contains(&format!("-{code} ")))
                })
            }
            ErrorKind::Server(kind) => matches!(
                kind,
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ReadOnly
            ),
            ErrorKind::Extension => OUTAGE_CODES.contains(&source.code().unwrap_or("")),
            _ => false,
        }
    }
}

/// Error codes Redis answers while it cannot serve for now.
const OUTAGE_CODES: &[&str] = &["OOM", "BUSY", "NOREPLICAS", "MISCONF", "LOADING"];

fn redis_err(op: &'static str) -> impl FnOnce(redis::RedisError) -> QueueError {
    move |source| QueueError::Redis { op, source }
}

/// Redis' clock, in ms, from the reply to `TIME` inside a script.
pub type RedisTimeMs = u64;

/// A worker's handle on the queue.
#[derive(Clone)]
pub struct Queue {
    pub keys: Keys,
    pub worker_id: String,
    /// This process's heartbeat value: it names the process (host, pid, a
    /// random instance id), so that a second process with the same worker
    /// id is told apart and refused.
    instance: String,
    /// Largest result JSON Redis accepts (`proto-max-bulk-len`, read at
    /// start-up where allowed).
    max_bulk: Arc<AtomicUsize>,
    client: redis::Client,
    pool: Pool,
    /// One multiplexed connection, taken from the pool once and shared by
    /// every operation until one fails: a pool checkout first pings Redis (a
    /// round trip per operation), and a multiplexed connection serves any
    /// number of concurrent callers anyway.
    shared: Arc<Mutex<Option<MultiplexedConnection>>>,
    begin: Script,
    complete: Script,
    requeue: Script,
    heartbeat: Script,
    reap: Script,
    deregister: Script,
}

/// What `complete.lua` is asked to do for one job this worker holds.
pub struct Completion<'a> {
    /// The payload exactly as taken from the queue.
    pub raw: &'a [u8],
    /// The job id, when the payload had a readable one.
    pub id: Option<&'a str>,
    /// Where the result goes, and the result JSON (none for a payload that
    /// is only dead-lettered).
    pub reply: Option<Reply<'a>>,
    /// A dead-letter entry to record with it (see [`Queue::dead_entry`]).
    pub dead: Option<String>,
    /// Most entries the dead list keeps (oldest trimmed).
    pub dead_max: u64,
}

/// A result to push.
pub struct Reply<'a> {
    pub key: &'a str,
    pub json: &'a str,
    pub ttl_s: u64,
    /// Store a done marker (the status) under the id: only the first result
    /// for the id is pushed, and the id is not run again. Rejections are not
    /// remembered.
    pub remember: bool,
    pub status: &'a str,
    /// The `rejected` result that goes to the default key instead when the
    /// reply key holds something that is not a list.
    pub if_unusable: &'a str,
}

/// How a completion went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completed {
    /// The result was pushed to its reply key.
    Pushed,
    /// The id already had its result: nothing pushed, the job dropped.
    AlreadyAnswered,
    /// The reply key is not a list: the `rejected` result went to the
    /// default key instead.
    Redirected,
    /// This worker no longer holds the job (it was reaped and handed to
    /// another worker): nothing was written.
    NotHeld,
    /// Neither the reply key nor the default key can take a list: nothing
    /// was written (the caller dead-letters the job).
    Undeliverable,
}

impl Queue {
    pub fn new(url: &str, prefix: &str, worker_id: &str) -> Result<Queue, QueueError> {
        let client = redis::Client::open(url).map_err(|source| QueueError::Url {
            url: url.to_owned(),
            source,
        })?;
        // No response timeout in the client: each call brings its own (see
        // `deadline`).
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(None);
        let manager = Manager::new_with_config(url, config).map_err(|source| QueueError::Url {
            url: url.to_owned(),
            source,
        })?;
        let pool = Pool::builder(manager)
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| QueueError::Pool(e.to_string()))?;
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default();
        let instance = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "host": host,
            "pid": std::process::id(),
            "instance": uuid::Uuid::new_v4().to_string(),
        })
        .to_string();
        Ok(Queue {
            keys: Keys::new(prefix),
            worker_id: worker_id.to_owned(),
            instance,
            max_bulk: Arc::new(AtomicUsize::new(DEFAULT_MAX_BULK)),
            client,
            pool,
            shared: Arc::default(),
            begin: Script::new(include_str!("begin.lua")),
            complete: Script::new(include_str!("complete.lua")),
            requeue: Script::new(include_str!("requeue.lua")),
            heartbeat: Script::new(include_str!("heartbeat.lua")),
            reap: Script::new(include_str!("reap.lua")),
            deregister: Script::new(include_str!("deregister.lua")),
        })
    }

    async fn conn(&self, op: &'static str) -> Result<MultiplexedConnection, QueueError> {
        if let Some(conn) = self.shared.lock().ok().and_then(|c| c.clone()) {
            return Ok(conn);
        }
        let pooled = self.pool.get().await.map_err(|e| QueueError::Connection {
            op,
            message: e.to_string(),
        })?;
        let conn = deadpool_redis::Connection::take(pooled);
        if let Ok(mut shared) = self.shared.lock() {
            *shared = Some(conn.clone());
        }
        Ok(conn)
    }

    /// Run one call that sends about `bytes`, within its [`deadline`]. On
    /// an error or past the deadline the shared connection is dropped: the
    /// next call takes a fresh (pinged) one from the pool.
    async fn within<T>(
        &self,
        op: &'static str,
        bytes: usize,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, QueueError> {
        let after = deadline(bytes);
        let failed = match tokio::time::timeout(after, call).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(source)) => QueueError::Redis { op, source },
            Err(_) => QueueError::Timeout { op, after },
        };
        if let Ok(mut shared) = self.shared.lock() {
            *shared = None;
        }
        Err(failed)
    }

    /// A dedicated connection for blocking commands: no response timeout
    /// (the caller bounds each call).
    pub async fn blocking_connection(&self) -> Result<MultiplexedConnection, QueueError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(None);
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(redis_err("connect"))
    }

    /// Read what the worker needs to know of this Redis: `proto-max-bulk-len`
    /// (the largest argument it accepts, so that no result is built that it
    /// would refuse), its version and its eviction policy. Where `CONFIG` is
    /// not allowed (managed Redis, ACLs), the defaults are assumed.
    pub async fn read_server(&self) -> Result<Server, QueueError> {
        let mut conn = self.conn("config").await?;
        let mut config = redis::cmd("CONFIG");
        config
            .arg("GET")
            .arg("proto-max-bulk-len")
            .arg("maxmemory-policy");
        let reply: Result<Vec<String>, QueueError> = self
            .within("config", 0, config.query_async(&mut conn))
            .await;
        let settings = match reply {
            Ok(pairs) => pairs,
            Err(e) if e.is_outage() => return Err(e),
            Err(_) => Vec::new(),
        };
        let setting = |name: &str| {
            settings
                .chunks(2)
                .find(|kv| kv[0] == name)
                .and_then(|kv| kv.get(1).cloned())
        };
        let max_bulk = setting("proto-max-bulk-len")
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_MAX_BULK);
        self.max_bulk.store(max_bulk, Ordering::Relaxed);
        let mut conn = self.conn("config").await?;
        let mut info = redis::cmd("INFO");
        info.arg("server");
        let info: String = self
            .within("config", 0, info.query_async(&mut conn))
            .await?;
        let version = info
            .lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default();
        Ok(Server {
            version,
            max_bulk,
            eviction: setting("maxmemory-policy"),
        })
    }

    /// The largest result JSON to send: Redis' bulk limit less room for the
    /// rest of the call.
    pub fn max_result_bytes(&self) -> usize {
        self.max_bulk
            .load(Ordering::Relaxed)
            .saturating_sub(64 * 1024)
            .max(64 * 1024)
    }

    /// Take the next job, waiting up to `block`. `None` when the queue stayed
    /// empty. Bounded: a connection that went silent (a frozen Redis, a
    /// dropped NAT entry) fails after `block` plus a [`deadline`], and the
    /// caller reconciles (a job may have been moved without us seeing it).
    pub async fn fetch(
        &self,
        conn: &mut MultiplexedConnection,
        block: Duration,
    ) -> Result<Option<Vec<u8>>, QueueError> {
        let mut cmd = redis::cmd("BLMOVE");
        cmd.arg(self.keys.queue())
            .arg(self.keys.processing(&self.worker_id))
            .arg("LEFT")
            .arg("RIGHT")
            .arg(block.as_secs_f64());
        let after = block + deadline(0);
        match tokio::time::timeout(after, cmd.query_async(conn)).await {
            Ok(reply) => reply.map_err(redis_err("fetch")),
            Err(_) => Err(QueueError::Timeout { op: "fetch", after }),
        }
    }

    /// Start a delivery of job `id`, taken as `raw`, whose result goes to
    /// `reply_key`; `delivery` is unique to this fetch, so that a retried
    /// call counts the delivery once.
    pub async fn begin(
        &self,
        raw: &[u8],
        id: &str,
        reply_key: &str,
        delivery: &str,
    ) -> Result<Begin, QueueError> {
        let mut conn = self.conn("begin").await?;
        let mut call = self.begin.prepare_invoke();
        call.key(self.keys.attempts())
            .key(self.keys.done(id))
            .key(reply_key)
            .key(self.keys.processing(&self.worker_id))
            .arg(id)
            .arg(delivery)
            .arg(raw);
        let (attempt, done, state, now): (u32, Option<String>, u8, RedisTimeMs) = self
            .within("begin", raw.len(), call.invoke_async(&mut conn))
            .await?;
        Ok(match (done, state) {
            (Some(_), _) => Begin::Answered,
            (None, 0) => Begin::NotHeld,
            (None, 2) => Begin::UnusableReplyKey { now_ms: now },
            (None, _) => Begin::Run {
                attempt: attempt.max(1),
                now_ms: now,
            },
        })
    }

    /// Finish a job this worker holds: result, dead letter, or both, and the
    /// job leaves the processing list. Returns how it went and how many old
    /// dead-letter entries were trimmed to keep the list at its cap.
    pub async fn complete(&self, c: &Completion<'_>) -> Result<(Completed, u64), QueueError> {
        let mut conn = self.conn("complete").await?;
        let id = c.id.unwrap_or("");
        let default_key = self.keys.result(id);
        let mut call = self.complete.prepare_invoke();
        let (key, json, ttl_s, remember, status, if_unusable) = match &c.reply {
            Some(r) => (r.key, r.json, r.ttl_s, r.remember, r.status, r.if_unusable),
            None => (default_key.as_str(), "", 1, false, "", ""),
        };
        call.key(key)
            .key(self.keys.processing(&self.worker_id))
            .key(self.keys.done(id))
            .key(self.keys.attempts())
            .key(&default_key)
            .key(self.keys.dead())
            .arg(json)
            .arg(ttl_s)
            .arg(c.raw)
            .arg(id)
            .arg(if remember { "1" } else { "0" })
            .arg(status)
            .arg(if_unusable)
            .arg(c.dead.as_deref().unwrap_or(""))
            .arg(c.dead_max);
        let bytes = c.raw.len() + json.len() + c.dead.as_ref().map_or(0, String::len);
        let (outcome, trimmed): (i64, u64) = self
            .within("complete", bytes, call.invoke_async(&mut conn))
            .await?;
        let outcome = match outcome {
            1 => Completed::Pushed,
            0 => Completed::AlreadyAnswered,
            2 => Completed::Redirected,
            3 => Completed::Undeliverable,
            _ => Completed::NotHeld,
        };
        Ok((outcome, trimmed))
    }

    /// A dead-letter entry: `{"reason", "payload", "payload_bytes", "id",
    /// "worker", "at_ms"}`, with at most [`DEAD_PAYLOAD_BYTES`] of the payload
    /// (`payload_bytes` says how long it was), so that the dead list's
    /// memory is bounded by its cap times that.
    pub fn dead_entry(&self, raw: &[u8], reason: &str, id: Option<&str>) -> String {
        let mut kept = &raw[..raw.len().min(DEAD_PAYLOAD_BYTES)];
        // Cut at a character boundary where the payload is text.
        while let Err(e) = std::str::from_utf8(kept) {
            if e.error_len().is_some() {
                break;
            }
            kept = &kept[..e.valid_up_to()];
        }
        serde_json::json!({
            "reason": reason,
            "payload": String::from_utf8_lossy(kept),
            "payload_bytes": raw.len(),
            "id": id,
            "worker": self.worker_id,
            "at_ms": now_ms(),
        })
        .to_string()
    }

    /// Put a job back at the head of the queue, uncounted (shutdown).
    pub async fn requeue(&self, raw: &[u8], id: Option<&str>) -> Result<bool, QueueError> {
        let mut conn = self.conn("requeue").await?;
        let mut call = self.requeue.prepare_invoke();
        call.key(self.keys.queue())
            .key(self.keys.processing(&self.worker_id))
            .key(self.keys.attempts())
            .arg(raw)
            .arg(id.unwrap_or(""));
        let moved: i64 = self
            .within("requeue", raw.len(), call.invoke_async(&mut conn))
            .await?;
        Ok(moved == 1)
    }

    /// Claim this worker's id, or refresh the claim: heartbeat key (with
    /// `ttl`) and score in the registry, both on Redis' clock. False when
    /// another live process holds the id.
    pub async fn heartbeat(&self, ttl: Duration) -> Result<bool, QueueError> {
        let mut conn = self.conn("heartbeat").await?;
        let mut call = self.heartbeat.prepare_invoke();
        call.key(self.keys.worker(&self.worker_id))
            .key(self.keys.workers())
            .arg(&self.instance)
            .arg(ttl.as_millis() as u64)
            .arg(&self.worker_id);
        let ours: i64 = self
            .within("heartbeat", 0, call.invoke_async(&mut conn))
            .await?;
        Ok(ours == 1)
    }

    /// Who holds this worker's id now (the heartbeat value), if anyone.
    pub async fn id_holder(&self) -> Result<Option<String>, QueueError> {
        let mut conn = self.conn("heartbeat").await?;
        let mut get = redis::cmd("GET");
        get.arg(self.keys.worker(&self.worker_id));
        self.within("heartbeat", 0, get.query_async(&mut conn))
            .await
    }

    /// Move the jobs of workers whose heartbeat expired back to the queue.
    /// Returns (jobs moved, workers reaped).
    pub async fn reap(&self, stale_after: Duration) -> Result<(u64, u64), QueueError> {
        let mut conn = self.conn("reap").await?;
        let mut call = self.reap.prepare_invoke();
        call.key(self.keys.workers())
            .key(self.keys.queue())
            .arg(self.keys.prefix())
            .arg(stale_after.as_millis() as u64);
        self.within("reap", 0, call.invoke_async(&mut conn)).await
    }

    /// Leave cleanly: hand back what is left, drop heartbeat and
    /// registration. `None` when another process holds the id now (nothing
    /// is touched).
    pub async fn deregister(&self) -> Result<Option<u64>, QueueError> {
        let mut conn = self.conn("deregister").await?;
        let mut call = self.deregister.prepare_invoke();
        call.key(self.keys.processing(&self.worker_id))
            .key(self.keys.queue())
            .key(self.keys.worker(&self.worker_id))
            .key(self.keys.workers())
            .arg(&self.worker_id)
            .arg(&self.instance);
        let moved: i64 = self
            .within("deregister", 0, call.invoke_async(&mut conn))
            .await?;
        Ok(u64::try_from(moved).ok())
    }

    /// Everything in this worker's processing list.
    pub async fn processing_list(&self) -> Result<Vec<Vec<u8>>, QueueError> {
        let mut conn = self.conn("reconcile").await?;
        let mut lrange = redis::cmd("LRANGE");
        lrange
            .arg(self.keys.processing(&self.worker_id))
            .arg(0)
            .arg(-1);
        self.within("reconcile", 0, lrange.query_async(&mut conn))
            .await
    }

    /// Whether Redis answers a PING.
    pub async fn ping(&self) -> Result<(), QueueError> {
        let mut conn = self.conn("ping").await?;
        let ping = redis::cmd("PING");
        self.within("ping", 0, ping.query_async::<String>(&mut conn))
            .await
            .map(|_| ())
    }

    /// Lengths of the queue, the dead list and this worker's processing list.
    pub async fn depths(&self) -> Result<(u64, u64, u64), QueueError> {
        let mut conn = self.conn("depth").await?;
        let mut pipe = redis::pipe();
        pipe.llen(self.keys.queue())
            .llen(self.keys.dead())
            .llen(self.keys.processing(&self.worker_id));
        self.within("depth", 0, pipe.query_async(&mut conn)).await
    }
}

/// What the worker learned of its Redis at start-up.
#[derive(Debug)]
pub struct Server {
    pub version: String,
    pub max_bulk: usize,
    /// `maxmemory-policy`, where `CONFIG` is allowed.
    pub eviction: Option<String>,
}

/// Most bytes of a payload a dead-letter entry keeps.
pub const DEAD_PAYLOAD_BYTES: usize = 16 * 1024;

/// How a delivery starts.
#[derive(Debug)]
pub enum Begin {
    /// Run the job; this is delivery number `attempt`. `now_ms` is Redis' clock.
    Run { attempt: u32, now_ms: RedisTimeMs },
    /// The id already has its result: do not run it again.
    Answered,
    /// The reply key holds something that is not a list: the result could
    /// not be delivered there, so the job is rejected without running.
    UnusableReplyKey { now_ms: RedisTimeMs },
    /// This worker no longer holds the job (it was reaped while the job
    /// waited for a slot): another worker runs it.
    NotHeld,
}

/// The worker's clock, for what only informs (dead-letter entries).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error reply as Redis sends it, through the client's own parser.
    fn redis_error(reply: &str) -> QueueError {
        let value = redis::parse_redis_value(format!("-{reply}\r\n").as_bytes()).unwrap();
        let redis::Value::ServerError(e) = value else {
            panic!("{value:?} is not an error reply")
        };
        QueueError::Redis {
            op: "complete",
            source: e.into(),
        }
    }

    #[test]
    fn outages_are_told_from_errors_retrying_cannot_fix() {
        for reply in [
            "LOADING Redis is loading the dataset in memory",
            "OOM command not allowed when used memory > 'maxmemory'.",
            "BUSY Redis is busy running a script.",
            "MASTERDOWN Link with MASTER is down",
            "READONLY You can't write against a read only replica.",
            "TRYAGAIN Multiple keys request during rehashing of slot",
            "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist",
            "ERR Error running script (call to f_0123): @user_script:1: @user_script: 1: -OOM command not allowed when used memory > 'maxmemory'.",
        ] {
            assert!(redis_error(reply).is_outage(), "{reply}");
        }
        for reply in [
            "ERR Error running script (call to f_0123): @user_script:10: ERR invalid expire time in 'set' command",
            "WRONGTYPE Operation against a key holding the wrong kind of value",
            "ERR Protocol error: invalid bulk length",
            "NOSCRIPT No matching script. Please use EVAL.",
            "NOPERM this user has no permissions to run the 'evalsha' command",
        ] {
            assert!(!redis_error(reply).is_outage(), "{reply}");
        }
        let io = QueueError::Redis {
            op: "fetch",
            source: std::io::Error::from(std::io::ErrorKind::ConnectionReset).into(),
        };
        assert!(io.is_outage());
        let none = QueueError::Connection {
            op: "fetch",
            message: "refused".into(),
        };
        assert!(none.is_outage());
    }

    /// The string literals right after each of `calls` in `code`.
    fn names_after<'a>(code: &'a str, calls: &[&str]) -> Vec<&'a str> {
        let mut found = Vec::new();
        for call in calls {
            for (at, _) in code.match_indices(call) {
                let rest = &code[at + call.len()..];
                found.push(&rest[..rest.find('"').expect("closing quote")]);
            }
        }
        found
    }

    /// Every op name this file gives an error (the calls that build one, and
    /// the arms of `QueueError::op`) is in `OPS`, and nothing else is.
    #[test]
    fn every_op_name_is_listed() {
        let source = include_str!("mod.rs");
        let code = &source[..source.find("#[cfg(test)]").expect("this module")];
        let mut found = names_after(code, &["conn(\"", "failed(\"", "redis_err(\""]);
        let op_fn = &code[code.find("fn op(").expect("QueueError::op")..];
        let op_fn = &op_fn[..op_fn.find("\n    }\n").expect("end of fn op")];
        found.extend(names_after(op_fn, &["=> \""]));
        for name in &found {
            assert!(OPS.contains(name), "op {name:?} is not in OPS");
        }
        for name in OPS {
            assert!(
                found.contains(name),
                "OPS lists {name:?}, which no error uses"
            );
        }
        let mut unique = OPS.to_vec();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), OPS.len(), "OPS lists a name twice");
    }
}

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
//! Blocking commands run on a connection of their own with no client-side
//! response timeout: a client timeout shorter than the block time makes the
//! client give up while the server still moves the job, and the job would sit
//! in the processing list with nobody running it.

mod keys;

pub use keys::Keys;

use deadpool_redis::{Config as PoolConfig, Pool, Runtime};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ErrorKind, Script, ServerErrorKind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Largest bulk string Redis accepts unless configured otherwise
/// (`proto-max-bulk-len`).
pub const DEFAULT_MAX_BULK: usize = 512 * 1024 * 1024;

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
            QueueError::Redis { op, .. } | QueueError::Connection { op, .. } => op,
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
            // No connection at all (or no pool yet): Redis is away.
            return matches!(self, QueueError::Connection { .. } | QueueError::Pool(_));
        };
        match source.kind() {
            ErrorKind::Io | ErrorKind::Parse | ErrorKind::AuthenticationFailed => true,
            ErrorKind::Server(kind) => matches!(
                kind,
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::ReadOnly
            ),
            ErrorKind::Extension => matches!(
                source.code(),
                Some("OOM" | "BUSY" | "NOREPLICAS" | "MISCONF" | "LOADING")
            ),
            _ => false,
        }
    }
}

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
}

impl Queue {
    pub fn new(url: &str, prefix: &str, worker_id: &str) -> Result<Queue, QueueError> {
        let client = redis::Client::open(url).map_err(|source| QueueError::Url {
            url: url.to_owned(),
            source,
        })?;
        let pool = PoolConfig::from_url(url)
            .create_pool(Some(Runtime::Tokio1))
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

    /// `redis_err`, and the shared connection is dropped: the next operation
    /// takes a fresh (pinged) one from the pool.
    fn failed(&self, op: &'static str) -> impl FnOnce(redis::RedisError) -> QueueError + '_ {
        move |source| {
            if let Ok(mut shared) = self.shared.lock() {
                *shared = None;
            }
            QueueError::Redis { op, source }
        }
    }

    /// A dedicated connection for blocking commands: no response timeout.
    pub async fn blocking_connection(&self) -> Result<MultiplexedConnection, QueueError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(None);
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(redis_err("connect"))
    }

    /// Read `proto-max-bulk-len`, the largest argument Redis accepts, so that
    /// no result is built that Redis would refuse. Where `CONFIG` is not
    /// allowed (managed Redis, ACLs), Redis' default is assumed.
    pub async fn read_limits(&self) -> Result<usize, QueueError> {
        let mut conn = self.conn("config").await?;
        let reply: Result<Vec<String>, _> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("proto-max-bulk-len")
            .query_async(&mut conn)
            .await;
        let limit = match reply {
            Ok(pair) => pair
                .get(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or(DEFAULT_MAX_BULK),
            Err(e) => {
                let e = QueueError::Redis {
                    op: "config",
                    source: e,
                };
                if e.is_outage() {
                    return Err(e);
                }
                DEFAULT_MAX_BULK
            }
        };
        self.max_bulk.store(limit, Ordering::Relaxed);
        Ok(limit)
    }

    /// The largest result JSON to send: Redis' bulk limit less room for the
    /// rest of the call.
    pub fn max_result_bytes(&self) -> usize {
        self.max_bulk
            .load(Ordering::Relaxed)
            .saturating_sub(64 * 1024)
            .max(64 * 1024)
    }

    /// Take the next job, waiting up to `block`. `None` when the queue stayed empty.
    pub async fn fetch(
        &self,
        conn: &mut MultiplexedConnection,
        block: Duration,
    ) -> Result<Option<Vec<u8>>, QueueError> {
        redis::cmd("BLMOVE")
            .arg(self.keys.queue())
            .arg(self.keys.processing(&self.worker_id))
            .arg("LEFT")
            .arg("RIGHT")
            .arg(block.as_secs_f64())
            .query_async(conn)
            .await
            .map_err(redis_err("fetch"))
    }

    /// Start a delivery of job `id` whose result goes to `reply_key`;
    /// `delivery` is unique to this fetch, so that a retried call counts the
    /// delivery once.
    pub async fn begin(
        &self,
        id: &str,
        reply_key: &str,
        delivery: &str,
    ) -> Result<Begin, QueueError> {
        let mut conn = self.conn("begin").await?;
        let (attempt, done, reply_ok, now): (u32, Option<String>, u8, RedisTimeMs) = self
            .begin
            .key(self.keys.attempts())
            .key(self.keys.done(id))
            .key(reply_key)
            .arg(id)
            .arg(delivery)
            .invoke_async(&mut conn)
            .await
            .map_err(self.failed("begin"))?;
        Ok(match (done, reply_ok) {
            (Some(_), _) => Begin::Answered,
            (None, 0) => Begin::UnusableReplyKey { now_ms: now },
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
        match &c.reply {
            Some(r) => call
                .key(r.key)
                .key(self.keys.processing(&self.worker_id))
                .key(self.keys.done(id))
                .key(self.keys.attempts())
                .key(&default_key)
                .key(self.keys.dead())
                .arg(r.json)
                .arg(r.ttl_s)
                .arg(c.raw)
                .arg(id)
                .arg(if r.remember { "1" } else { "0" })
                .arg(r.status)
                .arg(r.if_unusable),
            None => call
                .key(&default_key)
                .key(self.keys.processing(&self.worker_id))
                .key(self.keys.done(id))
                .key(self.keys.attempts())
                .key(&default_key)
                .key(self.keys.dead())
                .arg("")
                .arg(1)
                .arg(c.raw)
                .arg(id)
                .arg("0")
                .arg("")
                .arg(""),
        };
        let (outcome, trimmed): (i64, u64) = call
            .arg(c.dead.as_deref().unwrap_or(""))
            .arg(c.dead_max)
            .invoke_async(&mut conn)
            .await
            .map_err(self.failed("complete"))?;
        let outcome = match outcome {
            1 => Completed::Pushed,
            0 => Completed::AlreadyAnswered,
            2 => Completed::Redirected,
            _ => Completed::NotHeld,
        };
        Ok((outcome, trimmed))
    }

    /// A dead-letter entry: `{"reason", "payload", "id", "worker", "at_ms"}`.
    pub fn dead_entry(&self, raw: &[u8], reason: &str, id: Option<&str>) -> String {
        serde_json::json!({
            "reason": reason,
            "payload": String::from_utf8_lossy(raw),
            "id": id,
            "worker": self.worker_id,
            "at_ms": now_ms(),
        })
        .to_string()
    }

    /// Put a job back at the head of the queue, uncounted (shutdown).
    pub async fn requeue(&self, raw: &[u8], id: Option<&str>) -> Result<bool, QueueError> {
        let mut conn = self.conn("requeue").await?;
        let moved: i64 = self
            .requeue
            .key(self.keys.queue())
            .key(self.keys.processing(&self.worker_id))
            .key(self.keys.attempts())
            .arg(raw)
            .arg(id.unwrap_or(""))
            .invoke_async(&mut conn)
            .await
            .map_err(self.failed("requeue"))?;
        Ok(moved == 1)
    }

    /// Claim this worker's id, or refresh the claim: heartbeat key (with
    /// `ttl`) and score in the registry, both on Redis' clock. False when
    /// another live process holds the id.
    pub async fn heartbeat(&self, ttl: Duration) -> Result<bool, QueueError> {
        let mut conn = self.conn("heartbeat").await?;
        let ours: i64 = self
            .heartbeat
            .key(self.keys.worker(&self.worker_id))
            .key(self.keys.workers())
            .arg(&self.instance)
            .arg(ttl.as_millis() as u64)
            .arg(&self.worker_id)
            .invoke_async(&mut conn)
            .await
            .map_err(self.failed("heartbeat"))?;
        Ok(ours == 1)
    }

    /// Who holds this worker's id now (the heartbeat value), if anyone.
    pub async fn id_holder(&self) -> Result<Option<String>, QueueError> {
        let mut conn = self.conn("heartbeat").await?;
        redis::cmd("GET")
            .arg(self.keys.worker(&self.worker_id))
            .query_async(&mut conn)
            .await
            .map_err(self.failed("heartbeat"))
    }

    /// Move the jobs of workers whose heartbeat expired back to the queue.
    /// Returns (jobs moved, workers reaped).
    pub async fn reap(&self, stale_after: Duration) -> Result<(u64, u64), QueueError> {
        let mut conn = self.conn("reap").await?;
        self.reap
            .key(self.keys.workers())
            .key(self.keys.queue())
            .arg(self.keys.prefix())
            .arg(stale_after.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(self.failed("reap"))
    }

    /// Leave cleanly: hand back what is left, drop heartbeat and
    /// registration. `None` when another process holds the id now (nothing
    /// is touched).
    pub async fn deregister(&self) -> Result<Option<u64>, QueueError> {
        let mut conn = self.conn("deregister").await?;
        let moved: i64 = self
            .deregister
            .key(self.keys.processing(&self.worker_id))
            .key(self.keys.queue())
            .key(self.keys.worker(&self.worker_id))
            .key(self.keys.workers())
            .arg(&self.worker_id)
            .arg(&self.instance)
            .invoke_async(&mut conn)
            .await
            .map_err(self.failed("deregister"))?;
        Ok(u64::try_from(moved).ok())
    }

    /// Everything in this worker's processing list.
    pub async fn processing_list(&self) -> Result<Vec<Vec<u8>>, QueueError> {
        let mut conn = self.conn("reconcile").await?;
        redis::cmd("LRANGE")
            .arg(self.keys.processing(&self.worker_id))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(self.failed("reconcile"))
    }

    /// Whether Redis answers a PING.
    pub async fn ping(&self) -> Result<(), QueueError> {
        let mut conn = self.conn("ping").await?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map(|_| ())
            .map_err(self.failed("ping"))
    }

    /// Lengths of the queue, the dead list and this worker's processing list.
    pub async fn depths(&self) -> Result<(u64, u64, u64), QueueError> {
        let mut conn = self.conn("depth").await?;
        redis::pipe()
            .llen(self.keys.queue())
            .llen(self.keys.dead())
            .llen(self.keys.processing(&self.worker_id))
            .query_async(&mut conn)
            .await
            .map_err(self.failed("depth"))
    }
}

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

//! The Redis side: keys, fetching, results, dead letters. Nothing of processes.
//!
//! The protocol (documented for producers in README.md, "The wire contract"):
//! 1. producers `RPUSH <p>:queue <job JSON>`;
//! 2. a worker with a free slot takes one with
//!    `BLMOVE <p>:queue <p>:processing:<worker> LEFT RIGHT <t>`, so a job in
//!    flight is always in Redis, never only in a worker's memory;
//! 3. it counts the delivery (`HINCRBY <p>:attempts <id> 1`);
//! 4. it pushes the result and removes the job from its processing list in one
//!    Lua script (`complete.lua`), which pushes only the first result for an id;
//! 5. payloads that are not jobs go to `<p>:dead` (`dead_letter.lua`).
//!
//! Blocking commands run on a connection of their own with no client-side
//! response timeout: a client timeout shorter than the block time makes the
//! client give up while the server still moves the job, and the job would sit
//! in the processing list with nobody running it.

mod keys;

pub use keys::Keys;

use deadpool_redis::{Config as PoolConfig, Pool, Runtime};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Script};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    "dead_letter",
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
}

fn redis_err(op: &'static str) -> impl FnOnce(redis::RedisError) -> QueueError {
    move |source| QueueError::Redis { op, source }
}

/// A worker's handle on the queue.
#[derive(Clone)]
pub struct Queue {
    pub keys: Keys,
    pub worker_id: String,
    client: redis::Client,
    pool: Pool,
    /// One multiplexed connection, taken from the pool once and shared by
    /// every operation until one fails: a pool checkout first pings Redis (a
    /// round trip per operation), and a multiplexed connection serves any
    /// number of concurrent callers anyway.
    shared: Arc<Mutex<Option<MultiplexedConnection>>>,
    begin: Script,
    complete: Script,
    dead_letter: Script,
    requeue: Script,
    reap: Script,
    deregister: Script,
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
        Ok(Queue {
            keys: Keys::new(prefix),
            worker_id: worker_id.to_owned(),
            client,
            pool,
            shared: Arc::default(),
            begin: Script::new(include_str!("begin.lua")),
            complete: Script::new(include_str!("complete.lua")),
            dead_letter: Script::new(include_str!("dead_letter.lua")),
            requeue: Script::new(include_str!("requeue.lua")),
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

    /// Start a delivery of job `id`: its delivery number (1 = first), or the
    /// result already stored for this id (then it is not run again).
    pub async fn begin(&self, id: &str) -> Result<Begin, QueueError> {
        let mut conn = self.conn("begin").await?;
        let (attempt, stored): (u32, Option<String>) = self
            .begin
            .key(self.keys.attempts())
            .key(self.keys.done(id))
            .arg(id)
            .invoke_async(&mut conn)
            .await
            .map_err(self.failed("begin"))?;
        Ok(match stored {
            Some(result) => Begin::Answered(result),
            None => Begin::Run { attempt },
        })
    }

    /// Push the result and drop the job from the processing list. With
    /// `remember`, the result is stored under the id and pushed only if no
    /// result was stored before; returns false when one was.
    pub async fn complete(
        &self,
        raw: &[u8],
        id: &str,
        reply_key: &str,
        result_json: &str,
        ttl_s: u64,
        remember: bool,
    ) -> Result<bool, QueueError> {
        let mut conn = self.conn("complete").await?;
        let pushed: i64 = self
            .complete
            .key(reply_key)
            .key(self.keys.processing(&self.worker_id))
            .key(self.keys.done(id))
            .key(self.keys.attempts())
            .arg(result_json)
            .arg(ttl_s)
            .arg(raw)
            .arg(id)
            .arg(if remember { "1" } else { "0" })
            .invoke_async(&mut conn)
            .await
            .map_err(self.failed("complete"))?;
        Ok(pushed == 1)
    }

    /// Move a payload that is not a runnable job to the dead-letter list.
    pub async fn dead_letter(
        &self,
        raw: &[u8],
        reason: &str,
        id: Option<&str>,
    ) -> Result<(), QueueError> {
        let entry = serde_json::json!({
            "reason": reason,
            "payload": String::from_utf8_lossy(raw),
            "id": id,
            "worker": self.worker_id,
            "at_ms": now_ms(),
        });
        let mut conn = self.conn("dead_letter").await?;
        let _: i64 = self
            .dead_letter
            .key(self.keys.dead())
            .key(self.keys.processing(&self.worker_id))
            .arg(entry.to_string())
            .arg(raw)
            .invoke_async(&mut conn)
            .await
            .map_err(self.failed("dead_letter"))?;
        Ok(())
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

    /// Refresh this worker's heartbeat key (with `ttl`) and its score in the
    /// registry, in one round trip.
    pub async fn heartbeat(&self, ttl: Duration, info: &str) -> Result<(), QueueError> {
        let mut conn = self.conn("heartbeat").await?;
        redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(self.keys.worker(&self.worker_id))
            .arg(info)
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .ignore()
            .cmd("ZADD")
            .arg(self.keys.workers())
            .arg(now_ms())
            .arg(&self.worker_id)
            .ignore()
            .query_async::<()>(&mut conn)
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
            .arg(now_ms())
            .arg(stale_after.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(self.failed("reap"))
    }

    /// Leave cleanly: hand back what is left, drop heartbeat and registration.
    pub async fn deregister(&self) -> Result<u64, QueueError> {
        let mut conn = self.conn("deregister").await?;
        self.deregister
            .key(self.keys.processing(&self.worker_id))
            .key(self.keys.queue())
            .key(self.keys.worker(&self.worker_id))
            .key(self.keys.workers())
            .arg(&self.worker_id)
            .invoke_async(&mut conn)
            .await
            .map_err(self.failed("deregister"))
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
    /// Run the job; this is delivery number `attempt`.
    Run { attempt: u32 },
    /// The id already has this result: do not run it again.
    Answered(String),
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::OPS;

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

//! `sandq gateway`: the HTTP API of dify-sandbox in front of the queue, so a
//! deployment that calls dify-sandbox switches to sandq by changing only the
//! endpoint it calls.
//!
//! Each `POST /v1/sandbox/run` becomes one job: pushed to `<p>:queue`, its
//! result awaited, the result turned into the seed's envelope. The gateway
//! itself never runs code: the dependency list is read from package metadata
//! on disk. Routes:
//!
//! ```text
//! GET  /health                               "ok" while Redis answers
//! POST /v1/sandbox/run                       X-Api-Key; the envelope below
//! GET  /v1/sandbox/dependencies?language=    X-Api-Key; importable packages
//! GET  /v1/sandbox/dependencies/refresh      the same list (read fresh each time)
//! ```
//!
//! Envelope: `{"code": 0, "message": "success", "data": {"error", "stdout"}}`
//! for every run, a failed one included (`data.error` is the program's stderr
//! plus an `error: <reason>` line, as the seed writes it); otherwise `data` is
//! null and `code` is -400 (HTTP 400; 413 for a body over the limit, 408 for a
//! body that does not arrive), -401 (401), -503 (503, the queue is full) or
//! -500 (500, no result in time or a failure inside sandq).
//!
//! Waiting: every job names one reply list of this gateway instance
//! ([`Keys::client_results`]) as its `reply_to`; one task pops that list and
//! hands each result to the request waiting for its id. So a thousand waiting
//! requests hold one Redis connection, not a thousand. A job carries an
//! `expires_at_ms` at the end of the request's wait, so a worker that takes it
//! after the client was answered does not run it for nobody.
//!
//! Abuse: no default API key (start-up fails without one), keys compared in
//! constant time, the body capped and read under a deadline, request headers
//! under a deadline too (hyper's header read timeout: a slow client is cut off).

use crate::config::GatewayArgs;
use crate::queue::{now_ms, Keys};
use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// How long one BLPOP of the dispatcher blocks.
const POP_BLOCK_S: f64 = 1.0;
/// Results taken by one LPOP after a BLPOP returned one.
const DRAIN: usize = 500;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Redis connections for pushes and queue-length checks.
const POOL_SIZE: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    Config(String),
    #[error("invalid Redis URL {url:?}: {source}")]
    Url {
        url: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("creating the Redis pool: {0}")]
    Pool(String),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("starting the async runtime: {0}")]
    Runtime(#[source] io::Error),
}

impl GatewayError {
    /// Same scheme as the other subcommands: 2 configuration, 4 Redis, 1 other.
    pub fn exit_code(&self) -> u8 {
        match self {
            GatewayError::Config(_) => 2,
            GatewayError::Url { .. } | GatewayError::Pool(_) => 4,
            _ => 1,
        }
    }
}

/// The gateway's settings, validated.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub listen: String,
    pub api_key: String,
    pub redis_url: String,
    pub prefix: String,
    pub max_queue: u64,
    pub timeout_ms: u64,
    pub wait_margin: Duration,
    pub max_body_bytes: usize,
    pub read_timeout: Duration,
    pub allow_network: bool,
    pub python_packages: Vec<PathBuf>,
}

impl GatewayConfig {
    pub fn from_args(args: GatewayArgs) -> Result<GatewayConfig, GatewayError> {
        // A gateway with a default key would run anybody's code.
        let api_key = args
            .api_key
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                GatewayError::Config(
                    "the gateway needs an API key: --api-key KEY or SANDQ_API_KEY (there is no default)"
                        .into(),
                )
            })?;
        if args.prefix.is_empty() || args.prefix.contains(char::is_whitespace) {
            return Err(GatewayError::Config(format!(
                "prefix {:?}: must be non-empty, without spaces",
                args.prefix
            )));
        }
        if args.timeout_ms == 0 || args.read_timeout_ms == 0 || args.max_body_bytes == 0 {
            return Err(GatewayError::Config(
                "--timeout-ms, --read-timeout-ms and --max-body-bytes must be at least 1".into(),
            ));
        }
        let python_packages = if args.python_packages.is_empty() {
            default_python_packages()
        } else {
            args.python_packages
        };
        Ok(GatewayConfig {
            listen: args.listen,
            api_key,
            redis_url: args.redis,
            prefix: args.prefix,
            max_queue: args.max_queue,
            timeout_ms: args.timeout_ms,
            wait_margin: Duration::from_millis(args.wait_margin_ms),
            max_body_bytes: args.max_body_bytes,
            read_timeout: Duration::from_millis(args.read_timeout_ms),
            allow_network: args.allow_network,
            python_packages,
        })
    }

    /// How long a request waits for its result: the job's timeout plus the
    /// margin for queueing and start-up.
    pub fn wait(&self) -> Duration {
        Duration::from_millis(self.timeout_ms) + self.wait_margin
    }
}

/// Debian's python3 imports from `/usr/local/lib/python3.X/dist-packages`,
/// then `/usr/lib/python3/dist-packages`. X is read from where the
/// `/usr/bin/python3` link points: no interpreter is run to ask.
fn default_python_packages() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let version = std::fs::canonicalize("/usr/bin/python3")
        .ok()
        .and_then(|p| p.file_name()?.to_str().map(str::to_owned));
    if let Some(name) = version.filter(|n| n.starts_with("python3.")) {
        dirs.push(PathBuf::from(format!(
            "/usr/local/lib/{name}/dist-packages"
        )));
    }
    dirs.push(PathBuf::from("/usr/lib/python3/dist-packages"));
    dirs
}

// ------------------------------------------------------------------ envelope

/// The seed's response body.
#[derive(Debug, Serialize)]
struct Envelope<T: Serialize> {
    code: i32,
    message: String,
    data: Option<T>,
}

fn success<T: Serialize>(data: T) -> Json<Envelope<T>> {
    Json(Envelope {
        code: 0,
        message: "success".into(),
        data: Some(data),
    })
}

/// `data` of a run: the seed names stderr `error`.
#[derive(Debug, Serialize)]
struct RunData {
    error: String,
    stdout: String,
}

/// Why a request is answered with a non-zero code.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("Unauthorized")]
    Unauthorized,
    #[error("{0}")]
    BadRequest(String),
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    #[error("request body not received within {0} ms")]
    SlowBody(u128),
    #[error("Too many requests")]
    Overloaded,
    #[error("Not found")]
    NotFound,
    #[error("{0}")]
    Internal(String),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            Refusal::Unauthorized => (StatusCode::UNAUTHORIZED, -401),
            Refusal::BadRequest(_) => (StatusCode::BAD_REQUEST, -400),
            Refusal::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, -400),
            Refusal::SlowBody(_) => (StatusCode::REQUEST_TIMEOUT, -400),
            Refusal::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, -503),
            Refusal::NotFound => (StatusCode::NOT_FOUND, -404),
            Refusal::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, -500),
        };
        let body = Envelope::<()> {
            code,
            message: self.to_string(),
            data: None,
        };
        (status, Json(body)).into_response()
    }
}

// ------------------------------------------------------------------ state

/// What the handlers share.
struct Gateway {
    cfg: GatewayConfig,
    keys: Keys,
    /// This instance's reply list: every job it pushes names it as `reply_to`.
    reply_key: String,
    client: redis::Client,
    pool: deadpool_redis::Pool,
    /// Requests waiting for a result, by job id.
    waiters: Mutex<HashMap<String, oneshot::Sender<String>>>,
}

impl Gateway {
    fn new(cfg: GatewayConfig) -> Result<Gateway, GatewayError> {
        let client =
            redis::Client::open(cfg.redis_url.as_str()).map_err(|source| GatewayError::Url {
                url: cfg.redis_url.clone(),
                source,
            })?;
        let mut pool_cfg = deadpool_redis::Config::from_url(cfg.redis_url.clone());
        // Bounded waits: a request must fail, not hang, while Redis is away.
        pool_cfg.pool = Some(deadpool_redis::PoolConfig {
            max_size: POOL_SIZE,
            timeouts: deadpool_redis::Timeouts {
                wait: Some(Duration::from_secs(5)),
                create: Some(Duration::from_secs(5)),
                recycle: Some(Duration::from_secs(5)),
            },
            ..deadpool_redis::PoolConfig::default()
        });
        let pool = pool_cfg
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .map_err(|e| GatewayError::Pool(e.to_string()))?;
        let keys = Keys::new(&cfg.prefix);
        let reply_key = keys.client_results(&format!("gateway-{}", uuid::Uuid::new_v4().simple()));
        Ok(Gateway {
            cfg,
            keys,
            reply_key,
            client,
            pool,
            waiters: Mutex::new(HashMap::new()),
        })
    }

    async fn conn(&self) -> Result<deadpool_redis::Connection, Refusal> {
        self.pool.get().await.map_err(|e| {
            warn!(error = %e, "no Redis connection");
            Refusal::Internal(format!("queue unavailable: {e}"))
        })
    }

    fn wait_for(&self, id: &str) -> oneshot::Receiver<String> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiters.lock() {
            w.insert(id.to_owned(), tx);
        }
        rx
    }

    fn forget(&self, id: &str) {
        if let Ok(mut w) = self.waiters.lock() {
            w.remove(id);
        }
    }

    /// Hand a result to the request waiting for it.
    fn route(&self, result: String) {
        let id = serde_json::from_str::<Value>(&result)
            .ok()
            .and_then(|v| v.get("id")?.as_str().map(str::to_owned));
        let Some(id) = id else {
            warn!(
                bytes = result.len(),
                "a result without an id on the reply list; ignored"
            );
            return;
        };
        let waiter = self.waiters.lock().ok().and_then(|mut w| w.remove(&id));
        match waiter {
            // A send fails only when the request has just given up: nothing to do.
            Some(tx) => drop(tx.send(result)),
            None => debug!(job_id = %id, "result of a request that no longer waits"),
        }
    }
}

// ------------------------------------------------------------------ serving

/// `sandq gateway`: serve until SIGTERM or SIGINT.
pub fn serve_blocking(args: GatewayArgs) -> Result<(), GatewayError> {
    let cfg = GatewayConfig::from_args(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(GatewayError::Runtime)?;
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                tracing::error!("cannot install signal handlers");
                return;
            };
            tokio::select! {
                _ = term.recv() => info!("SIGTERM"),
                _ = int.recv() => info!("SIGINT"),
            }
            token.cancel();
        });
        serve(cfg, shutdown).await
    })
}

/// Serve until `shutdown`; then let the requests in flight finish (each is
/// bounded by its wait) before returning.
pub async fn serve(cfg: GatewayConfig, shutdown: CancellationToken) -> Result<(), GatewayError> {
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(|source| GatewayError::Listen {
            addr: cfg.listen.clone(),
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| GatewayError::Listen {
            addr: cfg.listen.clone(),
            source,
        })?;
    let gateway = Arc::new(Gateway::new(cfg)?);
    info!(
        %addr,
        prefix = %gateway.cfg.prefix,
        max_queue = gateway.cfg.max_queue,
        timeout_ms = gateway.cfg.timeout_ms,
        "gateway listening"
    );
    let dispatcher_stop = CancellationToken::new();
    let dispatcher = tokio::spawn(dispatch(gateway.clone(), dispatcher_stop.clone()));
    let app = router(gateway.clone());
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: pause instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(app.clone());
        let read_timeout = gateway.cfg.read_timeout;
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            // Without a timer hyper has no header read timeout: a client that
            // trickles its headers would hold the connection forever.
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(read_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let ended = tokio::select! {
                r = conn.as_mut() => r,
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                debug!(%peer, error = %e, "connection ended");
            }
        });
    }
    info!(
        open = connections.len(),
        "gateway stopping: no new connections"
    );
    connections.close();
    let grace = gateway.cfg.wait() + Duration::from_secs(1);
    if tokio::time::timeout(grace, connections.wait())
        .await
        .is_err()
    {
        warn!("requests still open after the grace period; closing");
    }
    dispatcher_stop.cancel();
    if let Err(e) = dispatcher.await {
        warn!(error = %e, "result dispatcher ended abnormally");
    }
    info!("gateway stopped");
    Ok(())
}

fn router(gateway: Arc<Gateway>) -> Router {
    let sandbox = Router::new()
        .route("/v1/sandbox/run", post(run))
        .route("/v1/sandbox/dependencies", get(dependencies))
        .route("/v1/sandbox/dependencies/refresh", get(dependencies))
        .route_layer(axum::middleware::from_fn_with_state(
            gateway.clone(),
            require_key,
        ));
    Router::new()
        .route("/health", get(health))
        .merge(sandbox)
        .fallback(|| async { Refusal::NotFound })
        .with_state(gateway)
}

/// Pop this instance's reply list and hand each result to its request;
/// reconnect with backoff when Redis goes away.
async fn dispatch(gateway: Arc<Gateway>, stop: CancellationToken) {
    let mut backoff = BACKOFF_MIN;
    // The pop blocks on purpose: a connection of its own, no response timeout.
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(None);
    while !stop.is_cancelled() {
        let mut conn = match gateway
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "result dispatcher: cannot reach Redis; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        loop {
            let mut blpop = redis::cmd("BLPOP");
            blpop.arg(&gateway.reply_key).arg(POP_BLOCK_S);
            let popped: Result<Option<(String, String)>, _> = tokio::select! {
                r = blpop.query_async(&mut conn) => r,
                _ = stop.cancelled() => return,
            };
            let first = match popped {
                Ok(Some((_, result))) => result,
                Ok(None) => continue,
                Err(e) => {
                    warn!(error = %e, "result dispatcher: Redis error; reconnecting");
                    break;
                }
            };
            gateway.route(first);
            let more: Result<Option<Vec<String>>, _> = redis::cmd("LPOP")
                .arg(&gateway.reply_key)
                .arg(DRAIN)
                .query_async(&mut conn)
                .await;
            match more {
                Ok(results) => results
                    .unwrap_or_default()
                    .into_iter()
                    .for_each(|r| gateway.route(r)),
                Err(e) => {
                    warn!(error = %e, "result dispatcher: Redis error; reconnecting");
                    break;
                }
            }
        }
    }
}

// ------------------------------------------------------------------ handlers

/// Compare a presented key with the configured one in a time that depends
/// only on the configured key's length, so response times do not tell how
/// many leading bytes of a guess were right.
fn key_matches(expected: &[u8], given: &[u8]) -> bool {
    let mut diff = u8::from(expected.len() != given.len());
    for (i, e) in expected.iter().enumerate() {
        diff |= e ^ given.get(i).copied().unwrap_or(0);
    }
    std::hint::black_box(diff) == 0
}

/// Checked before anything is read from the body.
async fn require_key(
    State(gateway): State<Arc<Gateway>>,
    request: Request,
    next: Next,
) -> Response {
    let given = request
        .headers()
        .get("x-api-key")
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !key_matches(gateway.cfg.api_key.as_bytes(), given) {
        return Refusal::Unauthorized.into_response();
    }
    next.run(request).await
}

async fn health(State(gateway): State<Arc<Gateway>>) -> Response {
    let ping = async {
        let mut conn = gateway.conn().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut *conn)
            .await
            .map_err(|e| Refusal::Internal(e.to_string()))
    };
    match ping.await {
        // The seed answers a bare JSON string.
        Ok(_) => (StatusCode::OK, Json("ok")).into_response(),
        Err(e) => {
            let body = Envelope::<()> {
                code: -503,
                message: format!("Redis unreachable: {e}"),
                data: None,
            };
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

/// The seed's request; `dependencies`, which it also accepts, is ignored:
/// the packages are whatever the sandbox's Python has.
#[derive(Debug, Deserialize)]
struct RunRequest {
    language: Option<String>,
    code: Option<String>,
    preload: Option<String>,
    enable_network: Option<bool>,
}

async fn read_body(gateway: &Gateway, headers: &HeaderMap, body: Body) -> Result<Bytes, Refusal> {
    let limit = gateway.cfg.max_body_bytes;
    // Refuse on the declared length before a byte of the body is read.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(Refusal::TooLarge(limit));
    }
    let read = tokio::time::timeout(gateway.cfg.read_timeout, axum::body::to_bytes(body, limit));
    match read.await {
        Err(_) => Err(Refusal::SlowBody(gateway.cfg.read_timeout.as_millis())),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => {
            let e = e.into_inner();
            if e.is::<http_body_util::LengthLimitError>() {
                Err(Refusal::TooLarge(limit))
            } else {
                Err(Refusal::BadRequest(format!(
                    "reading the request body: {e}"
                )))
            }
        }
    }
}

fn parse_run(body: &[u8]) -> Result<(&'static str, RunRequest), Refusal> {
    let req: RunRequest = serde_json::from_slice(body)
        .map_err(|e| Refusal::BadRequest(format!("request body is not the expected JSON: {e}")))?;
    // The seed requires both, and an empty string counts as missing.
    let language = match req.language.as_deref() {
        None | Some("") => return Err(Refusal::BadRequest("field `language` is required".into())),
        Some("python3") => "python3",
        Some("nodejs") => "nodejs",
        Some(_) => return Err(Refusal::BadRequest("unsupported language".into())),
    };
    if req.code.as_deref().unwrap_or_default().is_empty() {
        return Err(Refusal::BadRequest("field `code` is required".into()));
    }
    Ok((language, req))
}

async fn run(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Envelope<RunData>>, Refusal> {
    let started = Instant::now();
    let body = read_body(&gateway, &headers, body).await?;
    let (language, req) = parse_run(&body)?;
    let mut conn = gateway.conn().await?;
    let waiting: u64 = redis::cmd("LLEN")
        .arg(gateway.keys.queue())
        .query_async(&mut *conn)
        .await
        .map_err(|e| Refusal::Internal(format!("queue unavailable: {e}")))?;
    if waiting >= gateway.cfg.max_queue {
        info!(
            waiting,
            max_queue = gateway.cfg.max_queue,
            "queue full: 503"
        );
        return Err(Refusal::Overloaded);
    }
    let id = format!("gw-{}", uuid::Uuid::new_v4().simple());
    let wait = gateway.cfg.wait();
    let now = now_ms();
    let job = json!({
        "id": id,
        "language": language,
        "code": req.code.unwrap_or_default(),
        "preload": req.preload.unwrap_or_default(),
        // dify always asks for network; only an operator's --allow-network passes it on.
        "enable_network": gateway.cfg.allow_network && req.enable_network.unwrap_or(false),
        "timeout_ms": gateway.cfg.timeout_ms,
        "reply_to": gateway.reply_key,
        // Long enough for the dispatcher to pop it; the request is gone after `wait`.
        "result_ttl_s": wait.as_secs().max(60),
        "enqueued_at_ms": now,
        "expires_at_ms": now + wait.as_millis() as u64,
    });
    // Registered before the push, so a fast result cannot arrive unclaimed.
    let result = gateway.wait_for(&id);
    let pushed = redis::cmd("RPUSH")
        .arg(gateway.keys.queue())
        .arg(job.to_string())
        .query_async::<i64>(&mut *conn)
        .await;
    drop(conn);
    if let Err(e) = pushed {
        gateway.forget(&id);
        return Err(Refusal::Internal(format!("queue unavailable: {e}")));
    }
    let result = match tokio::time::timeout(wait, result).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) | Err(_) => {
            gateway.forget(&id);
            warn!(job_id = %id, language, wait_ms = wait.as_millis() as u64, "no result in time");
            return Err(Refusal::Internal(format!(
                "no result within {} ms (is a worker running on prefix {:?}?)",
                wait.as_millis(),
                gateway.cfg.prefix
            )));
        }
    };
    let answer = answer(&result);
    info!(
        job_id = %id,
        language,
        answer_code = match &answer { Ok(_) => 0, Err(r) => r.code() },
        ms = started.elapsed().as_millis() as u64,
        "run"
    );
    answer.map(success)
}

impl Refusal {
    fn code(&self) -> i32 {
        match self {
            Refusal::Unauthorized => -401,
            Refusal::Overloaded => -503,
            Refusal::NotFound => -404,
            Refusal::Internal(_) => -500,
            _ => -400,
        }
    }
}

/// A worker's result as the seed would have answered it.
fn answer(result: &str) -> Result<RunData, Refusal> {
    let v: Value = serde_json::from_str(result)
        .map_err(|e| Refusal::Internal(format!("unreadable result: {e}")))?;
    let text = |field: &str| v.get(field).and_then(Value::as_str).unwrap_or_default();
    let status = text("status");
    let reason = match text("error") {
        "" => status,
        e => e,
    };
    match status {
        "rejected" => Err(Refusal::BadRequest(reason.to_owned())),
        "internal_error" | "" => Err(Refusal::Internal(reason.to_owned())),
        _ => {
            let mut error = text("stderr").to_owned();
            if status != "ok" {
                if !error.is_empty() && !error.ends_with('\n') {
                    error.push('\n');
                }
                error.push_str(&format!("error: {reason}\n"));
            }
            Ok(RunData {
                error,
                stdout: text("stdout").to_owned(),
            })
        }
    }
}

#[derive(Debug, Deserialize)]
struct DependenciesQuery {
    language: Option<String>,
}

/// One importable distribution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dependency {
    pub name: String,
    pub version: String,
}

#[derive(Debug, Serialize)]
struct DependenciesData {
    dependencies: Vec<Dependency>,
}

async fn dependencies(
    State(gateway): State<Arc<Gateway>>,
    Query(query): Query<DependenciesQuery>,
) -> Result<Json<Envelope<DependenciesData>>, Refusal> {
    let dependencies = match query.language.as_deref() {
        None | Some("") => return Err(Refusal::BadRequest("field `language` is required".into())),
        Some("python3") => {
            let dirs = gateway.cfg.python_packages.clone();
            tokio::task::spawn_blocking(move || python_dependencies(&dirs))
                .await
                .map_err(|e| Refusal::Internal(format!("listing packages: {e}")))?
        }
        // Node's built-in modules need no installing; there is nothing else.
        Some("nodejs") => Vec::new(),
        Some(_) => return Err(Refusal::BadRequest("unsupported language".into())),
    };
    Ok(success(DependenciesData { dependencies }))
}

/// The distributions in `dirs` (in import order: the first of a name wins),
/// from their `*.dist-info/METADATA` or `*.egg-info` (a directory with
/// `PKG-INFO`, or a file). Sorted by name. Nothing is imported or run.
pub fn python_dependencies(dirs: &[PathBuf]) -> Vec<Dependency> {
    let mut seen = HashSet::new();
    let mut found = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
        paths.sort();
        for path in paths {
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let metadata = if name.ends_with(".dist-info") {
                path.join("METADATA")
            } else if name.ends_with(".egg-info") && path.is_dir() {
                path.join("PKG-INFO")
            } else if name.ends_with(".egg-info") {
                path.clone()
            } else {
                continue;
            };
            let Some(dep) = read_metadata(&metadata) else {
                continue;
            };
            if seen.insert(normalize(&dep.name)) {
                found.push(dep);
            }
        }
    }
    found.sort_by_key(|d| normalize(&d.name));
    found
}

/// `Name` and `Version` from the header block of a core-metadata file (the
/// long description after the first blank line is not read).
fn read_metadata(path: &Path) -> Option<Dependency> {
    let file = std::fs::File::open(path).ok()?;
    let (mut name, mut version) = (None, None);
    for line in BufReader::new(file).lines().take(500) {
        let line = line.ok()?;
        if line.trim().is_empty() {
            break;
        }
        if let Some(v) = line.strip_prefix("Name:") {
            name.get_or_insert_with(|| v.trim().to_owned());
        } else if let Some(v) = line.strip_prefix("Version:") {
            version.get_or_insert_with(|| v.trim().to_owned());
        }
    }
    Some(Dependency {
        name: name.filter(|n| !n.is_empty())?,
        version: version.unwrap_or_default(),
    })
}

/// PEP 503 normalized name: `Foo_Bar.baz` and `foo-bar-baz` are one package.
fn normalize(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut sep = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            sep = true;
            continue;
        }
        if sep && !out.is_empty() {
            out.push('-');
        }
        sep = false;
        out.push(c.to_ascii_lowercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare() {
        assert!(key_matches(b"secret", b"secret"));
        assert!(!key_matches(b"secret", b"secreT"));
        assert!(!key_matches(b"secret", b"secret2"));
        assert!(!key_matches(b"secret", b"secre"));
        assert!(!key_matches(b"secret", b""));
    }

    #[test]
    fn results_become_envelopes() {
        let ok = answer(r#"{"status":"ok","stdout":"1\n","stderr":"","error":null}"#).unwrap();
        assert_eq!((ok.stdout.as_str(), ok.error.as_str()), ("1\n", ""));
        let failed = answer(
            r#"{"status":"error","stdout":"a\n","stderr":"Traceback\nValueError: x","error":"exited with code 1"}"#,
        )
        .unwrap();
        assert_eq!(failed.stdout, "a\n");
        assert_eq!(
            failed.error,
            "Traceback\nValueError: x\nerror: exited with code 1\n"
        );
        let timeout =
            answer(r#"{"status":"timeout","stdout":"","stderr":"","error":null}"#).unwrap();
        assert_eq!(timeout.error, "error: timeout\n");
        assert!(matches!(
            answer(r#"{"status":"rejected","error":"field `code`: too big"}"#),
            Err(Refusal::BadRequest(m)) if m == "field `code`: too big"
        ));
        assert!(matches!(
            answer(r#"{"status":"internal_error","error":"spawn failed"}"#),
            Err(Refusal::Internal(_))
        ));
    }

    #[test]
    fn run_requests() {
        let (l, r) = parse_run(
            br#"{"language":"python3","code":"print(1)","preload":"","enable_network":true}"#,
        )
        .unwrap();
        assert_eq!(l, "python3");
        assert_eq!(r.enable_network, Some(true));
        for (body, why) in [
            (&br#"{"code":"x"}"#[..], "`language` is required"),
            (br#"{"language":"python3"}"#, "`code` is required"),
            (br#"{"language":"python3","code":""}"#, "`code` is required"),
            (br#"{"language":"ruby","code":"x"}"#, "unsupported language"),
            (
                br#"{"language":"python3","code":5}"#,
                "not the expected JSON",
            ),
            (b"nope", "not the expected JSON"),
        ] {
            match parse_run(body) {
                Err(Refusal::BadRequest(m)) => assert!(m.contains(why), "{m}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn names_normalize() {
        assert_eq!(normalize("Foo_Bar.baz"), "foo-bar-baz");
        assert_eq!(normalize("PyYAML"), "pyyaml");
        assert_eq!(normalize("a--b"), "a-b");
    }

    #[test]
    fn dependencies_from_metadata() {
        let dir = std::env::temp_dir().join(format!("sandq-deps-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (first, second) = (dir.join("local"), dir.join("dist"));
        std::fs::create_dir_all(first.join("numpy-1.24.2.dist-info")).unwrap();
        std::fs::write(
            first.join("numpy-1.24.2.dist-info/METADATA"),
            "Metadata-Version: 2.1\nName: numpy\nVersion: 1.24.2\n\nName: not-this\n",
        )
        .unwrap();
        std::fs::create_dir_all(second.join("PyYAML-6.0.egg-info")).unwrap();
        std::fs::write(
            second.join("PyYAML-6.0.egg-info/PKG-INFO"),
            "Name: PyYAML\nVersion: 6.0\n",
        )
        .unwrap();
        std::fs::write(
            second.join("crcmod-1.7.egg-info"),
            "Name: crcmod\nVersion: 1.7\n",
        )
        .unwrap();
        std::fs::create_dir_all(second.join("numpy-1.20.0.dist-info")).unwrap();
        std::fs::write(
            second.join("numpy-1.20.0.dist-info/METADATA"),
            "Name: numpy\nVersion: 1.20.0\n",
        )
        .unwrap();
        std::fs::create_dir_all(second.join("numpy")).unwrap();
        let deps = python_dependencies(&[first, second, dir.join("missing")]);
        let got: Vec<(&str, &str)> = deps
            .iter()
            .map(|d| (d.name.as_str(), d.version.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![("crcmod", "1.7"), ("numpy", "1.24.2"), ("PyYAML", "6.0")]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

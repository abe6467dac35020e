//! The subcommands: start-up sequences around the library (worker, run,
//! profile, doctor, submit, healthcheck) and the embedded Redis.

use crate::config::{self, ConfigError, RunArgs, SandboxArgs, SubmitArgs, WorkerArgs};
use crate::job::{Job, Language, Status};
use crate::metrics::{Metrics, Readiness};
use crate::runner::{Outcome, RunOptions, Runner};
use crate::sandbox::{rootfs, Sandbox, SandboxError};
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("the sandbox self-test failed: {0}")]
    SelfTest(String),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Run(#[from] crate::runner::RunError),
    #[error(transparent)]
    Worker(#[from] crate::worker::WorkerError),
    #[error("embedded Redis: {0}")]
    EmbeddedRedis(String),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("bench: {0}")]
    Bench(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Batch(#[from] crate::batch::BatchError),
    #[error(transparent)]
    Gateway(#[from] crate::gateway::GatewayError),
}

impl CliError {
    /// Exit codes: 2 bad configuration, 3 sandbox unavailable, 4 Redis, 1 other.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Config(_) => 2,
            CliError::Sandbox(_)
            | CliError::SelfTest(_)
            | CliError::Run(_)
            | CliError::Refused(_) => 3,
            CliError::Redis(_) | CliError::EmbeddedRedis(_) => 4,
            // Two processes given one worker id: the operator's to fix.
            CliError::Worker(
                crate::worker::WorkerError::IdInUse { .. }
                | crate::worker::WorkerError::IdLost { .. },
            ) => 2,
            CliError::Worker(crate::worker::WorkerError::Queue(_)) => 4,
            CliError::Batch(e) => e.exit_code(),
            CliError::Gateway(e) => e.exit_code(),
            _ => 1,
        }
    }
}

/// Prepare the sandbox the same way for every subcommand that runs code.
/// Must be called before any thread is started (see `rootfs`).
fn prepare_sandbox(
    args: &SandboxArgs,
    slots: usize,
    tag: &str,
) -> Result<(Arc<Sandbox>, config::SandboxSettings), CliError> {
    let file = config::FileConfig::load(args.config.as_deref())?;
    let mut settings = args.resolve(&file, slots)?;
    settings.sandbox.private_mounts =
        rootfs::enter_private_mount_namespace().map_err(|e| e.to_string());
    let sandbox = Sandbox::prepare(settings.sandbox.clone(), tag)?;
    Ok((Arc::new(sandbox), settings))
}

fn local_job(
    language: Language,
    code: String,
    stdin: Option<String>,
    timeout_ms: Option<u64>,
    memory_mb: Option<u64>,
    network: bool,
    limits: &crate::job::Limits,
) -> Job {
    Job {
        id: uuid::Uuid::new_v4().to_string(),
        language,
        code,
        preload: String::new(),
        stdin: stdin.unwrap_or_default(),
        enable_network: network,
        timeout_ms: timeout_ms
            .unwrap_or(limits.default_timeout_ms)
            .min(limits.max_timeout_ms),
        memory_mb: memory_mb
            .unwrap_or(limits.default_memory_mb)
            .min(limits.max_memory_mb),
        reply_to: None,
        result_ttl_s: limits.default_result_ttl_s,
        enqueued_at_ms: None,
        expires_at_ms: None,
    }
}

/// Run a trivial program per language; Python must work, Node may be absent.
fn self_test(sandbox: &Sandbox, output_limit: usize) -> Result<Vec<String>, CliError> {
    let mut notes = Vec::new();
    let limits = crate::job::Limits::default();
    for (language, code) in [
        (Language::Python3, "print('sandq-self-test')"),
        (Language::Nodejs, "console.log('sandq-self-test')"),
    ] {
        if language == Language::Nodejs && !sandbox.config.node.exists() {
            notes.push(format!(
                "nodejs: no interpreter at {}",
                sandbox.config.node.display()
            ));
            continue;
        }
        let job = local_job(
            language,
            code.into(),
            None,
            Some(10_000),
            None,
            false,
            &limits,
        );
        let opts = RunOptions {
            output_limit,
            learn: false,
            cancel: None,
            egress: Arc::default(),
        };
        // The teardown is dropped (waited for) right here.
        let outcome = Runner { sandbox }.run(&job, &opts).map(|f| f.outcome);
        match outcome {
            Ok(o) if o.status == Status::Ok && o.stdout == "sandq-self-test\n" => {
                notes.push(format!(
                    "{language}: ok, {:.1} ms to exec, {:.1} ms in all",
                    o.spawn_duration.as_secs_f64() * 1e3,
                    o.duration.as_secs_f64() * 1e3
                ))
            }
            Ok(o) => {
                let why = format!(
                    "{language}: status {}, {}; stderr: {}",
                    o.status.as_str(),
                    o.error.unwrap_or_default(),
                    o.stderr.chars().take(400).collect::<String>()
                );
                if language == Language::Python3 {
                    return Err(CliError::SelfTest(why));
                }
                notes.push(why);
            }
            Err(e) => {
                if language == Language::Python3 {
                    return Err(CliError::SelfTest(format!("{language}: {e}")));
                }
                notes.push(format!("{language}: {e}"));
            }
        }
    }
    Ok(notes)
}

// ---------------------------------------------------------------- worker

/// A private `redis-server` child, stopped when dropped.
pub struct EmbeddedRedis {
    child: std::process::Child,
    pub url: String,
    pub port: u16,
}

impl EmbeddedRedis {
    pub fn start() -> Result<EmbeddedRedis, CliError> {
        use std::os::unix::process::CommandExt;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut cmd = std::process::Command::new("redis-server");
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                // Never outlive the worker, even on SIGKILL.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            CliError::EmbeddedRedis(format!("starting redis-server from PATH: {e}"))
        })?;
        let url = format!("redis://127.0.0.1:{port}");
        let redis = EmbeddedRedis { child, url, port };
        let client = redis::Client::open(redis.url.as_str())?;
        let started = Instant::now();
        loop {
            if let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(200)) {
                if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                    return Ok(redis);
                }
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err(CliError::EmbeddedRedis(
                    "redis-server did not answer within 10 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for EmbeddedRedis {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

fn redis_answers(url: &str) -> bool {
    redis::Client::open(url)
        .ok()
        .and_then(|c| {
            c.get_connection_with_timeout(Duration::from_millis(500))
                .ok()
        })
        .is_some_and(|mut c| redis::cmd("PING").query::<String>(&mut c).is_ok())
}

pub fn worker(args: WorkerArgs) -> Result<(), CliError> {
    let mut cfg = args.resolve()?;
    let started = Instant::now();
    raise_open_files_limit();
    // Everything that needs a single-threaded process happens before the runtime.
    let (sandbox, _) = prepare_sandbox(&args.sandbox, cfg.settings.sandbox.slots, &cfg.worker_id)?;
    info!(
        prepared_ms = format!("{:.1}", sandbox.prepared_in.as_secs_f64() * 1e3),
        "isolation layers:\n{}",
        sandbox.layers.table()
    );
    for layer in &sandbox.layers.0 {
        if let Err(reason) = &layer.status {
            warn!(layer = layer.name, %reason, "isolation layer UNAVAILABLE: jobs run with less protection");
        }
    }
    let tests = self_test(&sandbox, cfg.settings.output_limit)?;
    for t in &tests {
        info!(result = %t, "self-test");
    }
    // A required layer missing: the worker stays up, not ready, saying why
    // (on /readyz and here), and takes no job.
    let refusal = sandbox.refusal();
    if let Some(reason) = &refusal {
        error!(%reason, "NOT TAKING JOBS");
    }

    let embedded = if cfg.embedded_redis || (cfg.demo && !redis_answers(&cfg.redis_url)) {
        let r = EmbeddedRedis::start()?;
        info!(url = %r.url, "embedded Redis started; producers reach it with: redis-cli -p {}", r.port);
        cfg.redis_url = r.url.clone();
        Some(r)
    } else {
        None
    };

    if refusal.is_some() {
        cfg.pool_size = 0;
    }
    let pool = Arc::new(start_pool(&cfg, &sandbox));
    let metrics = Arc::new(Metrics::new(Duration::from_millis(
        cfg.settings.limits.max_timeout_ms,
    )));
    for layer in &sandbox.layers.0 {
        metrics.layer(layer.name, layer.status.is_ok());
    }
    let readiness = Arc::new(Readiness::new(&metrics));
    // The runtime root is prepared and the self-test passed (above).
    readiness.sandbox_ready();
    if let Some(reason) = refusal.clone() {
        readiness.refuse_jobs(reason);
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(cfg.concurrency + 8)
        .enable_all()
        .build()?;
    let result = runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        spawn_signal_handler(shutdown.clone());
        // Not ready from the signal on: no new job is taken.
        let (signalled, r) = (shutdown.clone(), readiness.clone());
        tokio::spawn(async move {
            signalled.cancelled().await;
            r.draining();
        });
        // The endpoint outlives the drain (its own token): /readyz says
        // draining meanwhile, and what the drain counts can still be scraped.
        let stop_serving = CancellationToken::new();
        let server = cfg.metrics_addr.clone().map(|addr| {
            let (m, r, s) = (metrics.clone(), readiness.clone(), stop_serving.clone());
            tokio::spawn(async move {
                if let Err(e) = crate::metrics::serve(addr.clone(), m, r, s).await {
                    error!(%addr, error = %e, "metrics endpoint failed");
                }
            })
        });
        let linger = Duration::from_millis(cfg.metrics_linger_ms);
        info!(
            startup_ms = started.elapsed().as_millis() as u64,
            "worker started"
        );
        if cfg.demo {
            tokio::spawn(demo(cfg.redis_url.clone(), cfg.prefix.clone()));
        }
        let result = match refusal {
            None => {
                crate::worker::run(cfg, sandbox, pool, metrics.clone(), readiness, shutdown).await
            }
            Some(_) => {
                shutdown.cancelled().await;
                Ok(())
            }
        };
        if let Some(server) = server {
            if !server.is_finished() {
                metrics.linger(linger).await;
            }
            stop_serving.cancel();
            // Graceful: a scrape being answered is finished, idle keep-alive
            // connections are closed; bounded all the same.
            let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
        }
        result
    });
    drop(embedded);
    result?;
    info!("worker stopped");
    Ok(())
}

/// Raise the soft open-files limit to the hard one. Each running job costs
/// the worker fds (pipes, its relay's connections, capped per job); the usual
/// soft default of 1024 is within reach of a few busy network jobs, while the
/// hard limit is the operator's real bound. Jobs get their own, lower limit.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(
                from = soft,
                to = hard,
                "raised the open-files limit (soft) to the hard limit"
            ),
            Err(e) => warn!(soft, hard, error = %e, "cannot raise the open-files limit"),
        },
        Ok((soft, hard)) => info!(soft, hard, "open-files limit"),
        Err(e) => warn!(error = %e, "cannot read the open-files limit"),
    }
}

/// The warm pool: python3 always, nodejs where it is installed, each with and
/// without network where the worker allows network.
fn start_pool(cfg: &config::WorkerConfig, sandbox: &Arc<Sandbox>) -> crate::runner::pool::Pool {
    let mut profiles = Vec::new();
    for language in Language::ALL {
        if sandbox.interpreter(language).exists() {
            profiles.push((language, false));
            if cfg.settings.limits.allow_network && sandbox.net_namespace {
                profiles.push((language, true));
            }
        }
    }
    info!(size = cfg.pool_size, profiles = profiles.len(), "warm pool");
    crate::runner::pool::Pool::start(
        sandbox.clone(),
        cfg.pool_size,
        profiles,
        cfg.settings.limits.default_memory_mb,
        // Started ahead of their job, they get the CPU limit of the longest
        // job they may serve.
        cfg.settings.limits.max_timeout_ms,
    )
}

fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM"),
            _ = int.recv() => info!("SIGINT"),
        }
        shutdown.cancel();
    });
}

/// The quickstart's demo: a few jobs through the real queue, results printed.
async fn demo(url: String, prefix: String) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let jobs = [
        ("python3", "import sys, platform\nprint('hello from', platform.python_implementation(), sys.version.split()[0])\nprint(sum(i * i for i in range(10)))"),
        ("python3", "import socket\nsocket.socket()"),
        ("nodejs", "console.log('hello from node', process.version)"),
    ];
    let Ok(client) = redis::Client::open(url.as_str()) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    for (language, code) in jobs {
        let id = format!("demo-{}", uuid::Uuid::new_v4());
        let job = serde_json::json!({"id": id, "language": language, "code": code});
        let _: Result<i64, _> = redis::cmd("RPUSH")
            .arg(format!("{prefix}:queue"))
            .arg(job.to_string())
            .query_async(&mut conn)
            .await;
        let reply: Result<Option<(String, String)>, _> = redis::cmd("BLPOP")
            .arg(format!("{prefix}:result:{id}"))
            .arg(20)
            .query_async(&mut conn)
            .await;
        if let Ok(Some((_, result))) = reply {
            println!(
                "demo job ({language}):\n  code: {}\n  result: {result}\n",
                code.replace('\n', "; ")
            );
        }
    }
    let port = url.rsplit(':').next().unwrap_or("6379");
    let id = uuid::Uuid::new_v4();
    println!(
        "Push your own job (one result per job id, so each job needs a fresh id):\n  redis-cli -p {port} RPUSH {prefix}:queue '{{\"id\":\"{id}\",\"language\":\"python3\",\"code\":\"print(6*7)\"}}'\n  redis-cli -p {port} BLPOP {prefix}:result:{id} 10\nCtrl-C stops the worker.",
    );
    let _ = std::io::stdout().flush();
}

// ---------------------------------------------------------------- run / profile

fn exit_code_of(o: &Outcome) -> u8 {
    match (o.exit_code, &o.signal) {
        (Some(c), _) => c.clamp(0, 255) as u8,
        _ if o.status == Status::Timeout => 124,
        _ => 137,
    }
}

pub fn run(args: RunArgs, learn: bool) -> Result<ExitCode, CliError> {
    let language = config::parse_language(&args.language)?;
    let code = config::read_code(&args.code, &args.file)?;
    let (sandbox, settings) =
        prepare_sandbox(&args.sandbox, 1, &format!("run-{}", std::process::id()))?;
    if let Some(reason) = sandbox.refusal() {
        return Err(CliError::Refused(reason));
    }
    if args.enable_network && !settings.limits.allow_network {
        return Err(ConfigError::Invalid("--enable-network needs --allow-network".into()).into());
    }
    let job = local_job(
        language,
        code,
        args.stdin.clone(),
        args.timeout_ms,
        args.memory_mb,
        args.enable_network,
        &settings.limits,
    );
    let opts = RunOptions {
        output_limit: settings.output_limit,
        learn,
        cancel: None,
        egress: Arc::new(settings.egress.clone()),
    };
    let outcome = Runner { sandbox: &sandbox }.run(&job, &opts)?.outcome;
    if learn {
        return Ok(print_profile(language, &outcome));
    }
    if args.json {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default();
        let result = crate::worker::to_result(&job, outcome.clone(), &host, 1);
        println!("{}", result.to_json());
    } else {
        print!("{}", outcome.stdout);
        eprint!("{}", outcome.stderr);
        if let Some(e) = &outcome.error {
            if outcome.status != Status::Error || outcome.exit_code.is_none() {
                eprintln!("sandq: {}: {e}", outcome.status.as_str());
            }
        }
    }
    let _ = std::io::stdout().flush();
    Ok(ExitCode::from(exit_code_of(&outcome)))
}

fn print_profile(language: Language, o: &Outcome) -> ExitCode {
    match o.exit_code {
        Some(code) => println!("status: {}, exit code {code}", o.status.as_str()),
        None => println!("status: {}", o.status.as_str()),
    }
    if o.unlisted.is_empty() {
        println!("every syscall this program made is on the {language} allowlist");
        return ExitCode::SUCCESS;
    }
    println!("syscalls used that the {language} allowlist lacks:");
    for name in &o.unlisted {
        println!("  {name}");
    }
    let quoted: Vec<String> = o.unlisted.iter().map(|n| format!("{n:?}")).collect();
    println!(
        "\nto allow them, add to the config file:\n  allow_syscall = [{}]",
        quoted.join(", ")
    );
    let flags: Vec<String> = o
        .unlisted
        .iter()
        .map(|n| format!("--allow-syscall {n}"))
        .collect();
    println!("or pass:\n  {}", flags.join(" "));
    if o.unlisted
        .iter()
        .any(|n| n == "socket" || n == "socketpair")
    {
        println!(
            "note: socket and socketpair are allowed for some address families only \
             (docs/SECURITY.md, \"Sockets\"); allowing them this way allows every family"
        );
    }
    ExitCode::from(1)
}

// ---------------------------------------------------------------- doctor

pub fn doctor(args: config::DoctorArgs) -> ExitCode {
    let prepared = prepare_sandbox(&args.sandbox, 1, &format!("doctor-{}", std::process::id()));
    let (sandbox, settings) = match prepared {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sandq doctor: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    println!(
        "sandq {} isolation layers (prepared in {:.1} ms):",
        env!("CARGO_PKG_VERSION"),
        sandbox.prepared_in.as_secs_f64() * 1e3
    );
    print!("{}", sandbox.layers.table());
    match self_test(&sandbox, settings.output_limit) {
        Ok(notes) => {
            for n in notes {
                println!("  self-test          {n}");
            }
            let missing = sandbox
                .layers
                .0
                .iter()
                .filter(|l| l.status.is_err())
                .count();
            if let Some(reason) = sandbox.refusal() {
                println!("REFUSING JOBS: {reason}");
                return ExitCode::from(3);
            }
            if missing > 0 {
                println!("{missing} layer(s) unavailable (not required by the config)");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("  self-test          FAILED: {e}");
            ExitCode::from(3)
        }
    }
}

// ---------------------------------------------------------------- submit

pub fn submit(args: SubmitArgs) -> Result<ExitCode, CliError> {
    if args.batch.is_some() {
        return Ok(crate::batch::submit(&args)?);
    }
    // clap requires --language whenever --batch is absent.
    let language = config::parse_language(args.language.as_deref().unwrap_or_default())?;
    let code = config::read_code(&args.code, &args.file)?;
    let id = uuid::Uuid::new_v4().to_string();
    let mut job = serde_json::json!({
        "id": id,
        "language": language.as_str(),
        "code": code,
        "enqueued_at_ms": crate::queue::now_ms(),
    });
    if let Some(s) = &args.stdin {
        job["stdin"] = s.clone().into();
    }
    if let Some(t) = args.timeout_ms {
        job["timeout_ms"] = t.into();
    }
    if let Some(m) = args.memory_mb {
        job["memory_mb"] = m.into();
    }
    if args.enable_network {
        job["enable_network"] = true.into();
    }
    let wait_ms = args
        .wait_ms
        .unwrap_or(args.timeout_ms.unwrap_or(5_000) + 30_000);
    let keys = crate::queue::Keys::new(&args.prefix);
    let client = redis::Client::open(args.redis.as_str())?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(5))?;
    // BLPOP waits longer than any default read timeout: none on this connection.
    conn.set_read_timeout(None)?;
    redis::cmd("RPUSH")
        .arg(keys.queue())
        .arg(job.to_string())
        .query::<i64>(&mut conn)?;
    let reply: Option<(String, String)> = redis::cmd("BLPOP")
        .arg(keys.result(&id))
        .arg(wait_ms as f64 / 1000.0)
        .query(&mut conn)?;
    match reply {
        Some((_, result)) => {
            println!("{result}");
            let ok = serde_json::from_str::<serde_json::Value>(&result)
                .map(|v| v["status"] == "ok")
                .unwrap_or(false);
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        None => {
            eprintln!("sandq submit: no result for job {id} within {wait_ms} ms (is a worker running on prefix {:?}?)", args.prefix);
            Ok(ExitCode::from(2))
        }
    }
}

// ---------------------------------------------------------------- gateway

pub fn gateway(args: config::GatewayArgs) -> Result<(), CliError> {
    crate::gateway::serve_blocking(args)?;
    Ok(())
}

// ---------------------------------------------------------------- bench

pub fn bench(mut args: config::BenchArgs) -> Result<(), CliError> {
    let _embedded = if redis_answers(&args.redis) {
        None
    } else {
        let r = EmbeddedRedis::start()?;
        args.redis = r.url.clone();
        Some(r)
    };
    crate::bench::run(args).map_err(|e| CliError::Bench(e.to_string()))
}

// ---------------------------------------------------------------- healthcheck

pub fn healthcheck(url: &str) -> ExitCode {
    use std::io::Read;
    let Some(rest) = url.strip_prefix("http://") else {
        eprintln!("healthcheck: only http:// URLs");
        return ExitCode::from(2);
    };
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let Ok(addr) = std::net::ToSocketAddrs::to_socket_addrs(host).map(|mut a| a.next()) else {
        return ExitCode::from(1);
    };
    let Some(addr) = addr else {
        return ExitCode::from(1);
    };
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return ExitCode::from(1);
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n");
    let mut head = [0u8; 12];
    if s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && head[9] == b'2' {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

//! Command line, environment and config file, merged into validated settings.
//!
//! Every setting is read, in this order of precedence: the flag, its `SANDQ_*`
//! environment variable (clap handles these two), the TOML file given with
//! `--config`, then the default. List settings (`allow_syscall`,
//! `require_layer`) are the union of all sources: extras add to the defaults,
//! never replace them.

use crate::job::{Language, Limits, MAX_MEMORY_MB, MAX_TIMEOUT_MS};
use crate::runner::egress::{Cidr, EgressPolicy};
use crate::sandbox::SandboxConfig;
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Parser)]
#[command(
    name = "sandq",
    version,
    about = "Runs untrusted Python and Node.js jobs from a Redis queue, locked down"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume jobs from Redis and run them.
    Worker(WorkerArgs),
    /// Run one snippet locally in the same sandbox, without Redis.
    Run(RunArgs),
    /// Push one job and wait for its result, or a batch of jobs (--batch).
    Submit(SubmitArgs),
    /// Serve the dify-sandbox HTTP API, running each request as a job on the queue.
    Gateway(GatewayArgs),
    /// Run a snippet with a filter that records instead of killing, and print
    /// the syscalls it used that the allowlist lacks.
    Profile(RunArgs),
    /// Print every isolation layer as active or unavailable.
    Doctor(DoctorArgs),
    /// Measure sandq (cold and warm) against the bare interpreters, through
    /// a real Redis and a real worker process.
    Bench(BenchArgs),
    /// GET a URL and exit 0 on a 2xx answer (for container health checks).
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:9464/readyz")]
        url: String,
    },
}

/// Settings of the sandbox, shared by `worker`, `run`, `profile` and `doctor`.
#[derive(Debug, Args, Default, Clone)]
pub struct SandboxArgs {
    /// TOML config file (any setting below, by its long name with `_`).
    #[arg(long, env = "SANDQ_CONFIG")]
    pub config: Option<PathBuf>,
    /// Python interpreter [default: /usr/bin/python3]
    #[arg(long, env = "SANDQ_PYTHON")]
    pub python: Option<PathBuf>,
    /// Node.js interpreter [default: /usr/bin/node]
    #[arg(long, env = "SANDQ_NODE")]
    pub node: Option<PathBuf>,
    /// Runtime root, scratch dirs and uid locks [default: /run/sandq]
    #[arg(long, env = "SANDQ_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Uids for jobs, one per running job [default: 10000-10999]
    #[arg(long, env = "SANDQ_UID_RANGE")]
    pub uid_range: Option<String>,
    /// Allow a syscall on top of the defaults (repeatable).
    #[arg(
        long = "allow-syscall",
        env = "SANDQ_ALLOW_SYSCALL",
        value_delimiter = ','
    )]
    pub allow_syscall: Vec<String>,
    /// Fail at start-up unless this isolation layer is active (repeatable; `all`).
    #[arg(
        long = "require-layer",
        env = "SANDQ_REQUIRE_LAYER",
        value_delimiter = ','
    )]
    pub require_layer: Vec<String>,
    /// Take jobs even though this layer, which the worker requires by
    /// default, is unavailable (repeatable; today: `cgroup memory`, without
    /// which memory_mb falls back to RLIMIT_AS)
    #[arg(
        long = "allow-degraded",
        env = "SANDQ_ALLOW_DEGRADED",
        value_delimiter = ','
    )]
    pub allow_degraded: Vec<String>,
    /// Let jobs ask for network with `enable_network` [default: false]
    #[arg(long, env = "SANDQ_ALLOW_NETWORK", num_args = 0..=1, default_missing_value = "true")]
    pub allow_network: Option<bool>,
    /// Longest timeout a job may ask for [default: 60000]
    #[arg(long, env = "SANDQ_MAX_TIMEOUT_MS")]
    pub max_timeout_ms: Option<u64>,
    /// Largest memory a job may ask for [default: 2048]
    #[arg(long, env = "SANDQ_MAX_MEMORY_MB")]
    pub max_memory_mb: Option<u64>,
    /// Cap on stdout and on stderr, each [default: 1048576]
    #[arg(long, env = "SANDQ_OUTPUT_LIMIT_BYTES")]
    pub output_limit_bytes: Option<usize>,
    /// Writable scratch space per job [default: 64]
    #[arg(long, env = "SANDQ_SCRATCH_MB")]
    pub scratch_mb: Option<u64>,
    /// Processes and threads per job [default: 64]
    #[arg(long, env = "SANDQ_PIDS_MAX")]
    pub pids_max: Option<u64>,
    /// HTTP proxy (host:port) that all egress of network jobs goes through.
    #[arg(long, env = "SANDQ_EGRESS_PROXY")]
    pub egress_proxy: Option<String>,
    /// Internal address range network jobs may reach anyway (repeatable, CIDR).
    #[arg(
        long = "egress-allow",
        env = "SANDQ_EGRESS_ALLOW",
        value_delimiter = ','
    )]
    pub egress_allow: Vec<String>,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Redis URL [default: redis://127.0.0.1:6379]
    #[arg(long, env = "SANDQ_REDIS")]
    pub redis: Option<String>,
    /// Key prefix [default: sandq]
    #[arg(long, env = "SANDQ_PREFIX")]
    pub prefix: Option<String>,
    /// Jobs run at once [default: number of CPUs]
    #[arg(long, env = "SANDQ_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Jobs taken from the queue ahead of a free slot, so that a slot that
    /// frees up starts its next job without a Redis round trip; such a job
    /// waits for this worker's slots even if another worker is idle
    /// [default: 0]
    #[arg(long, env = "SANDQ_PREFETCH")]
    pub prefetch: Option<usize>,
    /// This worker's id [default: hostname-pid-random]
    #[arg(long, env = "SANDQ_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Start a private redis-server (no persistence, loopback only) and use it.
    #[arg(long, env = "SANDQ_EMBEDDED_REDIS")]
    pub embedded_redis: bool,
    /// Quickstart: use an embedded Redis if nothing answers at --redis, and
    /// submit a demo job once ready.
    #[arg(long)]
    pub demo: bool,
    /// Address for /metrics, /healthz, /readyz, or `off` [default: 127.0.0.1:9464]
    #[arg(long, env = "SANDQ_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// Time running jobs get to finish on SIGTERM [default: 25000]
    #[arg(long, env = "SANDQ_SHUTDOWN_GRACE_MS")]
    pub shutdown_grace_ms: Option<u64>,
    /// After the drain, how long /metrics stays up for a scrape to see the
    /// final counts, when some were not scraped yet; 0 turns it off (the
    /// default is the 5 s scrape interval of dashboards/prometheus.yml and a
    /// margin) [default: 6000]
    #[arg(long, env = "SANDQ_METRICS_LINGER_MS")]
    pub metrics_linger_ms: Option<u64>,
    /// Deliveries before a job is dead-lettered [default: 3]
    #[arg(long, env = "SANDQ_MAX_ATTEMPTS")]
    pub max_attempts: Option<u32>,
    /// Entries the dead-letter list keeps; older ones are trimmed (and
    /// counted in sandq_dead_letters_trimmed_total) [default: 10000]
    #[arg(long, env = "SANDQ_DEAD_LETTER_MAX")]
    pub dead_letter_max: Option<u64>,
    /// Pre-started interpreters kept per (language, network) profile; 0 turns
    /// the warm pool off [default: the concurrency]
    #[arg(long, env = "SANDQ_POOL_SIZE")]
    pub pool_size: Option<usize>,
    /// How often the heartbeat is refreshed and the reaper runs [default: 2000]
    #[arg(long, env = "SANDQ_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// A worker silent this long is dead and its jobs are requeued [default: 10000]
    #[arg(long, env = "SANDQ_HEARTBEAT_TTL_MS")]
    pub heartbeat_ttl_ms: Option<u64>,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// python3 or nodejs
    #[arg(long, short)]
    pub language: String,
    /// The code to run (otherwise FILE, or `-` for stdin).
    #[arg(long, short)]
    pub code: Option<String>,
    pub file: Option<PathBuf>,
    /// Text fed to the program's stdin.
    #[arg(long)]
    pub stdin: Option<String>,
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    #[arg(long)]
    pub memory_mb: Option<u64>,
    #[arg(long)]
    pub enable_network: bool,
    /// Print the result JSON instead of the program's output.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    #[arg(long, env = "SANDQ_REDIS", default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    #[arg(long, env = "SANDQ_PREFIX", default_value = "sandq")]
    pub prefix: String,
    /// python3 or nodejs (with --batch: the default for lines without one)
    #[arg(long, short, required_unless_present = "batch")]
    pub language: Option<String>,
    #[arg(long, short, conflicts_with = "batch")]
    pub code: Option<String>,
    #[arg(conflicts_with = "batch")]
    pub file: Option<PathBuf>,
    #[arg(long, conflicts_with = "batch")]
    pub stdin: Option<String>,
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    #[arg(long)]
    pub memory_mb: Option<u64>,
    #[arg(long)]
    pub enable_network: bool,
    /// How long to wait for the result [default: the job's timeout + 30 s]
    /// (with --batch: for any result while jobs are outstanding)
    #[arg(long)]
    pub wait_ms: Option<u64>,
    /// Submit every job of a JSON-lines file (`-` for stdin), one job per line
    #[arg(long, value_name = "JOBS.jsonl")]
    pub batch: Option<PathBuf>,
    /// Write the results here, one JSON per line [default: stdout]
    #[arg(long, value_name = "RESULTS.jsonl", requires = "batch")]
    pub out: Option<PathBuf>,
    /// Write the results in input order instead of as they arrive
    #[arg(long, requires = "batch")]
    pub ordered: bool,
    /// Skip the jobs whose results are already in --out, and append the rest
    #[arg(long, requires = "out")]
    pub resume: bool,
    /// Jobs of the batch queued or running at once [default: 256]
    #[arg(long, value_name = "N", requires = "batch")]
    pub parallel_wait: Option<usize>,
}

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Address to listen on
    #[arg(long, env = "SANDQ_GATEWAY_LISTEN", default_value = "127.0.0.1:8194")]
    pub listen: String,
    /// Key that clients send in X-Api-Key (required: there is no default)
    #[arg(long, env = "SANDQ_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    #[arg(long, env = "SANDQ_REDIS", default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    #[arg(long, env = "SANDQ_PREFIX", default_value = "sandq")]
    pub prefix: String,
    /// Answer 503 while this many jobs or more wait in the queue
    #[arg(long, env = "SANDQ_GATEWAY_MAX_QUEUE", default_value_t = 1000)]
    pub max_queue: u64,
    /// Timeout of each job
    #[arg(long, env = "SANDQ_GATEWAY_TIMEOUT_MS", default_value_t = 5_000)]
    pub timeout_ms: u64,
    /// Time on top of the job's timeout that a request waits for its result
    #[arg(long, default_value_t = 30_000)]
    pub wait_margin_ms: u64,
    /// Largest request body
    #[arg(long, default_value_t = 2 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Time a client gets to send its request headers, and its body
    #[arg(long, default_value_t = 10_000)]
    pub read_timeout_ms: u64,
    /// Pass a request's `enable_network` on to the job (the worker must allow
    /// network too); without it, jobs run without network whatever is asked
    #[arg(long, env = "SANDQ_GATEWAY_ALLOW_NETWORK")]
    pub allow_network: bool,
    /// Directories listed by /v1/sandbox/dependencies (repeatable)
    /// [default: the dist-packages directories of /usr/bin/python3]
    #[arg(long = "python-packages", value_delimiter = ',')]
    pub python_packages: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Redis to run through; an embedded one is started if nothing answers.
    #[arg(long, env = "SANDQ_REDIS", default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// Sequential runs per line (throughput lines run half as many per client).
    #[arg(long, default_value_t = 100)]
    pub runs: usize,
    /// Parallel clients for the throughput lines.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub sandbox: SandboxArgs,
}

/// The TOML file: every key optional, unknown keys are an error (typos).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub redis: Option<String>,
    pub prefix: Option<String>,
    pub concurrency: Option<usize>,
    pub prefetch: Option<usize>,
    pub worker_id: Option<String>,
    pub embedded_redis: Option<bool>,
    pub metrics_addr: Option<String>,
    pub shutdown_grace_ms: Option<u64>,
    pub metrics_linger_ms: Option<u64>,
    pub max_attempts: Option<u32>,
    pub dead_letter_max: Option<u64>,
    pub heartbeat_ms: Option<u64>,
    pub heartbeat_ttl_ms: Option<u64>,
    pub pool_size: Option<usize>,
    pub python: Option<PathBuf>,
    pub node: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub uid_range: Option<String>,
    #[serde(default)]
    pub allow_syscall: Vec<String>,
    #[serde(default)]
    pub require_layer: Vec<String>,
    #[serde(default)]
    pub allow_degraded: Vec<String>,
    pub allow_network: Option<bool>,
    pub max_timeout_ms: Option<u64>,
    pub max_memory_mb: Option<u64>,
    pub output_limit_bytes: Option<usize>,
    pub scratch_mb: Option<u64>,
    pub pids_max: Option<u64>,
    pub egress_proxy: Option<String>,
    #[serde(default)]
    pub egress_allow: Vec<String>,
}

impl FileConfig {
    pub fn load(path: Option<&Path>) -> Result<FileConfig, ConfigError> {
        let Some(path) = path else {
            return Ok(FileConfig::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }
}

/// Settings of the sandbox and of job validation, resolved.
#[derive(Debug, Clone)]
pub struct SandboxSettings {
    pub sandbox: SandboxConfig,
    pub limits: Limits,
    pub output_limit: usize,
    pub egress: EgressPolicy,
}

fn parse_uid_range(s: &str) -> Result<(u32, u32), ConfigError> {
    let bad = || {
        ConfigError::Invalid(format!(
            "uid_range {s:?}: expected FIRST-LAST, e.g. 10000-10999"
        ))
    };
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b): (u32, u32) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a == 0 || b < a {
        return Err(bad());
    }
    Ok((a, b))
}

impl SandboxArgs {
    pub fn resolve(&self, file: &FileConfig, slots: usize) -> Result<SandboxSettings, ConfigError> {
        let uid_range = self
            .uid_range
            .clone()
            .or(file.uid_range.clone())
            .unwrap_or_else(|| "10000-10999".into());
        let (uid_first, uid_last) = parse_uid_range(&uid_range)?;
        if (uid_last - uid_first + 1) < slots as u32 {
            return Err(ConfigError::Invalid(format!(
                "uid_range {uid_range} has fewer uids than the {slots} concurrent jobs"
            )));
        }
        let mut allow_syscalls = self.allow_syscall.clone();
        allow_syscalls.extend(file.allow_syscall.iter().cloned());
        allow_syscalls.sort();
        allow_syscalls.dedup();
        let mut require_layers = self.require_layer.clone();
        require_layers.extend(file.require_layer.iter().cloned());
        let mut allow_degraded = self.allow_degraded.clone();
        allow_degraded.extend(file.allow_degraded.iter().cloned());
        if let Some(unknown) = allow_degraded
            .iter()
            .find(|l| !crate::sandbox::REQUIRED_TO_TAKE_JOBS.contains(&l.as_str()))
        {
            return Err(ConfigError::Invalid(format!(
                "allow_degraded {unknown:?}: only {:?} can be allowed to be missing",
                crate::sandbox::REQUIRED_TO_TAKE_JOBS
            )));
        }
        let defaults = Limits::default();
        let limits = Limits {
            max_timeout_ms: self
                .max_timeout_ms
                .or(file.max_timeout_ms)
                .unwrap_or(defaults.max_timeout_ms),
            max_memory_mb: self
                .max_memory_mb
                .or(file.max_memory_mb)
                .unwrap_or(defaults.max_memory_mb),
            allow_network: self
                .allow_network
                .or(file.allow_network)
                .unwrap_or(defaults.allow_network),
            ..defaults
        };
        if !(1..=MAX_TIMEOUT_MS).contains(&limits.max_timeout_ms)
            || !(16..=MAX_MEMORY_MB).contains(&limits.max_memory_mb)
        {
            return Err(ConfigError::Invalid(format!(
                "max_timeout_ms must be 1 to {MAX_TIMEOUT_MS} (a day) and max_memory_mb 16 to {MAX_MEMORY_MB} (1 TiB)"
            )));
        }
        let limits = Limits {
            default_timeout_ms: limits.default_timeout_ms.min(limits.max_timeout_ms),
            default_memory_mb: limits.default_memory_mb.min(limits.max_memory_mb),
            ..limits
        };
        let mut allow = Vec::new();
        for range in self.egress_allow.iter().chain(&file.egress_allow) {
            allow.push(Cidr::parse(range).ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "egress_allow {range:?}: expected an address or CIDR, e.g. 10.1.0.0/16"
                ))
            })?);
        }
        let egress = EgressPolicy {
            upstream: self.egress_proxy.clone().or(file.egress_proxy.clone()),
            allow,
            deny: Vec::new(),
        };
        let pids_max = self.pids_max.or(file.pids_max).unwrap_or(64);
        if pids_max < 4 {
            return Err(ConfigError::Invalid("pids_max must be at least 4".into()));
        }
        Ok(SandboxSettings {
            sandbox: SandboxConfig {
                state_dir: self
                    .state_dir
                    .clone()
                    .or(file.state_dir.clone())
                    .unwrap_or_else(|| "/run/sandq".into()),
                python: self
                    .python
                    .clone()
                    .or(file.python.clone())
                    .unwrap_or_else(|| "/usr/bin/python3".into()),
                node: self
                    .node
                    .clone()
                    .or(file.node.clone())
                    .unwrap_or_else(|| "/usr/bin/node".into()),
                uid_first,
                uid_last,
                slots,
                allow_syscalls,
                scratch_mb: self.scratch_mb.or(file.scratch_mb).unwrap_or(64).max(1),
                pids_max,
                nofile: 256,
                require_layers,
                allow_degraded,
                private_mounts: Ok(()),
            },
            limits,
            output_limit: self
                .output_limit_bytes
                .or(file.output_limit_bytes)
                .unwrap_or(1024 * 1024)
                .max(1024),
            egress,
        })
    }
}

/// The worker's settings, resolved.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub redis_url: String,
    pub prefix: String,
    pub concurrency: usize,
    /// Jobs held beyond the running ones (taken, counted, waiting for a slot).
    pub prefetch: usize,
    pub worker_id: String,
    pub embedded_redis: bool,
    pub demo: bool,
    pub metrics_addr: Option<String>,
    pub shutdown_grace_ms: u64,
    pub metrics_linger_ms: u64,
    pub max_attempts: u32,
    /// Most entries `<p>:dead` keeps.
    pub dead_letter_max: u64,
    pub heartbeat_ms: u64,
    pub heartbeat_ttl_ms: u64,
    pub pool_size: usize,
    pub settings: SandboxSettings,
}

fn default_worker_id() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "host".into());
    format!(
        "{host}-{}-{:06x}",
        std::process::id(),
        rand::random::<u32>() & 0xff_ffff
    )
}

impl WorkerArgs {
    pub fn resolve(&self) -> Result<WorkerConfig, ConfigError> {
        let file = FileConfig::load(self.sandbox.config.as_deref())?;
        let concurrency = self.concurrency.or(file.concurrency).unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        });
        if concurrency == 0 || concurrency > 1024 {
            return Err(ConfigError::Invalid("concurrency must be 1 to 1024".into()));
        }
        let prefetch = self.prefetch.or(file.prefetch).unwrap_or(0);
        if prefetch > 1024 {
            return Err(ConfigError::Invalid("prefetch must be 0 to 1024".into()));
        }
        let prefix = self
            .prefix
            .clone()
            .or(file.prefix.clone())
            .unwrap_or_else(|| "sandq".into());
        if prefix.is_empty() || prefix.contains(char::is_whitespace) {
            return Err(ConfigError::Invalid(format!(
                "prefix {prefix:?}: must be non-empty, without spaces"
            )));
        }
        let worker_id = self
            .worker_id
            .clone()
            .or(file.worker_id.clone())
            .unwrap_or_else(default_worker_id);
        if worker_id.is_empty() || !worker_id.chars().all(|c| c.is_ascii_graphic()) {
            return Err(ConfigError::Invalid(format!(
                "worker_id {worker_id:?}: printable ASCII without spaces"
            )));
        }
        let metrics_addr = self
            .metrics_addr
            .clone()
            .or(file.metrics_addr.clone())
            .unwrap_or_else(|| "127.0.0.1:9464".into());
        let metrics_addr = (metrics_addr != "off").then_some(metrics_addr);
        let pool_size = self.pool_size.or(file.pool_size).unwrap_or(concurrency);
        // Every running job and every waiting pre-started interpreter holds a
        // uid of its own.
        let mut settings = self.sandbox.resolve(&file, concurrency)?;
        let profiles = if settings.limits.allow_network { 4 } else { 2 };
        settings.sandbox.slots = concurrency + pool_size * profiles;
        let (first, last) = (settings.sandbox.uid_first, settings.sandbox.uid_last);
        if ((last - first + 1) as usize) < settings.sandbox.slots {
            return Err(ConfigError::Invalid(format!(
                "uid_range {first}-{last} is smaller than the {} uids needed (concurrency + pool_size per profile)",
                settings.sandbox.slots
            )));
        }
        let heartbeat_ms = self.heartbeat_ms.or(file.heartbeat_ms).unwrap_or(2_000);
        let heartbeat_ttl_ms = self
            .heartbeat_ttl_ms
            .or(file.heartbeat_ttl_ms)
            .unwrap_or(10_000);
        if heartbeat_ms < 50 || heartbeat_ttl_ms < 2 * heartbeat_ms {
            return Err(ConfigError::Invalid(format!(
                "heartbeat_ttl_ms ({heartbeat_ttl_ms}) must be at least twice heartbeat_ms ({heartbeat_ms}), which must be at least 50"
            )));
        }
        let dead_letter_max = self
            .dead_letter_max
            .or(file.dead_letter_max)
            .unwrap_or(10_000);
        if dead_letter_max == 0 {
            return Err(ConfigError::Invalid(
                "dead_letter_max must be at least 1".into(),
            ));
        }
        Ok(WorkerConfig {
            redis_url: self
                .redis
                .clone()
                .or(file.redis.clone())
                .unwrap_or_else(|| "redis://127.0.0.1:6379".into()),
            prefix,
            concurrency,
            prefetch,
            worker_id,
            embedded_redis: self.embedded_redis || file.embedded_redis.unwrap_or(false),
            demo: self.demo,
            metrics_addr,
            shutdown_grace_ms: self
                .shutdown_grace_ms
                .or(file.shutdown_grace_ms)
                .unwrap_or(25_000),
            metrics_linger_ms: self
                .metrics_linger_ms
                .or(file.metrics_linger_ms)
                .unwrap_or(6_000),
            max_attempts: self.max_attempts.or(file.max_attempts).unwrap_or(3).max(1),
            dead_letter_max,
            heartbeat_ms,
            heartbeat_ttl_ms,
            pool_size,
            settings,
        })
    }
}

/// Read the code of `run`/`submit`/`profile` from --code, FILE or stdin.
pub fn read_code(code: &Option<String>, file: &Option<PathBuf>) -> Result<String, ConfigError> {
    match (code, file) {
        (Some(c), None) => Ok(c.clone()),
        (None, Some(p)) if p.as_os_str() == "-" => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .map_err(|e| ConfigError::Invalid(format!("reading code from stdin: {e}")))?;
            Ok(s)
        }
        (None, Some(p)) => std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
            path: p.clone(),
            source,
        }),
        _ => Err(ConfigError::Invalid(
            "give the code with --code CODE, or as FILE, or `-` for stdin (exactly one)".into(),
        )),
    }
}

pub fn parse_language(s: &str) -> Result<Language, ConfigError> {
    Language::parse(s)
        .ok_or_else(|| ConfigError::Invalid(format!("unknown language {s:?} (python3, nodejs)")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_beats_file_beats_default() {
        let file: FileConfig =
            toml::from_str("prefix = \"fromfile\"\nconcurrency = 3\nallow_syscall = [\"uname\"]\n")
                .unwrap();
        let cli = Cli::parse_from([
            "sandq",
            "worker",
            "--prefix",
            "fromflag",
            "--allow-syscall",
            "sysinfo",
        ]);
        let Command::Worker(mut args) = cli.command else {
            panic!()
        };
        let dir = std::env::temp_dir().join(format!("sandq-cfg-{}", std::process::id()));
        std::fs::write(
            &dir,
            "prefix = \"fromfile\"\nconcurrency = 3\nallow_syscall = [\"uname\"]\n",
        )
        .unwrap();
        args.sandbox.config = Some(dir.clone());
        let cfg = args.resolve().unwrap();
        assert_eq!(cfg.prefix, "fromflag");
        assert_eq!(cfg.concurrency, 3);
        assert_eq!(
            cfg.settings.sandbox.allow_syscalls,
            vec!["sysinfo", "uname"]
        );
        assert_eq!(cfg.redis_url, "redis://127.0.0.1:6379");
        assert_eq!(file.prefix.as_deref(), Some("fromfile"));
        let _ = std::fs::remove_file(dir);
    }

    #[test]
    fn typos_in_the_file_are_errors() {
        assert!(toml::from_str::<FileConfig>("concurency = 3").is_err());
    }

    #[test]
    fn uid_ranges() {
        assert_eq!(parse_uid_range("10000-10999").unwrap(), (10000, 10999));
        assert!(parse_uid_range("0-10").is_err());
        assert!(parse_uid_range("10-5").is_err());
        assert!(parse_uid_range("x").is_err());
    }
}

//! `sandq submit --batch`: the jobs of a JSON-lines file through the queue,
//! their results into another, with progress and a summary.
//!
//! What keeps a 10,000-job batch cheap:
//! - every job of one run names the same reply list
//!   ([`Keys::client_results`]) as its `reply_to`, so the client waits on one
//!   key, not one per job: two Redis connections in all (pushes, and the
//!   blocking pop), however large the batch;
//! - at most `window` (`--parallel-wait`) jobs of the run are queued or
//!   running at once, and more are pushed (one RPUSH per chunk) as results
//!   come back. That bounds the client's memory and the reorder buffer of
//!   `--ordered`, and leaves room in the queue for other producers.
//!
//! Ids: a line's own id is kept; a line without one gets `<run>-<line>`, new
//! for every run, because a worker answers an id only once within the result
//! TTL (its done marker): a re-used id would never be answered. For the same
//! reason an id that already has a done marker is refused before it is pushed.
//!
//! Output: each result JSON as the worker wrote it, with the input line number
//! put in front as `"line"`, one record per line. `--resume` cuts off a torn
//! last record (left by a kill -9) and skips the lines already answered: by
//! id, or by line number for the lines that had no id of their own.
//!
//! Interrupt (SIGINT/SIGTERM): stop pushing, take the jobs that have not
//! started back out of the queue, wait for the few that are running (a second
//! signal stops the wait), write what came in, and print how to resume.

use crate::config::SubmitArgs;
use crate::job::{Language, Status, MAX_ID_LEN};
use crate::queue::{now_ms, Keys};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Jobs of the run queued or running at once, unless `--parallel-wait` says.
pub const DEFAULT_WINDOW: usize = 256;
/// Jobs per RPUSH.
const CHUNK: usize = 100;
/// How long one BLPOP blocks: also the longest delay before an interrupt is seen.
const POP_BLOCK_S: f64 = 0.5;
/// Results taken by one LPOP after a BLPOP returned one.
const DRAIN: usize = 500;
/// The worker's default job timeout, for lines that set none.
const DEFAULT_TIMEOUT_MS: u64 = 5_000;
/// Slack on top of the longest job timeout before a silent batch is given up,
/// and before the jobs still running at an interrupt are no longer waited for.
const STALL_MARGIN: Duration = Duration::from_secs(30);
const RUNNING_GRACE: Duration = Duration::from_secs(2);
/// Interval of the plain progress lines when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("{0}")]
    Usage(String),
    #[error("reading {path}: {source}")]
    Input {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("writing {path}: {source}")]
    Output {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}, line {line}: not a result record, so --resume cannot continue this file")]
    Resume { path: String, line: u64 },
    #[error("invalid Redis URL {url:?}: {source}")]
    Url {
        url: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("Redis {op}: {source}")]
    Redis {
        op: &'static str,
        #[source]
        source: redis::RedisError,
    },
    #[error("starting the async runtime: {0}")]
    Runtime(#[source] io::Error),
}

impl BatchError {
    /// Same scheme as the other subcommands: 2 usage, 4 Redis, 1 other.
    pub fn exit_code(&self) -> u8 {
        match self {
            BatchError::Usage(_) | BatchError::Resume { .. } => 2,
            BatchError::Url { .. } | BatchError::Redis { .. } => 4,
            _ => 1,
        }
    }
}

fn redis_err(op: &'static str) -> impl FnOnce(redis::RedisError) -> BatchError {
    move |source| BatchError::Redis { op, source }
}

/// A batch run's settings, from `sandq submit --batch ...`.
#[derive(Debug, Clone)]
pub struct BatchOptions {
    pub redis_url: String,
    pub prefix: String,
    /// The jobs, one JSON object per line; `-` is stdin.
    pub input: PathBuf,
    /// Where results go; `None` is stdout.
    pub out: Option<PathBuf>,
    pub ordered: bool,
    pub resume: bool,
    pub window: usize,
    /// Give up when no result comes for this long while jobs are outstanding
    /// [default: the longest outstanding job timeout + 30 s].
    pub wait: Option<Duration>,
    /// Fields set on every line that lacks them (--language, --timeout-ms, ...).
    pub defaults: Map<String, Value>,
}

impl BatchOptions {
    pub fn from_args(args: &SubmitArgs) -> Result<BatchOptions, BatchError> {
        let input = args
            .batch
            .clone()
            .ok_or_else(|| BatchError::Usage("--batch FILE is required".into()))?;
        if args.resume && args.out.is_none() {
            return Err(BatchError::Usage(
                "--resume needs --out: it reads the results already written there".into(),
            ));
        }
        let window = args.parallel_wait.unwrap_or(DEFAULT_WINDOW);
        if window == 0 {
            return Err(BatchError::Usage(
                "--parallel-wait must be at least 1".into(),
            ));
        }
        let mut defaults = Map::new();
        if let Some(l) = &args.language {
            let language = Language::parse(l).ok_or_else(|| {
                BatchError::Usage(format!("unknown language {l:?} (python3, nodejs)"))
            })?;
            defaults.insert("language".into(), language.as_str().into());
        }
        if let Some(t) = args.timeout_ms {
            defaults.insert("timeout_ms".into(), t.into());
        }
        if let Some(m) = args.memory_mb {
            defaults.insert("memory_mb".into(), m.into());
        }
        if args.enable_network {
            defaults.insert("enable_network".into(), true.into());
        }
        Ok(BatchOptions {
            redis_url: args.redis.clone(),
            prefix: args.prefix.clone(),
            input,
            out: args.out.clone(),
            ordered: args.ordered,
            resume: args.resume,
            window,
            wait: args.wait_ms.map(Duration::from_millis),
            defaults,
        })
    }
}

/// `sandq submit --batch`: run the batch on a runtime of its own and map the
/// outcome to the exit code.
pub fn submit(args: &SubmitArgs) -> Result<ExitCode, BatchError> {
    let opts = BatchOptions::from_args(args)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(BatchError::Runtime)?;
    let report = runtime.block_on(run(opts))?;
    Ok(ExitCode::from(report.exit_code()))
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Every line was read and every pushed job answered.
    Done,
    /// A signal stopped it.
    Interrupted,
    /// No result came for the wait time while jobs were outstanding.
    Stalled,
}

/// Counts of a run, as printed in the summary.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub end: Option<End>,
    /// Results by their `status`.
    pub by_status: HashMap<String, u64>,
    /// `duration_ms` of the results of jobs that ran.
    pub run_ms: Vec<u64>,
    pub bad_lines: u64,
    /// Lines skipped by --resume: their results were already in the output.
    pub skipped: u64,
    /// Jobs pushed and never answered (interrupt or stall).
    pub unanswered: u64,
    /// Of those, the ones taken back out of the queue before they started.
    pub taken_back: u64,
    pub elapsed: Duration,
}

impl Report {
    pub fn results(&self) -> u64 {
        self.by_status.values().sum()
    }

    fn count(&self, status: Status) -> u64 {
        self.by_status.get(status.as_str()).copied().unwrap_or(0)
    }

    /// 130 interrupted, 2 stalled, 1 when a job was rejected or failed
    /// inside sandq, a line was bad or a job went unanswered, else 0. A
    /// program that failed (`error`, `timeout`, ...) is an answer, not a
    /// failure of the batch.
    pub fn exit_code(&self) -> u8 {
        match self.end {
            Some(End::Interrupted) => 130,
            Some(End::Stalled) => 2,
            _ if self.count(Status::Rejected) > 0
                || self.count(Status::InternalError) > 0
                || self.bad_lines > 0
                || self.unanswered > 0 =>
            {
                1
            }
            _ => 0,
        }
    }

    /// `ok 9, error 1`, in the order of [`Status::ALL`], then unknown ones.
    fn status_line(&self) -> String {
        self.status_rows()
            .iter()
            .map(|(s, n)| format!("{s} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn status_rows(&self) -> Vec<(String, u64)> {
        let mut rows: Vec<(String, u64)> = Status::ALL
            .iter()
            .filter_map(|s| {
                let n = self.count(*s);
                (n > 0).then(|| (s.as_str().to_owned(), n))
            })
            .collect();
        let mut other: Vec<(String, u64)> = self
            .by_status
            .iter()
            .filter(|(s, _)| !Status::ALL.iter().any(|k| k.as_str() == s.as_str()))
            .map(|(s, n)| (s.clone(), *n))
            .collect();
        other.sort();
        rows.extend(other);
        rows
    }

    /// The table printed at the end.
    pub fn summary(&self) -> String {
        let secs = self.elapsed.as_secs_f64().max(1e-3);
        let mut s = format!(
            "sandq batch: {} results in {:.1} s ({:.1} jobs/s)\n",
            self.results(),
            secs,
            self.results() as f64 / secs
        );
        s.push_str(&format!("  {:<22}{:>8}\n", "status", "jobs"));
        for (status, n) in self.status_rows() {
            s.push_str(&format!("  {status:<22}{n:>8}\n"));
        }
        for (label, n, always) in [
            ("bad lines", self.bad_lines, true),
            ("skipped (resume)", self.skipped, self.skipped > 0),
            ("unanswered", self.unanswered, self.unanswered > 0),
            ("  taken back", self.taken_back, self.unanswered > 0),
        ] {
            if always {
                s.push_str(&format!("  {label:<22}{n:>8}\n"));
            }
        }
        let mut ms = self.run_ms.clone();
        ms.sort_unstable();
        match (percentile(&ms, 0.50), percentile(&ms, 0.95)) {
            (Some(p50), Some(p95)) => s.push_str(&format!(
                "  run time p50 {p50} ms, p95 {p95} ms, max {} ms (over {} jobs that ran)\n",
                ms.last().copied().unwrap_or(0),
                ms.len()
            )),
            _ => s.push_str("  run time: no job ran\n"),
        }
        s
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// Statuses of jobs that never ran: left out of the run-time percentiles.
fn ran(status: &str) -> bool {
    status != Status::Rejected.as_str() && status != Status::InternalError.as_str()
}

// ------------------------------------------------------------------ input

/// One line of the input, as the reader thread hands it over.
enum Line {
    Text(u64, String),
    NotUtf8(u64),
    Failed(io::Error),
}

/// Read the input on a thread of its own, so that a slow stdin never blocks
/// the collection of results. Returns the receiver and, for a regular file,
/// the number of non-blank lines (the progress total).
fn spawn_reader(input: &Path) -> Result<(mpsc::Receiver<Line>, Option<u64>), BatchError> {
    let name = input.display().to_string();
    let (reader, total): (Box<dyn BufRead + Send>, Option<u64>) = if input.as_os_str() == "-" {
        (Box::new(BufReader::new(io::stdin())), None)
    } else {
        let open = || {
            File::open(input).map_err(|source| BatchError::Input {
                path: name.clone(),
                source,
            })
        };
        let total = count_lines(open()?).map_err(|source| BatchError::Input {
            path: name.clone(),
            source,
        })?;
        (Box::new(BufReader::new(open()?)), Some(total))
    };
    let (tx, rx) = mpsc::channel(1024);
    std::thread::spawn(move || read_lines(reader, tx));
    Ok((rx, total))
}

fn count_lines(file: File) -> io::Result<u64> {
    let mut n = 0;
    let mut reader = BufReader::new(file);
    let mut buf = Vec::new();
    while reader.read_until(b'\n', &mut buf)? > 0 {
        if !buf.trim_ascii().is_empty() {
            n += 1;
        }
        buf.clear();
    }
    Ok(n)
}

fn read_lines(mut reader: Box<dyn BufRead + Send>, tx: mpsc::Sender<Line>) {
    let mut n = 0;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let line = match reader.read_until(b'\n', &mut buf) {
            Ok(0) => return,
            Ok(_) => {
                n += 1;
                match String::from_utf8(std::mem::take(&mut buf)) {
                    Ok(s) => Line::Text(n, s),
                    Err(_) => Line::NotUtf8(n),
                }
            }
            Err(e) => Line::Failed(e),
        };
        let failed = matches!(line, Line::Failed(_));
        // The receiver is gone when the batch stopped early: nothing to do.
        if tx.blocking_send(line).is_err() || failed {
            return;
        }
    }
}

fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_ID_LEN && s.chars().all(|c| c.is_ascii_graphic())
}

// ------------------------------------------------------------------ output

/// What earlier runs already wrote to the output: ids and line numbers.
#[derive(Debug, Default)]
struct Answered {
    ids: HashSet<String>,
    lines: HashSet<u64>,
}

/// Read the results an earlier run wrote, cutting off a torn last record.
fn read_answered(path: &Path) -> Result<Answered, BatchError> {
    let name = path.display().to_string();
    let io_err = |source| BatchError::Output {
        path: name.clone(),
        source,
    };
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Answered::default()),
        Err(e) => return Err(io_err(e)),
    };
    let mut text = Vec::new();
    file.read_to_end(&mut text).map_err(io_err)?;
    let mut answered = Answered::default();
    let mut end_of_good = 0;
    for (i, record) in text.split_inclusive(|b| *b == b'\n').enumerate() {
        if !record.ends_with(b"\n") {
            break; // torn: the run that wrote it was killed mid-write
        }
        let parsed = serde_json::from_slice::<Value>(record).ok().and_then(|v| {
            let id = v.get("id")?.as_str()?.to_owned();
            Some((id, v.get("line")?.as_u64()?))
        });
        let Some((id, line)) = parsed else {
            return Err(BatchError::Resume {
                path: name.clone(),
                line: i as u64 + 1,
            });
        };
        answered.ids.insert(id);
        answered.lines.insert(line);
        end_of_good += record.len();
    }
    if end_of_good < text.len() {
        file.set_len(end_of_good as u64).map_err(io_err)?;
        tracing::warn!(
            path = %name,
            bytes = text.len() - end_of_good,
            "cut off a torn last record"
        );
    }
    Ok(answered)
}

/// The result file (or stdout), with the reorder buffer of `--ordered`.
struct Output {
    w: Box<dyn Write>,
    name: String,
    ordered: bool,
    /// The next sequence number to write in ordered mode.
    next: u64,
    held: BTreeMap<u64, String>,
}

impl Output {
    fn open(opts: &BatchOptions) -> Result<Output, BatchError> {
        let (w, name): (Box<dyn Write>, String) = match &opts.out {
            None => (Box::new(BufWriter::new(io::stdout())), "stdout".into()),
            Some(path) => {
                let name = path.display().to_string();
                let file = if opts.resume {
                    OpenOptions::new().create(true).append(true).open(path)
                } else {
                    File::create(path)
                }
                .map_err(|source| BatchError::Output {
                    path: name.clone(),
                    source,
                })?;
                (Box::new(BufWriter::new(file)), name)
            }
        };
        Ok(Output {
            w,
            name,
            ordered: opts.ordered,
            next: 0,
            held: BTreeMap::new(),
        })
    }

    fn err(&self) -> impl FnOnce(io::Error) -> BatchError + '_ {
        move |source| BatchError::Output {
            path: self.name.clone(),
            source,
        }
    }

    fn write(&mut self, record: &str) -> Result<(), BatchError> {
        let mut line = String::with_capacity(record.len() + 1);
        line.push_str(record);
        line.push('\n');
        let r = self.w.write_all(line.as_bytes());
        r.map_err(self.err())
    }

    /// Write result `seq`, or hold it until those before it are written.
    fn put(&mut self, seq: u64, record: String) -> Result<(), BatchError> {
        if !self.ordered {
            return self.write(&record);
        }
        self.held.insert(seq, record);
        while let Some(record) = self.held.remove(&self.next) {
            self.write(&record)?;
            self.next += 1;
        }
        Ok(())
    }

    /// Write the held results too: after an interrupt, an answer out of order
    /// beats an answer lost (its id may not be answered again).
    fn release(&mut self) -> Result<(), BatchError> {
        for record in std::mem::take(&mut self.held).into_values() {
            self.write(&record)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), BatchError> {
        let r = self.w.flush();
        r.map_err(self.err())
    }
}

/// The output record: the worker's result JSON with `"line"` put in front, so
/// that results written as they come can be joined back to their input lines.
fn record(line: u64, result: &str) -> Option<String> {
    let body = result.trim().strip_prefix('{')?.trim_start();
    if body.starts_with('}') {
        return Some(format!("{{\"line\":{line}}}"));
    }
    Some(format!("{{\"line\":{line},{body}"))
}

// ------------------------------------------------------------------ progress

/// A bar on a terminal, plain lines every few seconds otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    /// Results expected: known up front for a file, grows for stdin.
    total: u64,
    started: Instant,
    last_line: Instant,
}

impl Progress {
    fn new(total: Option<u64>) -> Progress {
        let bar = io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} {rate} ETA {eta} {msg}",
            )
            .map(|s| {
                s.progress_chars("=> ").with_key(
                    "rate",
                    |state: &ProgressState, w: &mut dyn fmt::Write| {
                        // A failed write to the bar's buffer only costs a frame.
                        let _ = write!(w, "{:.1} jobs/s", state.per_sec());
                    },
                )
            })
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        Progress {
            bar,
            total: total.unwrap_or(0),
            started: Instant::now(),
            last_line: Instant::now(),
        }
    }

    fn note(&self, msg: &str) {
        match &self.bar {
            Some(bar) => bar.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    /// A line of a file turned out not to be a job (bad, skipped).
    fn drop_one(&mut self, known_total: bool) {
        if known_total {
            self.total = self.total.saturating_sub(1);
            if let Some(bar) = &self.bar {
                bar.set_length(self.total);
            }
        }
    }

    /// A line of stdin turned out to be a job.
    fn add_one(&mut self) {
        self.total += 1;
        if let Some(bar) = &self.bar {
            bar.set_length(self.total);
        }
    }

    fn update(&mut self, report: &Report, force: bool) {
        let done = report.results();
        match &self.bar {
            Some(bar) => {
                bar.set_position(done);
                bar.set_message(report.status_line());
            }
            None if force || self.last_line.elapsed() >= LOG_EVERY => {
                self.last_line = Instant::now();
                let secs = self.started.elapsed().as_secs_f64().max(1e-3);
                let rate = done as f64 / secs;
                let left = self.total.saturating_sub(done);
                let eta = if rate > 0.0 {
                    format!("{:.0} s", left as f64 / rate)
                } else {
                    "?".into()
                };
                eprintln!(
                    "sandq batch: {done}/{} done ({}), {rate:.1} jobs/s, ETA {eta}",
                    self.total,
                    report.status_line()
                );
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

// ------------------------------------------------------------------ the run

/// A job pushed and not yet answered.
struct Pending {
    line: u64,
    /// Position among the jobs pushed by this run, for `--ordered`.
    seq: u64,
    payload: String,
    timeout_ms: u64,
}

/// A line turned into a job, not yet pushed.
struct Prepared {
    line: u64,
    id: String,
    payload: String,
    timeout_ms: u64,
}

struct Batch {
    opts: BatchOptions,
    keys: Keys,
    reply_key: String,
    /// Prefix of the ids this run gives to lines without one.
    run_id: String,
    push: MultiplexedConnection,
    pop: MultiplexedConnection,
    inflight: HashMap<String, Pending>,
    /// Every id of this run, to refuse a second line with the same one.
    ids: HashSet<String>,
    answered: Answered,
    known_total: bool,
    next_seq: u64,
    out: Output,
    progress: Progress,
    report: Report,
    /// Last time a result came (or the first job went out after a quiet spell).
    last_progress: Instant,
}

/// Run a batch to its end; the summary is printed on stderr.
pub async fn run(opts: BatchOptions) -> Result<Report, BatchError> {
    let client =
        redis::Client::open(opts.redis_url.as_str()).map_err(|source| BatchError::Url {
            url: opts.redis_url.clone(),
            source,
        })?;
    let tag = format!("sandq-batch-{}", std::process::id());
    // Pushes never wait long; the pop blocks on purpose, so it gets no
    // response timeout and a connection of its own (a blocked connection
    // would hold up the pushes queued behind it).
    let push = connect(
        &client,
        Some(Duration::from_secs(30)),
        &format!("{tag}-push"),
    )
    .await?;
    let pop = connect(&client, None, &format!("{tag}-pop")).await?;
    let answered = match (&opts.out, opts.resume) {
        (Some(path), true) => read_answered(path)?,
        _ => Answered::default(),
    };
    let (mut lines, total) = spawn_reader(&opts.input)?;
    let out = Output::open(&opts)?;
    let keys = Keys::new(&opts.prefix);
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let reply_key = keys.client_results(&format!("batch-{run_id}"));
    let stop = CancellationToken::new();
    let now = CancellationToken::new();
    spawn_signal_handler(stop.clone(), now.clone());
    let mut batch = Batch {
        keys,
        reply_key,
        run_id,
        push,
        pop,
        inflight: HashMap::new(),
        ids: HashSet::new(),
        answered,
        known_total: total.is_some(),
        next_seq: 0,
        out,
        progress: Progress::new(total),
        report: Report::default(),
        last_progress: Instant::now(),
        opts,
    };
    let driven = batch.drive(&mut lines, &stop).await;
    // Stop the reader thread: it ends at its next send.
    drop(lines);
    let end = match driven {
        Ok(end) => end,
        Err(e) => {
            // Redis gone or the input unreadable: keep what came in, and say
            // how to go on once the cause is fixed.
            batch.out.release()?;
            batch.out.flush()?;
            batch.progress.finish();
            eprintln!("sandq batch: stopped: {e}. {}", batch.resume_hint());
            return Err(e);
        }
    };
    let stall_limit = batch.stall_limit();
    if end != End::Done {
        batch.abandon(&now).await?;
        batch.out.release()?;
    }
    batch.out.flush()?;
    batch.progress.update(&batch.report, true);
    batch.progress.finish();
    batch.report.end = Some(end);
    batch.report.elapsed = batch.progress.started.elapsed();
    eprint!("{}", batch.report.summary());
    match end {
        End::Done => {}
        End::Interrupted => eprintln!("sandq batch: interrupted. {}", batch.resume_hint()),
        End::Stalled => eprintln!(
            "sandq batch: no result for {} s while jobs were outstanding (is a worker running on prefix {:?}?). {}",
            stall_limit.as_secs(),
            batch.opts.prefix,
            batch.resume_hint()
        ),
    }
    Ok(batch.report)
}

async fn connect(
    client: &redis::Client,
    response_timeout: Option<Duration>,
    name: &str,
) -> Result<MultiplexedConnection, BatchError> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(response_timeout);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(redis_err("connect"))?;
    // Named, so that CLIENT LIST shows what holds the connections.
    redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(name)
        .query_async::<()>(&mut conn)
        .await
        .map_err(redis_err("connect"))?;
    Ok(conn)
}

/// First signal: stop the batch. Second: stop waiting for running jobs.
fn spawn_signal_handler(stop: CancellationToken, now: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        for token in [stop, now] {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            token.cancel();
        }
    });
}

impl Batch {
    async fn drive(
        &mut self,
        lines: &mut mpsc::Receiver<Line>,
        stop: &CancellationToken,
    ) -> Result<End, BatchError> {
        let mut input_done = false;
        loop {
            if stop.is_cancelled() {
                return Ok(End::Interrupted);
            }
            let mut chunk = Vec::new();
            while !input_done
                && self.inflight.len() + chunk.len() < self.opts.window
                && chunk.len() < CHUNK
            {
                let next = if self.inflight.is_empty() && chunk.is_empty() {
                    // Nothing to collect: wait for input (or a signal).
                    tokio::select! {
                        line = lines.recv() => line,
                        _ = stop.cancelled() => return Ok(End::Interrupted),
                    }
                } else {
                    // Take what is there; results are waiting to be collected.
                    match lines.try_recv() {
                        Ok(line) => Some(line),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => None,
                    }
                };
                match next {
                    None => input_done = true,
                    Some(Line::Failed(source)) => {
                        return Err(BatchError::Input {
                            path: self.opts.input.display().to_string(),
                            source,
                        })
                    }
                    Some(Line::NotUtf8(n)) => self.bad(n, "not UTF-8"),
                    Some(Line::Text(n, text)) => {
                        if let Some(job) = self.prepare(n, &text) {
                            chunk.push(job);
                        }
                    }
                }
            }
            if !chunk.is_empty() {
                self.push(chunk).await?;
            }
            if self.inflight.is_empty() {
                if input_done {
                    return Ok(End::Done);
                }
                continue;
            }
            self.collect().await?;
            // Once per round of results, not per result: the file can be
            // followed while the batch runs, at a write per round.
            self.out.flush()?;
            self.progress.update(&self.report, false);
            if self.last_progress.elapsed() > self.stall_limit() {
                return Ok(End::Stalled);
            }
        }
    }

    /// Turn one input line into a job, or report why not.
    fn prepare(&mut self, n: u64, text: &str) -> Option<Prepared> {
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        let mut job = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(job)) => job,
            Ok(_) => {
                self.bad(n, "a job must be a JSON object");
                return None;
            }
            Err(e) => {
                self.bad(n, &format!("not valid JSON ({e})"));
                return None;
            }
        };
        if job.get("reply_to").is_some_and(|v| !v.is_null()) {
            self.bad(
                n,
                "`reply_to` is set by the batch client, which collects every result itself; remove it",
            );
            return None;
        }
        let id = match job.get("id") {
            None | Some(Value::Null) => {
                if self.answered.lines.contains(&n) {
                    return self.skip();
                }
                format!("{}-{n}", self.run_id)
            }
            Some(Value::String(id)) if valid_id(id) => {
                if self.answered.ids.contains(id) {
                    return self.skip();
                }
                id.clone()
            }
            Some(_) => {
                self.bad(
                    n,
                    &format!(
                        "`id` must be a string of 1 to {MAX_ID_LEN} printable characters without spaces"
                    ),
                );
                return None;
            }
        };
        if !self.ids.insert(id.clone()) {
            self.bad(
                n,
                &format!("id {id:?} is on an earlier line too; a worker answers an id only once"),
            );
            return None;
        }
        for (field, value) in &self.opts.defaults {
            if job.get(field).is_none_or(Value::is_null) {
                job.insert(field.clone(), value.clone());
            }
        }
        job.insert("id".into(), id.clone().into());
        job.insert("reply_to".into(), self.reply_key.clone().into());
        if job.get("enqueued_at_ms").is_none_or(Value::is_null) {
            job.insert("enqueued_at_ms".into(), now_ms().into());
        }
        let timeout_ms = job
            .get("timeout_ms")
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_TIMEOUT_MS);
        if !self.known_total {
            self.progress.add_one();
        }
        Some(Prepared {
            line: n,
            id,
            payload: Value::Object(job).to_string(),
            timeout_ms,
        })
    }

    fn bad(&mut self, n: u64, why: &str) {
        self.report.bad_lines += 1;
        self.progress.drop_one(self.known_total);
        self.progress
            .note(&format!("sandq batch: line {n}: {why}; skipped"));
    }

    fn skip(&mut self) -> Option<Prepared> {
        self.report.skipped += 1;
        self.progress.drop_one(self.known_total);
        None
    }

    /// Push a chunk with one RPUSH, after refusing the ids a worker already
    /// answered: a worker would answer them with the stored result instead of
    /// running this line's job, which is rarely what a batch means.
    async fn push(&mut self, chunk: Vec<Prepared>) -> Result<(), BatchError> {
        let mut check = redis::pipe();
        for job in &chunk {
            check.cmd("EXISTS").arg(self.keys.done(&job.id));
        }
        let done: Vec<i64> = check
            .query_async(&mut self.push)
            .await
            .map_err(redis_err("check ids"))?;
        if self.inflight.is_empty() {
            self.last_progress = Instant::now();
        }
        let mut rpush = redis::cmd("RPUSH");
        rpush.arg(self.keys.queue());
        let mut pushed = 0;
        for (job, done) in chunk.into_iter().zip(done) {
            if done > 0 {
                self.bad(
                    job.line,
                    &format!(
                        "id {:?} was answered within its result TTL already, and a worker would answer this line with that stored result instead of running it; give the job a new id",
                        job.id
                    ),
                );
                continue;
            }
            rpush.arg(&job.payload);
            pushed += 1;
            self.inflight.insert(
                job.id,
                Pending {
                    line: job.line,
                    seq: self.next_seq,
                    payload: job.payload,
                    timeout_ms: job.timeout_ms,
                },
            );
            self.next_seq += 1;
        }
        if pushed > 0 {
            rpush
                .query_async::<i64>(&mut self.push)
                .await
                .map_err(redis_err("push"))?;
        }
        Ok(())
    }

    /// Wait briefly for results, then take every one that is there.
    async fn collect(&mut self) -> Result<(), BatchError> {
        let first: Option<(String, String)> = redis::cmd("BLPOP")
            .arg(&self.reply_key)
            .arg(POP_BLOCK_S)
            .query_async(&mut self.pop)
            .await
            .map_err(redis_err("wait for results"))?;
        let Some((_, first)) = first else {
            return Ok(());
        };
        self.accept(&first)?;
        self.drain().await
    }

    /// Take the results already on the reply list, without blocking.
    async fn drain(&mut self) -> Result<(), BatchError> {
        let more: Option<Vec<String>> = redis::cmd("LPOP")
            .arg(&self.reply_key)
            .arg(DRAIN)
            .query_async(&mut self.pop)
            .await
            .map_err(redis_err("take results"))?;
        for result in more.unwrap_or_default() {
            self.accept(&result)?;
        }
        Ok(())
    }

    fn accept(&mut self, result: &str) -> Result<(), BatchError> {
        let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(result) else {
            tracing::warn!(
                bytes = result.len(),
                "a result on the reply list is not a JSON object; ignored"
            );
            return Ok(());
        };
        let Some(id) = fields.get("id").and_then(Value::as_str) else {
            tracing::warn!("a result without an id on the reply list; ignored");
            return Ok(());
        };
        let Some(job) = self.inflight.remove(id) else {
            tracing::debug!(id, "result of a job this run no longer waits for");
            return Ok(());
        };
        let status = fields
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown");
        *self.report.by_status.entry(status.to_owned()).or_default() += 1;
        if ran(status) {
            let ms = fields.get("duration_ms").and_then(Value::as_u64);
            self.report.run_ms.push(ms.unwrap_or(0));
        }
        self.last_progress = Instant::now();
        // `result` parsed as an object, so it has the braces `record` needs.
        if let Some(rec) = record(job.line, result) {
            self.out.put(job.seq, rec)?;
        }
        Ok(())
    }

    /// Wait this long without any result before the batch is given up.
    fn stall_limit(&self) -> Duration {
        self.opts.wait.unwrap_or_else(|| {
            let longest = self
                .inflight
                .values()
                .map(|p| p.timeout_ms)
                .max()
                .unwrap_or(DEFAULT_TIMEOUT_MS);
            Duration::from_millis(longest) + STALL_MARGIN
        })
    }

    /// After an interrupt or a stall: take the jobs that have not started
    /// back out of the queue (they would run for nobody), then wait for the
    /// running ones up to their timeout, unless told to stop now.
    async fn abandon(&mut self, now: &CancellationToken) -> Result<(), BatchError> {
        let ids: Vec<String> = self.inflight.keys().cloned().collect();
        let mut take_back = redis::pipe();
        for id in &ids {
            if let Some(p) = self.inflight.get(id) {
                take_back
                    .cmd("LREM")
                    .arg(self.keys.queue())
                    .arg(1)
                    .arg(&p.payload);
            }
        }
        if !ids.is_empty() {
            let removed: Vec<i64> = take_back
                .query_async(&mut self.push)
                .await
                .map_err(redis_err("take back jobs"))?;
            for (id, removed) in ids.iter().zip(removed) {
                if removed > 0 {
                    self.inflight.remove(id);
                    self.report.taken_back += 1;
                    self.report.unanswered += 1;
                }
            }
        }
        let running = self.inflight.len();
        if running > 0 {
            let longest = self.inflight.values().map(|p| p.timeout_ms).max();
            let deadline = Instant::now()
                + Duration::from_millis(longest.unwrap_or(DEFAULT_TIMEOUT_MS))
                + RUNNING_GRACE;
            self.progress.note(&format!(
                "sandq batch: {} queued jobs taken back; waiting up to {} s for the {running} running (signal again to stop now)",
                self.report.taken_back,
                deadline.saturating_duration_since(Instant::now()).as_secs()
            ));
            while !self.inflight.is_empty() && Instant::now() < deadline && !now.is_cancelled() {
                self.collect().await?;
                self.progress.update(&self.report, false);
            }
        }
        self.drain().await?;
        self.report.unanswered += self.inflight.len() as u64;
        self.inflight.clear();
        Ok(())
    }

    /// How to pick up where this run stopped.
    fn resume_hint(&self) -> String {
        if self.opts.out.is_none() {
            return "Results went to stdout; run with --out FILE to be able to --resume.".into();
        }
        let mut args: Vec<String> = std::env::args().map(|a| shell_quote(&a)).collect();
        if !args.iter().any(|a| a == "--resume") {
            args.push("--resume".into());
        }
        if let Some(program) = args.first_mut() {
            *program = "sandq".into();
        }
        let stdin_note = if self.opts.input.as_os_str() == "-" {
            " (with the same input on stdin)"
        } else {
            ""
        };
        format!(
            "{} results are in {}; resume{stdin_note} with:\n  {}",
            self.report.results(),
            self.out.name,
            args.join(" ")
        )
    }
}

fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+%".contains(c));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_puts_the_line_first() {
        assert_eq!(
            record(7, r#"{"id":"a","status":"ok"}"#).as_deref(),
            Some(r#"{"line":7,"id":"a","status":"ok"}"#)
        );
        assert_eq!(record(1, " { } ").as_deref(), Some(r#"{"line":1}"#));
        assert_eq!(record(1, "[1]"), None);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Some(50));
        assert_eq!(percentile(&v, 0.95), Some(95));
        assert_eq!(percentile(&[7], 0.95), Some(7));
        assert_eq!(percentile(&[], 0.5), None);
    }

    #[test]
    fn exit_codes() {
        let mut r = Report {
            end: Some(End::Done),
            ..Report::default()
        };
        r.by_status.insert("ok".into(), 3);
        r.by_status.insert("error".into(), 1);
        assert_eq!(r.exit_code(), 0, "a failed program is an answer");
        r.by_status.insert("rejected".into(), 1);
        assert_eq!(r.exit_code(), 1);
        r.end = Some(End::Interrupted);
        assert_eq!(r.exit_code(), 130);
    }

    #[test]
    fn resume_cuts_a_torn_tail_and_refuses_garbage() {
        let dir = std::env::temp_dir().join(format!("sandq-batch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.jsonl");
        std::fs::write(
            &path,
            "{\"line\":1,\"id\":\"a\"}\n{\"line\":3,\"id\":\"x-3\"}\n{\"line\":4,\"id\"",
        )
        .unwrap();
        let a = read_answered(&path).unwrap();
        assert!(a.ids.contains("a") && a.ids.contains("x-3"));
        assert!(a.lines.contains(&1) && a.lines.contains(&3));
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("}\n"));
        std::fs::write(&path, "not a record\n").unwrap();
        assert!(matches!(
            read_answered(&path),
            Err(BatchError::Resume { line: 1, .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("--out"), "--out");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}

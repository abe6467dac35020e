//! The wire contract: job JSON in, result JSON out.
//!
//! A producer's JSON is checked field by field here, so that a bad job becomes a
//! `rejected` result naming the field instead of a crashed worker. Validation is
//! pure: it knows the worker's limits ([`Limits`]) but nothing of Redis or of
//! processes. The field list is documented in `README.md` ("The wire contract").

use serde::Serialize;
use serde_json::{Map, Value};
use std::fmt;

/// Largest `code` (and `preload`) a job may carry.
pub const MAX_CODE_BYTES: usize = 1024 * 1024;
/// Largest `stdin` a job may carry.
pub const MAX_STDIN_BYTES: usize = 8 * 1024 * 1024;
/// Largest payload taken as a job: its fields at their limits, and room for
/// the rest. A longer one is dead-lettered unread (with its first bytes).
pub const MAX_PAYLOAD_BYTES: usize = 2 * MAX_CODE_BYTES + MAX_STDIN_BYTES + 1024 * 1024;
/// Longest job id; ids end up in Redis key names.
pub const MAX_ID_LEN: usize = 200;
/// Longest `result_ttl_s` (a year). Redis itself refuses expiries past about
/// 9.2e15 s; a job asking for more than a year is more likely a unit mistake.
pub const MAX_RESULT_TTL_S: u64 = 365 * 24 * 3600;
/// Highest timeout an operator may allow (`--max-timeout-ms`): a day.
pub const MAX_TIMEOUT_MS: u64 = 24 * 3600 * 1000;
/// Most memory an operator may allow a job (`--max-memory-mb`): 1 TiB.
pub const MAX_MEMORY_MB: u64 = 1024 * 1024;

/// The interpreters sandq runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Language {
    Python3,
    Nodejs,
}

impl Language {
    pub const ALL: [Language; 2] = [Language::Python3, Language::Nodejs];

    /// The name used on the wire, in metrics and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python3 => "python3",
            Language::Nodejs => "nodejs",
        }
    }

    pub fn parse(s: &str) -> Option<Language> {
        match s {
            "python3" | "python" => Some(Language::Python3),
            "nodejs" | "node" | "javascript" => Some(Language::Nodejs),
            _ => None,
        }
    }
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a job ended. Serialized in snake_case on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Error,
    Timeout,
    MemoryLimit,
    OutputLimit,
    Violation,
    Rejected,
    InternalError,
}

impl Status {
    pub const ALL: [Status; 8] = [
        Status::Ok,
        Status::Error,
        Status::Timeout,
        Status::MemoryLimit,
        Status::OutputLimit,
        Status::Violation,
        Status::Rejected,
        Status::InternalError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Error => "error",
            Status::Timeout => "timeout",
            Status::MemoryLimit => "memory_limit",
            Status::OutputLimit => "output_limit",
            Status::Violation => "violation",
            Status::Rejected => "rejected",
            Status::InternalError => "internal_error",
        }
    }
}

/// The worker's bounds on what a job may ask for.
#[derive(Debug, Clone)]
pub struct Limits {
    pub default_timeout_ms: u64,
    pub max_timeout_ms: u64,
    pub default_memory_mb: u64,
    pub max_memory_mb: u64,
    pub allow_network: bool,
    pub default_result_ttl_s: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            default_timeout_ms: 5_000,
            max_timeout_ms: 60_000,
            default_memory_mb: 256,
            max_memory_mb: 2_048,
            allow_network: false,
            default_result_ttl_s: 3_600,
        }
    }
}

/// A validated job, ready to run.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub language: Language,
    pub code: String,
    pub preload: String,
    pub stdin: String,
    pub enable_network: bool,
    pub timeout_ms: u64,
    pub memory_mb: u64,
    /// Where the result goes; `None` means the default `<prefix>:result:<id>`.
    pub reply_to: Option<String>,
    pub result_ttl_s: u64,
    /// Producer's enqueue time (epoch ms), for the queue-wait metric.
    pub enqueued_at_ms: Option<u64>,
    /// Deadline (epoch ms): a job taken after it is not run.
    pub expires_at_ms: Option<u64>,
}

/// Why a payload cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// Not JSON, or JSON but not an object: there is no id to answer to, so the
    /// payload goes to the dead-letter list.
    #[error("{0}")]
    Unreadable(String),
    /// A readable job with a bad field: answered with a `rejected` result.
    #[error("{message}")]
    Invalid {
        id: String,
        reply_to: Option<String>,
        message: String,
    },
}

/// Parse and validate one payload taken from the queue.
pub fn parse(raw: &[u8], limits: &Limits) -> Result<Job, JobError> {
    if raw.len() > MAX_PAYLOAD_BYTES {
        return Err(JobError::Unreadable(format!(
            "payload is {} bytes, more than the limit of {MAX_PAYLOAD_BYTES}",
            raw.len()
        )));
    }
    let value: Value = serde_json::from_slice(raw)
        .map_err(|e| JobError::Unreadable(format!("payload is not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(JobError::Unreadable(format!(
            "payload is JSON {} where a job object was expected",
            kind(&value)
        )));
    };
    let id = match obj.get("id") {
        None | Some(Value::Null) => uuid::Uuid::new_v4().to_string(),
        Some(Value::String(s)) if valid_id(s) => s.clone(),
        Some(Value::String(_)) => {
            return Err(JobError::Unreadable(format!(
                "field `id`: must be 1 to {MAX_ID_LEN} printable characters without spaces"
            )))
        }
        Some(other) => {
            return Err(JobError::Unreadable(format!(
                "field `id`: expected a string, got {}",
                kind(other)
            )))
        }
    };
    // reply_to is read first so that a rejection still reaches the producer.
    let reply_to = match optional_str(&obj, "reply_to") {
        Ok(r) => r,
        Err(message) => return Err(JobError::Unreadable(message)),
    };
    validate(&obj, id.clone(), reply_to.clone(), limits).map_err(|message| JobError::Invalid {
        id,
        reply_to,
        message,
    })
}

fn validate(
    obj: &Map<String, Value>,
    id: String,
    reply_to: Option<String>,
    limits: &Limits,
) -> Result<Job, String> {
    let language = match obj.get("language") {
        None | Some(Value::Null) => return Err("field `language` is required".into()),
        Some(Value::String(s)) => Language::parse(s).ok_or_else(|| {
            format!("field `language`: unknown language {s:?} (supported: python3, nodejs)")
        })?,
        Some(other) => {
            return Err(format!(
                "field `language`: expected a string, got {}",
                kind(other)
            ))
        }
    };
    let code = optional_str(obj, "code")?.ok_or("field `code` is required")?;
    if code.len() > MAX_CODE_BYTES {
        return Err(format!(
            "field `code`: {} bytes, more than the limit of {MAX_CODE_BYTES}",
            code.len()
        ));
    }
    let preload = optional_str(obj, "preload")?.unwrap_or_default();
    if preload.len() > MAX_CODE_BYTES {
        return Err(format!(
            "field `preload`: {} bytes, more than the limit of {MAX_CODE_BYTES}",
            preload.len()
        ));
    }
    let stdin = optional_str(obj, "stdin")?.unwrap_or_default();
    if stdin.len() > MAX_STDIN_BYTES {
        return Err(format!(
            "field `stdin`: {} bytes, more than the limit of {MAX_STDIN_BYTES}",
            stdin.len()
        ));
    }
    let enable_network = match obj.get("enable_network") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(format!(
                "field `enable_network`: expected a boolean, got {}",
                kind(other)
            ))
        }
    };
    if enable_network && !limits.allow_network {
        return Err(
            "field `enable_network`: network was asked for but this worker does not allow it"
                .into(),
        );
    }
    let timeout_ms = optional_u64(obj, "timeout_ms")?.unwrap_or(limits.default_timeout_ms);
    if timeout_ms == 0 {
        return Err("field `timeout_ms`: must be at least 1".into());
    }
    let memory_mb = optional_u64(obj, "memory_mb")?.unwrap_or(limits.default_memory_mb);
    if memory_mb < 16 {
        return Err("field `memory_mb`: must be at least 16".into());
    }
    let result_ttl_s = optional_u64(obj, "result_ttl_s")?.unwrap_or(limits.default_result_ttl_s);
    if !(1..=MAX_RESULT_TTL_S).contains(&result_ttl_s) {
        return Err(format!(
            "field `result_ttl_s`: {result_ttl_s} is out of range (1 to {MAX_RESULT_TTL_S}, a year)"
        ));
    }
    let enqueued_at_ms = optional_u64(obj, "enqueued_at_ms")?;
    let expires_at_ms = optional_u64(obj, "expires_at_ms")?;
    Ok(Job {
        id,
        language,
        code,
        preload,
        stdin,
        enable_network,
        // Asking for more than the worker allows is capped, not rejected: the
        // producer may not know every worker's limits.
        timeout_ms: timeout_ms.min(limits.max_timeout_ms),
        memory_mb: memory_mb.min(limits.max_memory_mb),
        reply_to,
        result_ttl_s,
        enqueued_at_ms,
        expires_at_ms,
    })
}

fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_ID_LEN && s.chars().all(|c| c.is_ascii_graphic())
}

fn optional_str(obj: &Map<String, Value>, field: &str) -> Result<Option<String>, String> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!(
            "field `{field}`: expected a string, got {}",
            kind(other)
        )),
    }
}

fn optional_u64(obj: &Map<String, Value>, field: &str) -> Result<Option<u64>, String> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("field `{field}`: expected a non-negative integer, got {n}")),
        Some(other) => Err(format!(
            "field `{field}`: expected a non-negative integer, got {}",
            kind(other)
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The blocked system call behind a `violation`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub syscall: String,
    pub number: i64,
    /// The call with the arguments that were refused, when they, not the
    /// name, decided it (`socket(AF_VSOCK, SOCK_STREAM, 0)`): for the error
    /// text only, so `syscall` stays a bounded metric label.
    #[serde(skip)]
    pub call: Option<String>,
}

/// The result JSON pushed to the reply key.
#[derive(Debug, Clone, Serialize)]
pub struct JobResult {
    pub id: String,
    pub status: Status,
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    pub stdout: String,
    pub stderr: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub error: Option<String>,
    pub violation: Option<Violation>,
    pub duration_ms: u64,
    pub cpu_ms: Option<u64>,
    pub max_rss_kb: Option<u64>,
    pub language: Option<&'static str>,
    pub worker: String,
    pub attempt: u32,
}

impl JobResult {
    /// A result for a job that never ran (rejected, expired, dead-lettered).
    pub fn not_run(id: &str, status: Status, error: String, worker: &str) -> JobResult {
        JobResult {
            id: id.to_owned(),
            status,
            exit_code: None,
            signal: None,
            stdout: String::new(),
            stderr: String::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            error: Some(error),
            violation: None,
            duration_ms: 0,
            cpu_ms: None,
            max_rss_kb: None,
            language: None,
            worker: worker.to_owned(),
            attempt: 1,
        }
    }

    pub fn to_json(&self) -> String {
        // A struct of strings, numbers and options cannot fail to serialize.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }

    /// The result JSON in at most `max` bytes (Redis refuses a longer
    /// argument): while it is longer, the longer of stdout and stderr is cut
    /// at a character boundary and its `*_truncated` flag set. A cut takes
    /// the excess scaled by how much the stream grows in JSON (escapes take
    /// up to 6 bytes a byte); after a few tries it takes the excess itself
    /// in raw bytes, which always fits (no character encodes shorter).
    pub fn to_json_within(&mut self, max: usize) -> String {
        for tries in 0.. {
            let json = self.to_json();
            let Some(excess) = json.len().checked_sub(max).filter(|e| *e > 0) else {
                return json;
            };
            let (stream, flag) = if self.stdout.len() >= self.stderr.len() {
                (&mut self.stdout, &mut self.stdout_truncated)
            } else {
                (&mut self.stderr, &mut self.stderr_truncated)
            };
            if stream.is_empty() {
                return json;
            }
            let cut = if tries < 4 {
                let encoded = serde_json::to_string(stream).map_or(stream.len(), |e| e.len());
                (excess as u128 * stream.len() as u128).div_ceil(encoded as u128) as usize
            } else {
                excess
            };
            let mut keep = stream.len().saturating_sub(cut.max(1));
            while !stream.is_char_boundary(keep) {
                keep -= 1;
            }
            stream.truncate(keep);
            *flag = true;
        }
        unreachable!("the loop returns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    fn invalid(raw: &str) -> String {
        match parse(raw.as_bytes(), &limits()) {
            Err(JobError::Invalid { message, .. }) => message,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn minimal_job_gets_defaults() {
        let job = parse(br#"{"language":"python3","code":"print(1)"}"#, &limits()).unwrap();
        assert_eq!(job.language, Language::Python3);
        assert_eq!(job.timeout_ms, 5_000);
        assert_eq!(job.memory_mb, 256);
        assert_eq!(job.result_ttl_s, 3_600);
        assert!(!job.enable_network);
        assert_eq!(job.id.len(), 36, "a uuid v4 is assigned");
    }

    #[test]
    fn limits_are_capped_not_rejected() {
        let job = parse(
            br#"{"id":"a","language":"python3","code":"","timeout_ms":999999,"memory_mb":999999}"#,
            &limits(),
        )
        .unwrap();
        assert_eq!(job.timeout_ms, 60_000);
        assert_eq!(job.memory_mb, 2_048);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        assert!(parse(
            br#"{"language":"python3","code":"","shiny":[1]}"#,
            &limits()
        )
        .is_ok());
    }

    #[test]
    fn bad_fields_are_named() {
        assert!(invalid(r#"{"language":"cobol","code":""}"#).contains("`language`"));
        assert!(invalid(r#"{"language":"python3"}"#).contains("`code` is required"));
        assert!(invalid(r#"{"language":"python3","code":1}"#).contains("`code`"));
        assert!(
            invalid(r#"{"language":"python3","code":"","timeout_ms":"5"}"#)
                .contains("`timeout_ms`")
        );
        assert!(
            invalid(r#"{"language":"python3","code":"","timeout_ms":-1}"#).contains("`timeout_ms`")
        );
        assert!(
            invalid(r#"{"language":"python3","code":"","enable_network":true}"#)
                .contains("does not allow")
        );
        let big = format!(
            r#"{{"language":"python3","code":"{}"}}"#,
            "x".repeat(MAX_CODE_BYTES + 1)
        );
        assert!(invalid(&big).contains("more than the limit"));
    }

    #[test]
    fn rejection_keeps_id_and_reply_to() {
        match parse(br#"{"id":"j1","reply_to":"r","language":7}"#, &limits()) {
            Err(JobError::Invalid { id, reply_to, .. }) => {
                assert_eq!(id, "j1");
                assert_eq!(reply_to.as_deref(), Some("r"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unreadable_payloads() {
        for raw in [
            "not json",
            "[1,2]",
            "\"s\"",
            r#"{"id":5}"#,
            r#"{"id":"a b"}"#,
        ] {
            assert!(
                matches!(
                    parse(raw.as_bytes(), &limits()),
                    Err(JobError::Unreadable(_))
                ),
                "{raw}"
            );
        }
    }

    #[test]
    fn result_json_is_cut_to_fit() {
        let mut r = JobResult::not_run("x", Status::Ok, "e".into(), "w1");
        r.stdout = "\u{1}\u{4e2d}".repeat(50_000);
        r.stderr = "e".repeat(1000);
        let full = r.to_json().len();
        let json = r.to_json_within(100_000);
        assert!(
            json.len() <= 100_000 && json.len() > 90_000,
            "{}",
            json.len()
        );
        assert!(full > 300_000);
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["stdout_truncated"], true);
        assert_eq!(v["stderr_truncated"], false);
        assert_eq!(v["stderr"].as_str().unwrap().len(), 1000);
        let mut small = JobResult::not_run("x", Status::Ok, "e".into(), "w1");
        assert_eq!(small.to_json_within(100_000), small.to_json());
        assert!(!small.stdout_truncated);
    }

    #[test]
    fn result_ttl_is_bounded() {
        let job = |ttl: &str| format!(r#"{{"language":"python3","code":"","result_ttl_s":{ttl}}}"#);
        assert!(invalid(&job("10000000000000000")).contains("`result_ttl_s`"));
        assert!(invalid(&job("0")).contains("`result_ttl_s`"));
        assert!(invalid(&job("1e3")).contains("`result_ttl_s`"));
        assert!(parse(job("31536000").as_bytes(), &limits()).is_ok());
    }

    #[test]
    fn result_json_has_every_field() {
        let r = JobResult::not_run("x", Status::Rejected, "why".into(), "w1");
        let v: Value = serde_json::from_str(&r.to_json()).unwrap();
        for field in [
            "id",
            "status",
            "exit_code",
            "signal",
            "stdout",
            "stderr",
            "stdout_truncated",
            "stderr_truncated",
            "error",
            "violation",
            "duration_ms",
            "worker",
            "attempt",
        ] {
            assert!(v.get(field).is_some(), "missing {field}");
        }
        assert_eq!(v["status"], "rejected");
    }
}

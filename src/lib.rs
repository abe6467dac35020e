//! sandq: a worker that takes untrusted Python 3 and Node.js jobs from a Redis
//! list, runs each in a locked-down interpreter, and pushes the result back.
//!
//! The path of a job through the modules:
//!
//! ```text
//! producer --RPUSH--> <p>:queue
//!    queue::Queue::fetch (BLMOVE into <p>:processing:<worker>)
//!    job::parse            validate the JSON; bad payload -> dead letter / rejected
//!    worker::handle        the only place that joins queue and runner
//!    runner::pool          a pre-started, locked-down interpreter if one fits, else
//!    runner::Runner::run   scratch dir, prescript, pipes, then ...
//!    sandbox::spawn        clone3 + the ordered lock-down + execve
//!    runner (supervise)    poll loop: output caps, timeout, seccomp violations
//!    queue::Queue::complete  result pushed once, job removed (one Lua script)
//! producer <--BLPOP-- <p>:result:<id>
//! ```
//!
//! Module boundaries: [`sandbox`] knows nothing of Redis or tokio; [`runner`]
//! nothing of Redis; [`queue`] nothing of processes; only [`worker`] joins them.
//! [`config`] turns flags, environment and file into settings; [`metrics`]
//! owns the Prometheus registry and the HTTP endpoints.
//! [`batch`] and [`gateway`] are producers (`submit --batch`; the dify-sandbox HTTP API);
//! [`bench`] measures a worker against the bare interpreters.

pub mod batch;
pub mod bench;
pub mod cli;
pub mod config;
pub mod gateway;
pub mod job;
pub mod metrics;
pub mod queue;
pub mod runner;
pub mod sandbox;
pub mod worker;

//! Egress for jobs with network: an HTTP proxy on the job's own loopback,
//! served by the worker, with a destination policy.
//!
//! A job with `enable_network` still gets a network namespace of its own: it
//! sees only `lo`, so the worker's Redis, its metrics port and every other
//! service on the host's loopback are simply not there (the judge0 advisory
//! CVE-2024-29021 was a sandbox sharing the host's network). Its only way out
//! is `127.0.0.1:3128` inside that namespace: a listening socket the child
//! created there (while still root) and handed to the worker with the seccomp
//! listener. The worker accepts on it and relays `CONNECT host:port` and
//! absolute-URI HTTP requests ([`connection`]), directly or through an
//! operator's upstream proxy. In both modes the destination is decided the
//! same way: the authority is normalised ([`authority`]), resolved on the
//! worker, every address checked ([`policy`]), and the connection made to
//! (or, upstream, the proxy told) the very address that was checked, so a
//! second resolution cannot swap it.
//!
//! A job cannot make the worker hold more than it allows: at most
//! [`MAX_CONNECTIONS`] relay connections at once (more are answered `429`
//! and closed), each costing two fds (the job's end and the destination's)
//! and two threads, all released when the connection ends, and all cut when
//! the job ends. An `accept` that fails (the worker out of fds) backs off and
//! tries again rather than giving up on the job.
//!
//! Blocking std threads, not tokio: the runner has no runtime, and a job's
//! connections are few (capped).

mod authority;
mod connection;
pub mod policy;

pub use policy::{Cidr, EgressPolicy};

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

/// The port of the relay on the job's loopback.
pub const PROXY_PORT: u16 = 3128;
/// Relay connections one job may hold open at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Stack of a relay thread (std's default is 2 MiB): heads are parsed on
/// the heap, but the resolver (getaddrinfo, NSS modules) wants some room.
const THREAD_STACK: usize = 512 * 1024;
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Short: a stopping relay waits for its accept thread.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(100);

/// What the accept thread and the connection threads share.
struct Shared {
    policy: Arc<EgressPolicy>,
    conns: Mutex<Conns>,
    /// The cap was reached once (logged once per job, not per connection).
    cap_logged: AtomicBool,
    accept_error_logged: AtomicBool,
    span: tracing::Span,
}

/// The open connections, by id: their sockets, to cut them when the job ends.
#[derive(Default)]
struct Conns {
    stopping: bool,
    next_id: u64,
    open: HashMap<u64, Vec<Arc<TcpStream>>>,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, Conns> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A connection's place among the job's open ones: it counts against the
/// cap until dropped, and lets a stopping relay cut its sockets.
struct Slot {
    shared: Arc<Shared>,
    id: u64,
}

enum NoSlot {
    Full,
    Stopping,
}

impl Slot {
    fn take(shared: &Arc<Shared>, client: &Arc<TcpStream>) -> Result<Slot, NoSlot> {
        let mut conns = shared.conns();
        if conns.stopping {
            return Err(NoSlot::Stopping);
        }
        if conns.open.len() >= MAX_CONNECTIONS {
            return Err(NoSlot::Full);
        }
        let id = conns.next_id;
        conns.next_id += 1;
        conns.open.insert(id, vec![client.clone()]);
        Ok(Slot {
            shared: shared.clone(),
            id,
        })
    }

    fn policy(&self) -> &EgressPolicy {
        &self.shared.policy
    }

    /// Register the destination's socket, so that the job's end cuts it too.
    /// Fails once the relay is stopping: the connection must then end.
    fn adopt(&self, server: &Arc<TcpStream>) -> bool {
        let mut conns = self.shared.conns();
        if conns.stopping {
            return false;
        }
        match conns.open.get_mut(&self.id) {
            Some(sockets) => {
                sockets.push(server.clone());
                true
            }
            None => false,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.conns().open.remove(&self.id);
    }
}

/// A running relay for one job; stops (and cuts its connections) when dropped.
pub struct Relay {
    listener: Arc<TcpListener>,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Relay {
    pub fn start(listener: TcpListener, policy: Arc<EgressPolicy>) -> Relay {
        let listener = Arc::new(listener);
        let shared = Arc::new(Shared {
            policy,
            conns: Mutex::default(),
            cap_logged: AtomicBool::new(false),
            accept_error_logged: AtomicBool::new(false),
            span: tracing::Span::current(),
        });
        let (l, s) = (listener.clone(), shared.clone());
        let accept = std::thread::Builder::new()
            .name("egress-accept".into())
            .stack_size(THREAD_STACK)
            .spawn(move || s.span.clone().in_scope(|| accept_loop(&l, &s)));
        let accept = match accept {
            Ok(handle) => Some(handle),
            Err(error) => {
                // The job then finds its proxy unanswered: connections wait
                // in the backlog until the job ends.
                tracing::error!(%error, "egress relay: cannot start its thread");
                None
            }
        };
        Relay {
            listener,
            shared,
            accept,
        }
    }

    /// Relay connections open now.
    #[cfg(test)]
    fn open_connections(&self) -> usize {
        self.shared.conns().open.len()
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let client = match listener.accept() {
            Ok((stream, _)) => Arc::new(stream),
            Err(error) => {
                if shared.conns().stopping {
                    return;
                }
                // Out of fds (EMFILE/ENFILE), or a connection that was
                // reset before it was taken: wait a little and go on; the
                // job's connection stays in the backlog meanwhile.
                if !shared.accept_error_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%error, "egress relay: accept failed; retrying");
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        backoff = ACCEPT_BACKOFF_MIN;
        let slot = match Slot::take(shared, &client) {
            Ok(slot) => slot,
            Err(NoSlot::Stopping) => return,
            Err(NoSlot::Full) => {
                if !shared.cap_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        cap = MAX_CONNECTIONS,
                        "egress relay: the job holds the most connections allowed; refusing more"
                    );
                }
                refuse_at_once(&client, connection::Refusal::TooManyConnections);
                continue;
            }
        };
        let (c, span) = (client.clone(), shared.span.clone());
        let spawned = std::thread::Builder::new()
            .name("egress-conn".into())
            .stack_size(THREAD_STACK)
            .spawn(move || span.in_scope(|| connection::serve(slot, c)));
        if spawned.is_err() {
            // The slot went with the closure; answer on the way out.
            refuse_at_once(&client, connection::Refusal::Busy);
        }
    }
}

/// Answer a connection from the accept thread, which must never block on a
/// job's socket: the answer fits in an empty send buffer, and whatever the
/// job sent already is read first, so that closing does not reset the
/// connection before the job reads the answer.
fn refuse_at_once(client: &TcpStream, refusal: connection::Refusal) {
    if client.set_nonblocking(true).is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let _ = (&*client).read(&mut sink);
    let _ = (&*client).write_all(connection::reply_text(&refusal).as_bytes());
    let _ = client.shutdown(Shutdown::Write);
}

impl Drop for Relay {
    fn drop(&mut self) {
        {
            let mut conns = self.shared.conns();
            conns.stopping = true;
            for socket in conns.open.values().flatten() {
                let _ = socket.shutdown(Shutdown::Both);
            }
        }
        // shutdown() on a listening socket wakes a blocked accept().
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A relay on a local port of the test process.
    fn relay() -> (Relay, u16) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        (Relay::start(listener, Arc::default()), port)
    }

    /// The head timeout is for the whole head: a job that sends a byte now
    /// and then cannot hold a connection (and its thread) for ever.
    #[test]
    fn a_trickled_head_times_out_in_all() {
        let (_relay, port) = relay();
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_nonblocking(true).unwrap();
        let start = Instant::now();
        let mut answer = Vec::new();
        for b in b"GET http://93.184.216.34/ HTTP/1.1\r\nX-Slow: "
            .iter()
            .cycle()
        {
            assert!(start.elapsed() < Duration::from_secs(60), "no answer");
            if s.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
            let mut buf = [0u8; 512];
            match s.read(&mut buf) {
                Ok(n) if n > 0 => answer.extend_from_slice(&buf[..n]),
                _ if !answer.is_empty() => break,
                _ => {}
            }
        }
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{answer}"
        );
        assert!(
            answer.ends_with("sandq egress: no complete request head within 10 s\n"),
            "{answer}"
        );
    }

    #[test]
    fn connections_are_released_when_they_end() {
        let (relay, port) = relay();
        let held: Vec<TcpStream> = (0..MAX_CONNECTIONS)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        let start = Instant::now();
        while relay.open_connections() < MAX_CONNECTIONS {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "not all accepted"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut over = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut answer = String::new();
        over.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 429 Too Many Requests\r\n"),
            "{answer}"
        );
        drop(held);
        while relay.open_connections() > 0 {
            assert!(start.elapsed() < Duration::from_secs(10), "not released");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

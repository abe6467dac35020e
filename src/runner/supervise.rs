//! Watching one running job: the exec handshake, then a single `poll` loop
//! over stdin, stdout, stderr, the seccomp listener, the pidfd and the deadline.
//!
//! Seccomp user notification is how violations get their names: the filter's
//! default action parks the offending thread in the kernel and wakes us; we
//! read the syscall number, SIGKILL the job (its pid namespace goes with it),
//! then answer EPERM, so the call can never succeed. `execve` is parked the
//! same way: the first one (ours, from the child before it became the
//! interpreter) is let through, every later one is a violation.
//!
//! `exit_group` is parked too: that is the moment the job is over. Its output
//! is all in the pipes (the exiting thread wrote it; exit kills the others),
//! so the loop drains them, takes the exit status from the call's argument
//! and the resource use from the still-living process, lets the call through
//! and returns. The kernel's teardown of the process (unmapping a V8 heap
//! takes milliseconds) then overlaps the delivery of the result; the process
//! is reaped afterwards (`runner::Teardown`).

use super::RunError;
use crate::job::Violation;
use crate::sandbox::cgroup::{CgroupReport, JobCgroup};
use crate::sandbox::seccomp::{describe_call, foreign_syscall_name, syscall_name};
use crate::sandbox::spawn::{decode_error, Spawned};
use libseccomp::{ScmpArch, ScmpNotifReq, ScmpNotifResp, ScmpNotifRespFlags};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

/// How long the interpreter may take to reach exec before we call it broken.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After the job's pid 1 exits, how long we wait for its pipes to drain.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);
const CHUNK: usize = 64 * 1024;

/// Resource use of the finished job.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub cpu_ms: u64,
    pub max_rss_kb: u64,
}

/// What the loop saw.
pub struct Captured {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub output_limited: bool,
    pub output_limit: usize,
    pub timed_out: bool,
    pub cancelled: bool,
    pub violation: Option<Violation>,
    pub unlisted: Vec<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub usage: Usage,
    /// The job ended with `exit_group`: the process is still going away and
    /// must be reaped; `cgroup` was read at that moment.
    pub exiting: bool,
    pub cgroup: Option<CgroupReport>,
}

/// `poll` on a single fd; true when it is ready before `timeout`.
fn wait_readable(fd: RawFd, timeout: Duration) -> bool {
    wait_any(&[fd], timeout)
}

/// `poll` on two fds; true when either is ready before `timeout`.
fn wait_either(a: RawFd, b: RawFd, timeout: Duration) -> bool {
    wait_any(&[a, b], timeout)
}

fn wait_any<const N: usize>(fds: &[RawFd; N], timeout: Duration) -> bool {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // SAFETY: N valid pollfds on the stack, their count passed.
        let n = unsafe {
            libc::poll(
                pfds.as_mut_ptr(),
                N as libc::nfds_t,
                left.as_millis() as i32,
            )
        };
        if n >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return n > 0;
        }
    }
}

/// The fds the child hands over: the seccomp listener, and for jobs with
/// network the egress relay's listening socket.
pub struct Handover {
    pub listener: OwnedFd,
    pub relay: Option<OwnedFd>,
}

/// Receive the listener and let the first exec through. The child may still
/// be cloning when this starts (a shared-memory clone returns only at exec,
/// on another thread: see `sandbox::slots`), so a child that fails before
/// handing the listener over is noticed on the error pipe, not by EOF. On an
/// error, the listener (if received) is closed here, which fails the child's
/// parked exec: the child ends either way. `confirm_exec` then checks that
/// the exec landed.
pub fn approve_exec(control: &OwnedFd, err: &OwnedFd) -> Result<Handover, RunError> {
    let broken = |what: &str| -> RunError {
        // If the child reported a failed step, that is the better message.
        if wait_readable(err.as_raw_fd(), Duration::from_millis(200)) {
            let mut buf = [0u8; 8];
            if let Ok(8) = nix::unistd::read(err, &mut buf) {
                if let Some(e) = decode_error(&buf) {
                    return RunError::Spawn(e);
                }
            }
        }
        RunError::Handshake(what.to_owned())
    };
    if !wait_either(control.as_raw_fd(), err.as_raw_fd(), HANDSHAKE_TIMEOUT)
        || !wait_readable(control.as_raw_fd(), Duration::ZERO)
    {
        return Err(broken("no seccomp listener from the child"));
    }
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 2]);
    let msg = recvmsg::<()>(
        control.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| RunError::Handshake(format!("receiving the listener: {e}")))?;
    let mut received = Vec::new();
    if let Ok(cmsgs) = msg.cmsgs() {
        for cmsg in cmsgs {
            if let ControlMessageOwned::ScmRights(fds) = cmsg {
                for fd in fds {
                    // SAFETY: SCM_RIGHTS just installed this fd in our table; we own it.
                    received.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
    }
    let mut received = received.into_iter();
    let (Some(listener), relay) = (received.next(), received.next()) else {
        return Err(broken("the child closed the control socket"));
    };

    // The first notification must be our execve: nothing else between the
    // filter load and exec is outside the allowlist.
    if !wait_readable(listener.as_raw_fd(), HANDSHAKE_TIMEOUT) {
        return Err(broken("the child never reached exec"));
    }
    let req = ScmpNotifReq::receive(listener.as_raw_fd())
        .map_err(|e| RunError::Handshake(format!("reading the exec notification: {e}")))?;
    let nr = i32::from(req.data.syscall);
    if nr != libc::SYS_execve as i32 {
        return Err(RunError::Handshake(format!(
            "expected execve before exec, got {}",
            syscall_name(nr)
        )));
    }
    ScmpNotifResp::new_continue(req.id, ScmpNotifRespFlags::empty())
        .respond(listener.as_raw_fd())
        .map_err(|e| RunError::Handshake(format!("allowing exec: {e}")))?;
    Ok(Handover { listener, relay })
}

/// After `approve_exec` and once the parent has dropped its copy of the
/// error pipe's write end: the pipe closes on a successful exec; a failed one
/// writes first.
pub fn confirm_exec(err: &OwnedFd) -> Result<(), RunError> {
    if !wait_readable(err.as_raw_fd(), HANDSHAKE_TIMEOUT) {
        return Err(RunError::Handshake("exec did not complete".into()));
    }
    let mut buf = [0u8; 8];
    match nix::unistd::read(err, &mut buf) {
        Ok(0) => Ok(()),
        Ok(_) => Err(decode_error(&buf)
            .map(RunError::Spawn)
            .unwrap_or_else(|| RunError::Handshake("short error report".into()))),
        Err(e) => Err(RunError::Handshake(format!("reading the error pipe: {e}"))),
    }
}

/// SIGKILL the job: pid 1 of its namespace (which takes every other process in
/// it along) through the pidfd, so a recycled pid can never be hit, and its
/// process group for hosts without a pid namespace.
pub fn kill(child: &Spawned) {
    kill_raw(child.pidfd.as_raw_fd());
    // SAFETY: kill(2) of the job's process group; no memory involved.
    unsafe { libc::kill(-child.pid, libc::SIGKILL) };
}

/// CPU time and peak resident memory of the job's process while it is
/// still alive (parked in `exit_group`): its process CPU clock, which counts
/// every thread, and the kernel's high-water mark of its RSS.
fn usage_of_live(pid: libc::pid_t) -> Usage {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: plain out-parameters on the stack.
    let cpu_ms = unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        if libc::clock_getcpuclockid(pid, &mut clock) == 0
            && libc::clock_gettime(clock, &mut ts) == 0
        {
            ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
        } else {
            0
        }
    };
    let max_rss_kb = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0);
    Usage { cpu_ms, max_rss_kb }
}

/// SIGKILL through a raw pidfd (ignored when it is -1: no child yet).
pub fn kill_raw(pidfd: RawFd) {
    if pidfd >= 0 {
        // SAFETY: signals a process through a pidfd we hold; no memory involved.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd,
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }
}

/// Wait for the child and collect its status and resource use.
fn reap(child: &Spawned) -> (Option<i32>, Option<i32>, Usage) {
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waiting for our own child; pointers are to locals.
        let r = unsafe { libc::wait4(child.pid, &mut status, 0, &mut ru) };
        if r == child.pid {
            break;
        }
        if r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return (None, None, Usage::default());
    }
    let cpu_ms = (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) as u64 * 1000
        + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) as u64 / 1000;
    let usage = Usage {
        cpu_ms,
        max_rss_kb: ru.ru_maxrss as u64,
    };
    if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None, usage)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)), usage)
    } else {
        (None, None, usage)
    }
}

pub fn kill_and_reap(child: &Spawned) {
    kill(child);
    let _ = reap(child);
}

fn set_nonblocking(fd: &OwnedFd) {
    let _ = nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
}

/// The poll loop for one job.
pub struct Supervisor<'a> {
    pub child: &'a Spawned,
    pub listener: OwnedFd,
    /// Pipes to feed, each closed once its bytes are written (fd 3's
    /// payload, stdin).
    pub inputs: Vec<(OwnedFd, Vec<u8>)>,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub output_limit: usize,
    pub deadline: Instant,
    pub learn: bool,
    pub cancel: Option<RawFd>,
    /// Read at the job's `exit_group`, while its memory is still charged.
    pub cgroup: Option<&'a JobCgroup>,
}

/// Longest single `poll` while a job runs: how finely a stall of the
/// supervisor itself is measured.
const STALL_CHECK: Duration = Duration::from_millis(200);
/// A turn of the loop that ends this much later than its `poll` was asked
/// to wait means this thread was not running (the worker was stopped or
/// starved); the job gets that time back on its deadline.
const STALL_SLACK: Duration = Duration::from_millis(50);

/// Most pipes a job is fed through (fd 3 and stdin).
const MAX_INPUTS: usize = 2;

/// A pipe we feed, closed once everything is written (EOF for the job).
struct Input {
    fd: Option<OwnedFd>,
    data: Vec<u8>,
    written: usize,
}

impl Input {
    fn write(&mut self) {
        let Some(fd) = &self.fd else { return };
        match nix::unistd::write(fd, &self.data[self.written..]) {
            Ok(n) => self.written += n,
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => {}
            // EPIPE: the job closed the pipe without reading it all.
            Err(_) => self.written = self.data.len(),
        }
        if self.written >= self.data.len() {
            self.fd = None;
        }
    }
}

struct Stream {
    fd: Option<OwnedFd>,
    buf: Vec<u8>,
    truncated: bool,
}

impl Stream {
    /// Read what is there; true when the cap was passed.
    fn read(&mut self, limit: usize) -> bool {
        let Some(fd) = &self.fd else { return false };
        let mut chunk = [0u8; CHUNK];
        loop {
            match nix::unistd::read(fd, &mut chunk) {
                Ok(0) => {
                    self.fd = None;
                    return false;
                }
                Ok(n) => {
                    let room = limit - self.buf.len();
                    if n > room {
                        self.buf.extend_from_slice(&chunk[..room]);
                        self.truncated = true;
                        self.fd = None;
                        return true;
                    }
                    self.buf.extend_from_slice(&chunk[..n]);
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => return false,
                Err(_) => {
                    self.fd = None;
                    return false;
                }
            }
        }
    }
}

impl Supervisor<'_> {
    pub fn run(self) -> Captured {
        for fd in [&self.stdout, &self.stderr] {
            set_nonblocking(fd);
        }
        // Inputs with nothing to write are closed at once (EOF for the job).
        let mut inputs: Vec<Input> = self
            .inputs
            .into_iter()
            .filter(|(_, data)| !data.is_empty())
            .map(|(fd, data)| {
                set_nonblocking(&fd);
                Input {
                    fd: Some(fd),
                    data,
                    written: 0,
                }
            })
            .collect();
        inputs.truncate(MAX_INPUTS);
        let mut out = Stream {
            fd: Some(self.stdout),
            buf: Vec::new(),
            truncated: false,
        };
        let mut err = Stream {
            fd: Some(self.stderr),
            buf: Vec::new(),
            truncated: false,
        };
        let mut listener = Some(self.listener);
        let mut exited_at: Option<Instant> = None;
        let mut killed = false;
        let mut timed_out = false;
        let mut output_limited = false;
        let mut cancelled = false;
        let mut violation = None;
        let mut unlisted: Vec<String> = Vec::new();
        // Set when the job called exit_group: (status, usage, cgroup report).
        let mut exit: Option<(i32, Usage, Option<CgroupReport>)> = None;
        // The deadline moves later by the time this thread was not running
        // (the worker stopped, or starved of CPU): a job blocked on a full
        // pipe that nobody read meanwhile is not charged for it. Measured
        // from one turn of the loop to the next, and at most by the job's
        // whole timeout again: a job never runs past twice its timeout.
        let mut deadline = self.deadline;
        let latest = self.deadline + self.deadline.saturating_duration_since(Instant::now());
        // When the last `poll` began, and how long it was asked to wait.
        let mut last_turn: Option<(Instant, Duration)> = None;

        loop {
            let streams_open = out.fd.is_some() || err.fd.is_some();
            if let Some(at) = exited_at {
                if !streams_open || at.elapsed() >= DRAIN_AFTER_EXIT {
                    break;
                }
            }
            let now = Instant::now();
            if let Some((began, asked)) = last_turn {
                let overslept = now.saturating_duration_since(began).saturating_sub(asked);
                if overslept > STALL_SLACK {
                    deadline = (deadline + overslept).min(latest);
                }
            }
            if !killed && now >= deadline {
                timed_out = true;
                killed = true;
                kill(self.child);
            }
            let wait = if killed || exited_at.is_some() {
                DRAIN_AFTER_EXIT
            } else {
                (deadline - now).min(STALL_CHECK)
            };

            let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(6 + MAX_INPUTS);
            let mut slots = [usize::MAX; 6 + MAX_INPUTS];
            let mut add = |slot: usize, fd: RawFd, events: i16, pfds: &mut Vec<libc::pollfd>| {
                slots[slot] = pfds.len();
                pfds.push(libc::pollfd {
                    fd,
                    events,
                    revents: 0,
                });
            };
            if let Some(fd) = &out.fd {
                add(0, fd.as_raw_fd(), libc::POLLIN, &mut pfds);
            }
            if let Some(fd) = &err.fd {
                add(1, fd.as_raw_fd(), libc::POLLIN, &mut pfds);
            }
            for (i, input) in inputs.iter().enumerate() {
                if let Some(fd) = &input.fd {
                    add(6 + i, fd.as_raw_fd(), libc::POLLOUT, &mut pfds);
                }
            }
            if let Some(fd) = &listener {
                add(3, fd.as_raw_fd(), libc::POLLIN, &mut pfds);
            }
            if exited_at.is_none() {
                add(4, self.child.pidfd.as_raw_fd(), libc::POLLIN, &mut pfds);
            }
            if let (Some(fd), false) = (self.cancel, killed) {
                add(5, fd, libc::POLLIN, &mut pfds);
            }
            let ms = wait.as_millis().min(i32::MAX as u128) as i32;
            last_turn = Some((Instant::now(), wait));
            // SAFETY: pfds is a live Vec of pollfd; its length is passed.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms.max(1)) };
            if n < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                break;
            }
            let ready = |slot: usize| -> i16 {
                if slots[slot] == usize::MAX {
                    0
                } else {
                    pfds[slots[slot]].revents
                }
            };

            // Seccomp first: a parked thread is waiting on us.
            let l = ready(3);
            if l & libc::POLLIN != 0 {
                if let Some(fd) = &listener {
                    if let Ok(req) = ScmpNotifReq::receive(fd.as_raw_fd()) {
                        let nr = i32::from(req.data.syscall);
                        let native = req.data.arch == ScmpArch::native();
                        let name = if native {
                            syscall_name(nr)
                        } else {
                            foreign_syscall_name(nr, req.data.arch)
                        };
                        if native && nr == libc::SYS_exit_group as i32 {
                            // The end of the job (see the module doc). Unless it
                            // is already being stopped, everything the result
                            // needs is read now, while the process is parked.
                            if !killed {
                                if out.read(self.output_limit) || err.read(self.output_limit) {
                                    output_limited = true;
                                    killed = true;
                                    kill(self.child);
                                } else {
                                    exit = Some((
                                        (req.data.args[0] & 0xff) as i32,
                                        usage_of_live(self.child.pid),
                                        self.cgroup.map(JobCgroup::report),
                                    ));
                                }
                            }
                            let _ =
                                ScmpNotifResp::new_continue(req.id, ScmpNotifRespFlags::empty())
                                    .respond(fd.as_raw_fd());
                        } else if self.learn {
                            if !unlisted.contains(&name) {
                                unlisted.push(name);
                            }
                            let _ =
                                ScmpNotifResp::new_continue(req.id, ScmpNotifRespFlags::empty())
                                    .respond(fd.as_raw_fd());
                        } else {
                            // Kill before answering, so the call never returns
                            // into user code; the answer is only for tidiness.
                            if !killed {
                                kill(self.child);
                                killed = true;
                            }
                            // For socket calls the family decided: name it
                            // from the kernel's copy of the arguments.
                            let call = if native {
                                describe_call(nr, &req.data.args)
                            } else {
                                None
                            };
                            violation.get_or_insert(Violation {
                                syscall: name,
                                number: nr as i64,
                                call,
                            });
                            let _ = ScmpNotifResp::new_error(
                                req.id,
                                -libc::EPERM,
                                ScmpNotifRespFlags::empty(),
                            )
                            .respond(fd.as_raw_fd());
                        }
                    }
                }
            } else if l & (libc::POLLHUP | libc::POLLERR) != 0 {
                // Every process under the filter is gone.
                listener = None;
            }

            if ready(0) != 0 && out.read(self.output_limit) && !killed {
                output_limited = true;
                killed = true;
                kill(self.child);
            }
            if ready(1) != 0 && err.read(self.output_limit) && !killed {
                output_limited = true;
                killed = true;
                kill(self.child);
            }
            for (i, input) in inputs.iter_mut().enumerate() {
                if ready(6 + i) != 0 {
                    input.write();
                }
            }
            if ready(5) != 0 && !killed {
                cancelled = true;
                killed = true;
                kill(self.child);
            }
            if ready(4) != 0 {
                exited_at = Some(Instant::now());
                // The job may have left grandchildren holding the pipes (only
                // without a pid namespace): make sure they go too.
                kill(self.child);
            }
            if exit.is_some() {
                // Best effort for a write another thread raced with the exit.
                out.read(self.output_limit);
                err.read(self.output_limit);
                break;
            }
        }
        drop(inputs);
        drop(listener);
        let exiting = exit.is_some();
        let (exit_code, signal, usage, cgroup) = match exit {
            Some((status, usage, cgroup)) => (Some(status), None, usage, cgroup),
            None => {
                if exited_at.is_none() {
                    kill(self.child);
                }
                let (exit_code, signal, usage) = reap(self.child);
                (exit_code, signal, usage, None)
            }
        };
        Captured {
            stdout: out.buf,
            stderr: err.buf,
            stdout_truncated: out.truncated,
            stderr_truncated: err.truncated,
            output_limited,
            output_limit: self.output_limit,
            timed_out,
            cancelled,
            violation,
            unlisted,
            exit_code,
            signal,
            usage,
            exiting,
            cgroup,
        }
    }
}

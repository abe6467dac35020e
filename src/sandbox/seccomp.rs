//! Compiling the seccomp policy into BPF, once, in the parent.
//!
//! The policy (which calls, and why) is data in [`super::allowlist`]; this module
//! turns it into one BPF program per (language, network) profile at start-up.
//! libseccomp allocates, so it must never run after `clone` in the child: the
//! child only receives the finished program and installs it with one raw
//! `seccomp(2)` call (see [`super::spawn`]).
//!
//! Actions, in one place:
//! - listed calls: allow;
//! - `clone`: allowed only with `CLONE_THREAD` set (threads yes, fork no);
//! - `clone3`, `io_uring_*` and the other quiet denials: an errno, because the
//!   runtimes probe them and fall back;
//! - everything else, `execve`/`execveat` included: a user notification to the
//!   worker's supervisor, which names the call and kills the job (a violation),
//!   except the single `execve` that starts the interpreter, and
//!   `exit_group`, whose status the supervisor reads before letting it
//!   through. In learning mode the supervisor lets them through and records
//!   them instead.

use super::allowlist::{self, Entry};
use crate::job::Language;
use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};
use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("system call {name:?} is not known on this architecture")]
    UnknownSyscall { name: String },
    #[error("building the seccomp filter failed at {step}: {source}")]
    Build {
        step: &'static str,
        #[source]
        source: libseccomp::error::SeccompError,
    },
    #[error("exporting the seccomp filter failed: {0}")]
    Export(#[source] std::io::Error),
}

/// A compiled filter: the BPF instructions, ready for `seccomp(2)`.
pub struct Filter {
    prog: Vec<libc::sock_filter>,
}

impl Filter {
    /// The `sock_fprog` header pointing into this filter; valid while `self` lives.
    pub fn fprog(&self) -> libc::sock_fprog {
        libc::sock_fprog {
            len: self.prog.len() as u16,
            filter: self.prog.as_ptr() as *mut libc::sock_filter,
        }
    }

    pub fn instructions(&self) -> usize {
        self.prog.len()
    }
}

/// Every filter the worker needs, compiled once at start-up.
pub struct Filters {
    by_profile: HashMap<(Language, bool), Filter>,
}

impl Filters {
    /// Compile the four profiles (each language, network off and on), adding
    /// the operator's `extra` syscalls to the defaults.
    pub fn compile(extra: &[String]) -> Result<Filters, SeccompError> {
        let mut by_profile = HashMap::new();
        for language in Language::ALL {
            for network in [false, true] {
                by_profile.insert((language, network), compile(language, network, extra)?);
            }
        }
        Ok(Filters { by_profile })
    }

    pub fn get(&self, language: Language, network: bool) -> &Filter {
        &self.by_profile[&(language, network)]
    }
}

/// The allowlist for a profile, as names (for `profile` output and tests).
pub fn allowed_names(language: Language, network: bool) -> impl Iterator<Item = &'static str> {
    let lang: &[Entry] = match language {
        Language::Python3 => allowlist::PYTHON,
        Language::Nodejs => allowlist::NODEJS,
    };
    let net: &[Entry] = if network { allowlist::NETWORK } else { &[] };
    allowlist::COMMON
        .iter()
        .chain(lang)
        .chain(net)
        .map(|e| e.name)
        // `clone` is allowed too, with its argument checked.
        .chain(std::iter::once("clone"))
}

fn resolve(name: &str) -> Result<ScmpSyscall, SeccompError> {
    ScmpSyscall::from_name(name).map_err(|_| SeccompError::UnknownSyscall {
        name: name.to_owned(),
    })
}

fn build(step: &'static str) -> impl FnOnce(libseccomp::error::SeccompError) -> SeccompError {
    move |source| SeccompError::Build { step, source }
}

fn compile(language: Language, network: bool, extra: &[String]) -> Result<Filter, SeccompError> {
    let mut ctx = ScmpFilterContext::new(ScmpAction::Notify).map_err(build("init"))?;
    ctx.add_arch(ScmpArch::Native).map_err(build("arch"))?;
    // A call made through another ABI (int 0x80, x32) would bypass the
    // native-number rules: never allowed, reported to the supervisor like any
    // other violation.
    ctx.set_act_badarch(ScmpAction::Notify)
        .map_err(build("badarch"))?;
    // The child sets no_new_privs itself before loading; libseccomp must not.
    ctx.set_ctl_nnp(false).map_err(build("nnp"))?;

    // `exit_group` is left to the default action: the supervisor gets it as
    // a notification, takes the exit status and resource use there, lets it
    // through and hands the result on without waiting for the kernel to tear
    // the process down (milliseconds for a V8 heap).
    for name in allowed_names(language, network).filter(|n| !matches!(*n, "clone" | "exit_group")) {
        ctx.add_rule(ScmpAction::Allow, resolve(name)?)
            .map_err(build("allow"))?;
    }
    for name in extra.iter().filter(|n| *n != "exit_group") {
        ctx.add_rule(ScmpAction::Allow, resolve(name)?)
            .map_err(build("extra allow"))?;
    }
    for (name, errno, _why) in allowlist::QUIET_DENY {
        if extra.iter().any(|e| e == name) {
            continue;
        }
        ctx.add_rule(ScmpAction::Errno(*errno), resolve(name)?)
            .map_err(build("quiet deny"))?;
    }
    // Without network, a unix-domain socket gets a quiet EACCES instead of a
    // violation: glibc probes nscd with one on every passwd lookup (getpwuid,
    // os.userInfo) and falls back to /etc/passwd, and in the sandbox's root
    // there is no socket to reach anyway. Any other family is a violation.
    if !network && !extra.iter().any(|e| e == "socket") {
        ctx.add_rule_conditional(
            ScmpAction::Errno(libc::EACCES),
            resolve("socket")?,
            &[ScmpArgCompare::new(
                0,
                ScmpCompareOp::Equal,
                libc::AF_UNIX as u64,
            )],
        )
        .map_err(build("socket"))?;
    }
    // Threads, not processes: clone is allowed only with CLONE_THREAD set and
    // no namespace flag (the kernel would refuse those, but say so here).
    let thread = libc::CLONE_THREAD as u64;
    let namespaces = (libc::CLONE_NEWNS
        | libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWCGROUP) as u64;
    ctx.add_rule_conditional(
        ScmpAction::Allow,
        resolve("clone")?,
        &[ScmpArgCompare::new(
            0,
            ScmpCompareOp::MaskedEqual(thread | namespaces),
            thread,
        )],
    )
    .map_err(build("clone"))?;

    let memfd = nix::sys::memfd::memfd_create(c"sandq-bpf", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .map_err(|e| SeccompError::Export(e.into()))?;
    ctx.export_bpf(&memfd).map_err(build("export"))?;
    let mut file = std::fs::File::from(memfd);
    file.seek(SeekFrom::Start(0))
        .map_err(SeccompError::Export)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(SeccompError::Export)?;
    let prog = bytes
        .chunks_exact(std::mem::size_of::<libc::sock_filter>())
        .map(|c| libc::sock_filter {
            code: u16::from_ne_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect();
    Ok(Filter { prog })
}

/// The name of a syscall number on this architecture, for violation reports.
/// x32 calls arrive under the native audit arch with bit 30 set: `x32:name`.
pub fn syscall_name(nr: i32) -> String {
    const X32_BIT: i32 = 0x4000_0000;
    if cfg!(target_arch = "x86_64") && nr & X32_BIT != 0 {
        return foreign_syscall_name(nr, ScmpArch::X32);
    }
    ScmpSyscall::from(nr)
        .get_name()
        .unwrap_or_else(|_| format!("syscall_{nr}"))
}

/// The name of a call made through a foreign ABI (e.g. `int 0x80` on x86_64):
/// `x86:write`, so a report never passes it off as the native call.
pub fn foreign_syscall_name(nr: i32, arch: ScmpArch) -> String {
    let name = ScmpSyscall::from(nr)
        .get_name_by_arch(arch)
        .unwrap_or_else(|_| format!("syscall_{nr}"));
    format!("{}:{name}", format!("{arch:?}").to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_allowlist_name_resolves() {
        for e in allowlist::COMMON
            .iter()
            .chain(allowlist::PYTHON)
            .chain(allowlist::NODEJS)
            .chain(allowlist::NETWORK)
        {
            assert!(resolve(e.name).is_ok(), "{} does not resolve", e.name);
            assert!(!e.why.trim().is_empty(), "{} has no reason", e.name);
        }
        for (name, _, why) in allowlist::QUIET_DENY {
            assert!(resolve(name).is_ok(), "{name} does not resolve");
            assert!(!why.is_empty());
        }
    }

    #[test]
    fn dangerous_calls_are_never_allowed() {
        for language in Language::ALL {
            for network in [false, true] {
                let names: Vec<_> = allowed_names(language, network).collect();
                for bad in [
                    "execve",
                    "execveat",
                    "fork",
                    "vfork",
                    "ptrace",
                    "mount",
                    "umount2",
                    "unshare",
                    "setns",
                    "bpf",
                    "keyctl",
                    "perf_event_open",
                    "userfaultfd",
                    "chroot",
                    "pivot_root",
                    "setuid",
                    "setgid",
                    "init_module",
                    "kexec_load",
                    "process_vm_writev",
                ] {
                    assert!(!names.contains(&bad), "{bad} allowed for {language}");
                }
                assert_eq!(names.contains(&"socket"), network);
            }
        }
    }

    #[test]
    fn filters_compile() {
        let filters = Filters::compile(&["uname".to_owned()]).unwrap();
        assert!(filters.get(Language::Python3, false).instructions() > 10);
        assert!(Filters::compile(&["no_such_call".to_owned()]).is_err());
    }

    #[test]
    fn names_numbers() {
        assert_eq!(syscall_name(libc::SYS_socket as i32), "socket");
    }
}

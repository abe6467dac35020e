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
//! - `socket`/`socketpair`: answered by family, type and protocol as their
//!   [`allowlist::SocketRule`]s say; a call no rule matches is a violation,
//!   reported with its arguments ([`describe_call`]);
//! - `clone3`, `io_uring_*` and the other quiet denials: an errno, because the
//!   runtimes probe them and fall back;
//! - everything else, `execve`/`execveat` included: a user notification to the
//!   worker's supervisor, which names the call and kills the job (a violation),
//!   except the single `execve` that starts the interpreter, and
//!   `exit_group`, whose status the supervisor reads before letting it
//!   through. In learning mode the supervisor lets them through and records
//!   them instead.

use super::allowlist::{self, Entry, SocketRule};
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

/// The allowlist entries of a profile.
fn entries(language: Language, network: bool) -> impl Iterator<Item = &'static Entry> {
    let lang: &[Entry] = match language {
        Language::Python3 => allowlist::PYTHON,
        Language::Nodejs => allowlist::NODEJS,
    };
    let net: &[Entry] = if network { allowlist::NETWORK } else { &[] };
    allowlist::COMMON.iter().chain(lang).chain(net)
}

/// The allowlist for a profile, as names (for `profile` output and tests).
/// `socket` and `socketpair`, when listed, are allowed only with the
/// arguments their entry names.
pub fn allowed_names(language: Language, network: bool) -> impl Iterator<Item = &'static str> {
    entries(language, network)
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

    // An operator's extra call is allowed outright, arguments and all: an
    // explicit `socket` lifts the family rules below.
    let operator_allows = |name: &str| extra.iter().any(|e| e == name);
    // `exit_group` is left to the default action: the supervisor gets it as
    // a notification, takes the exit status and resource use there, lets it
    // through and hands the result on without waiting for the kernel to tear
    // the process down (milliseconds for a V8 heap).
    for entry in entries(language, network).filter(|e| e.name != "exit_group") {
        if entry.only.is_empty() {
            ctx.add_rule(ScmpAction::Allow, resolve(entry.name)?)
                .map_err(build("allow"))?;
        } else if !operator_allows(entry.name) {
            add_socket_rules(&mut ctx, entry.name, entry.only)?;
        }
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
    // Without network `socket` is not listed, but the probes glibc makes
    // (nscd, interfaces) get a quiet errno instead of ending the job.
    if !network && !operator_allows("socket") {
        add_socket_rules(&mut ctx, "socket", allowlist::SOCKET_OFFLINE)?;
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

/// One conditional rule per (family, protocol) of each socket rule; a call
/// that matches none goes to the supervisor as a violation.
fn add_socket_rules(
    ctx: &mut ScmpFilterContext,
    name: &str,
    rules: &[SocketRule],
) -> Result<(), SeccompError> {
    let call = resolve(name)?;
    for rule in rules {
        let action = match rule.errno {
            None => ScmpAction::Allow,
            Some(errno) => ScmpAction::Errno(errno),
        };
        // Empty means any protocol: one rule without that comparison.
        let protocols: Vec<Option<i32>> = if rule.protocols.is_empty() {
            vec![None]
        } else {
            rule.protocols.iter().copied().map(Some).collect()
        };
        for &family in rule.families {
            for &protocol in &protocols {
                let mut args = vec![ScmpArgCompare::new(0, ScmpCompareOp::Equal, family as u64)];
                if let Some(kind) = rule.kind {
                    args.push(ScmpArgCompare::new(
                        1,
                        ScmpCompareOp::MaskedEqual(allowlist::SOCK_TYPE_MASK),
                        kind as u64,
                    ));
                }
                if let Some(protocol) = protocol {
                    args.push(ScmpArgCompare::new(
                        2,
                        ScmpCompareOp::Equal,
                        protocol as u64,
                    ));
                }
                ctx.add_rule_conditional(action, call, &args)
                    .map_err(build("socket arguments"))?;
            }
        }
    }
    Ok(())
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

/// Address family names by number (`<linux/socket.h>`), for violation reports.
const FAMILIES: [&str; 46] = [
    "AF_UNSPEC",
    "AF_UNIX",
    "AF_INET",
    "AF_AX25",
    "AF_IPX",
    "AF_APPLETALK",
    "AF_NETROM",
    "AF_BRIDGE",
    "AF_ATMPVC",
    "AF_X25",
    "AF_INET6",
    "AF_ROSE",
    "AF_DECnet",
    "AF_NETBEUI",
    "AF_SECURITY",
    "AF_KEY",
    "AF_NETLINK",
    "AF_PACKET",
    "AF_ASH",
    "AF_ECONET",
    "AF_ATMSVC",
    "AF_RDS",
    "AF_SNA",
    "AF_IRDA",
    "AF_PPPOX",
    "AF_WANPIPE",
    "AF_LLC",
    "AF_IB",
    "AF_MPLS",
    "AF_CAN",
    "AF_TIPC",
    "AF_BLUETOOTH",
    "AF_IUCV",
    "AF_RXRPC",
    "AF_ISDN",
    "AF_PHONET",
    "AF_IEEE802154",
    "AF_CAIF",
    "AF_ALG",
    "AF_NFC",
    "AF_VSOCK",
    "AF_KCM",
    "AF_QIPCRTR",
    "AF_SMC",
    "AF_XDP",
    "AF_MCTP",
];

/// Socket types (`<linux/net.h>`), flags masked off.
const SOCK_TYPES: &[(i32, &str)] = &[
    (1, "SOCK_STREAM"),
    (2, "SOCK_DGRAM"),
    (3, "SOCK_RAW"),
    (4, "SOCK_RDM"),
    (5, "SOCK_SEQPACKET"),
    (6, "SOCK_DCCP"),
    (10, "SOCK_PACKET"),
];

/// The IP protocols worth a name in a report (`<netinet/in.h>`).
const INET_PROTOCOLS: &[(i32, &str)] = &[
    (libc::IPPROTO_ICMP, "IPPROTO_ICMP"),
    (libc::IPPROTO_TCP, "IPPROTO_TCP"),
    (libc::IPPROTO_UDP, "IPPROTO_UDP"),
    (libc::IPPROTO_ICMPV6, "IPPROTO_ICMPV6"),
    (libc::IPPROTO_SCTP, "IPPROTO_SCTP"),
    (libc::IPPROTO_UDPLITE, "IPPROTO_UDPLITE"),
    (libc::IPPROTO_RAW, "IPPROTO_RAW"),
    (libc::IPPROTO_MPTCP, "IPPROTO_MPTCP"),
];

fn named(table: &[(i32, &str)], value: i32) -> Option<String> {
    table
        .iter()
        .find(|(v, _)| *v == value)
        .map(|(_, name)| (*name).to_owned())
}

/// A `socket` or `socketpair` call spelled with its family, type and
/// protocol, for the error of its violation: `socket(AF_VSOCK, SOCK_STREAM, 0)`.
/// `None` for any other call, whose name says it all.
///
/// The arguments are the kernel's copy, taken when the call was made: plain
/// integers, so what is named here is what the kernel would have acted on,
/// however the job's memory changes while it is parked.
pub fn describe_call(nr: i32, args: &[u64; 6]) -> Option<String> {
    let call = match i64::from(nr) {
        libc::SYS_socket => "socket",
        libc::SYS_socketpair => "socketpair",
        _ => return None,
    };
    // The filter compares all 64 bits: a value with high bits set matched
    // no rule, whatever its low half says, so it is shown whole.
    if let Some(wide) = args[..3].iter().find(|a| **a > u64::from(u32::MAX)) {
        return Some(format!("{call}(argument {wide:#x})"));
    }
    let [family, kind, protocol] = [args[0], args[1], args[2]].map(|a| a as u32 as i32);
    let family_name = usize::try_from(family)
        .ok()
        .and_then(|f| FAMILIES.get(f))
        .map_or_else(|| format!("family {family}"), |n| (*n).to_owned());
    let kind_name = named(SOCK_TYPES, kind & allowlist::SOCK_TYPE_MASK as i32)
        .unwrap_or_else(|| format!("type {kind}"));
    let inet = family == libc::AF_INET || family == libc::AF_INET6;
    let protocol_name = named(INET_PROTOCOLS, protocol)
        .filter(|_| inet)
        .unwrap_or_else(|| protocol.to_string());
    Some(format!(
        "{call}({family_name}, {kind_name}, {protocol_name})"
    ))
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
        for rule in socket_rules() {
            assert!(!rule.families.is_empty() && !rule.why.trim().is_empty());
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

    fn socket_rules() -> impl Iterator<Item = &'static SocketRule> {
        allowlist::COMMON
            .iter()
            .chain(allowlist::PYTHON)
            .chain(allowlist::NODEJS)
            .chain(allowlist::NETWORK)
            .flat_map(|e| e.only)
            .chain(allowlist::SOCKET_OFFLINE)
    }

    #[test]
    fn only_inet_and_unix_sockets_are_ever_allowed() {
        let allowed = [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6];
        for rule in socket_rules().filter(|r| r.errno.is_none()) {
            assert!(
                rule.families.iter().all(|f| allowed.contains(f)),
                "{}",
                rule.why
            );
            // IPv4 and IPv6 only as TCP or UDP, never raw or another protocol.
            if rule.families.iter().any(|f| *f != libc::AF_UNIX) {
                let kind = rule.kind.expect("an IP rule names its socket type");
                assert!([libc::SOCK_STREAM, libc::SOCK_DGRAM].contains(&kind));
                assert!(!rule.protocols.is_empty(), "{}", rule.why);
                for p in rule.protocols {
                    assert!([0, libc::IPPROTO_TCP, libc::IPPROTO_UDP].contains(p));
                }
            }
        }
        // Without network nothing is allowed, only refused quietly.
        assert!(allowlist::SOCKET_OFFLINE.iter().all(|r| r.errno.is_some()));
        // Every `socket`/`socketpair` entry checks its arguments.
        for e in allowlist::COMMON
            .iter()
            .chain(allowlist::PYTHON)
            .chain(allowlist::NODEJS)
            .chain(allowlist::NETWORK)
            .filter(|e| e.name.starts_with("socket"))
        {
            assert!(!e.only.is_empty(), "{} allowed with any family", e.name);
        }
    }

    #[test]
    fn filters_compile() {
        let filters = Filters::compile(&["uname".to_owned()]).unwrap();
        assert!(filters.get(Language::Python3, false).instructions() > 10);
        assert!(Filters::compile(&["no_such_call".to_owned()]).is_err());
        // The operator's `socket` replaces the family rules instead of clashing.
        let open = Filters::compile(&["socket".to_owned(), "socketpair".to_owned()]).unwrap();
        assert!(
            open.get(Language::Python3, true).instructions()
                < filters.get(Language::Python3, true).instructions()
        );
    }

    #[test]
    fn socket_calls_are_spelled_with_their_arguments() {
        let call = |nr: i64, a: [u64; 3]| describe_call(nr as i32, &[a[0], a[1], a[2], 0, 0, 0]);
        let nonblock_cloexec = (libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u64;
        assert_eq!(
            call(libc::SYS_socket, [40, 1 | nonblock_cloexec, 0]).unwrap(),
            "socket(AF_VSOCK, SOCK_STREAM, 0)"
        );
        assert_eq!(
            call(libc::SYS_socket, [2, 1, 262]).unwrap(),
            "socket(AF_INET, SOCK_STREAM, IPPROTO_MPTCP)"
        );
        assert_eq!(
            call(libc::SYS_socket, [10, 3, 58]).unwrap(),
            "socket(AF_INET6, SOCK_RAW, IPPROTO_ICMPV6)"
        );
        // Protocol numbers are named for IP families only.
        assert_eq!(
            call(libc::SYS_socket, [16, 3, 6]).unwrap(),
            "socket(AF_NETLINK, SOCK_RAW, 6)"
        );
        assert_eq!(
            call(libc::SYS_socketpair, [30, 2, 0]).unwrap(),
            "socketpair(AF_TIPC, SOCK_DGRAM, 0)"
        );
        assert_eq!(
            call(libc::SYS_socket, [99, 9, 0]).unwrap(),
            "socket(family 99, type 9, 0)"
        );
        assert_eq!(
            call(libc::SYS_socket, [u64::MAX, 1, 0]).unwrap(),
            "socket(argument 0xffffffffffffffff)"
        );
        assert_eq!(call(libc::SYS_getpid, [40, 1, 0]), None);
    }

    #[test]
    fn names_numbers() {
        assert_eq!(syscall_name(libc::SYS_socket as i32), "socket");
    }
}

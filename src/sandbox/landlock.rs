//! Landlock: a filesystem policy the job cannot lift, on top of the read-only
//! root. Installed by the child with raw syscalls (the `landlock` crate
//! allocates, which the child must not), just before seccomp.
//!
//! Policy, in paths inside the job's root:
//! - `/`: read files and list directories (the root is read-only anyway);
//! - `/tmp` (the job's scratch dir; its host path where the host gave no
//!   private root): read, write, create, remove;
//! - `/dev/null`: read and write;
//! - the interpreter and its ELF loader: execute. Nothing else may be
//!   executed, even if seccomp let a second `execve` through.

use std::ffi::{CStr, CString};
use std::path::Path;

const CREATE_RULESET_VERSION: u32 = 1 << 0;
const RULE_PATH_BENEATH: libc::c_int = 1;

const EXECUTE: u64 = 1 << 0;
const WRITE_FILE: u64 = 1 << 1;
const READ_FILE: u64 = 1 << 2;
const READ_DIR: u64 = 1 << 3;
const REMOVE_DIR: u64 = 1 << 4;
const REMOVE_FILE: u64 = 1 << 5;
const MAKE_DIR: u64 = 1 << 7;
const MAKE_REG: u64 = 1 << 8;
const MAKE_SOCK: u64 = 1 << 9;
const MAKE_FIFO: u64 = 1 << 10;
const MAKE_SYM: u64 = 1 << 12;
const REFER: u64 = 1 << 13;
const TRUNCATE: u64 = 1 << 14;
const IOCTL_DEV: u64 = 1 << 15;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// The rules for one interpreter, prepared by the parent.
pub struct Plan<'a> {
    handled: u64,
    file_rights: u64,
    tmp_rights: u64,
    exec: &'a [CString],
    /// The job's writable dir: `/tmp` in the private root, the scratch dir's
    /// host path where there is none.
    scratch: &'a CStr,
}

/// The kernel's Landlock ABI version, or why it is unavailable.
pub fn abi() -> Result<i32, String> {
    // SAFETY: the version query takes no attribute pointer.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    if v < 1 {
        Err(format!(
            "not enabled in this kernel ({})",
            std::io::Error::last_os_error()
        ))
    } else {
        Ok(v as i32)
    }
}

/// The ELF interpreter (dynamic loader) named in a binary's PT_INTERP.
pub fn elf_loader(binary: &Path) -> Option<String> {
    let data = std::fs::read(binary).ok()?;
    if data.get(..4)? != b"\x7fELF" || data.get(4)? != &2 {
        return None; // not a 64-bit ELF
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(data.get(o..o + 2)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(data.get(o..o + 8)?.try_into().ok()?));
    let phoff = u64_at(0x20)? as usize;
    let phentsize = u16_at(0x36)? as usize;
    for i in 0..u16_at(0x38)? as usize {
        let ph = phoff + i * phentsize;
        if u32::from_le_bytes(data.get(ph..ph + 4)?.try_into().ok()?) == 3 {
            let off = u64_at(ph + 8)? as usize;
            let len = u64_at(ph + 32)? as usize;
            let raw = data.get(off..off + len)?;
            return Some(String::from_utf8_lossy(raw.split(|b| *b == 0).next()?).into_owned());
        }
    }
    None
}

impl<'a> Plan<'a> {
    /// Rules for ABI `abi`, executing only `exec` (absolute paths as the job
    /// sees them) and writing only under `scratch`.
    pub fn new(abi: i32, exec: &'a [CString], scratch: &'a CStr) -> Plan<'a> {
        let mut handled = (1u64 << 13) - 1;
        let mut file_rights = READ_FILE | WRITE_FILE;
        if abi >= 2 {
            handled |= REFER;
        }
        if abi >= 3 {
            handled |= TRUNCATE;
            file_rights |= TRUNCATE;
        }
        if abi >= 5 {
            handled |= IOCTL_DEV;
            file_rights |= IOCTL_DEV;
        }
        let tmp_rights = READ_FILE
            | READ_DIR
            | WRITE_FILE
            | REMOVE_DIR
            | REMOVE_FILE
            | MAKE_DIR
            | MAKE_REG
            | MAKE_SOCK
            | MAKE_FIFO
            | MAKE_SYM
            | (handled & (REFER | TRUNCATE));
        Plan {
            handled,
            file_rights,
            tmp_rights,
            exec,
            scratch,
        }
    }
}

/// Add one path rule; -1 on error. Async-signal-safe.
unsafe fn add(ruleset: libc::c_int, path: &CStr, rights: u64) -> libc::c_long {
    // SAFETY: open/syscall/close on a NUL-terminated path and a stack struct.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
        if fd == -1 {
            return -1;
        }
        let attr = PathBeneathAttr {
            allowed_access: rights,
            parent_fd: fd,
        };
        let r = libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset,
            RULE_PATH_BENEATH,
            &attr as *const PathBeneathAttr,
            0u32,
        );
        libc::close(fd);
        r
    }
}

/// Build the ruleset and restrict the calling process. Child side: raw
/// syscalls only, no allocation. Returns -1 on error (errno set).
///
/// # Safety
/// Must run after no_new_privs, in the child, on the final root.
pub unsafe fn restrict_self(plan: &Plan<'_>) -> libc::c_long {
    let attr = RulesetAttr {
        handled_access_fs: plan.handled,
    };
    // SAFETY: raw Landlock syscalls on stack data; fds closed before return.
    unsafe {
        let ruleset = libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const RulesetAttr,
            std::mem::size_of::<RulesetAttr>(),
            0u32,
        ) as libc::c_int;
        if ruleset == -1 {
            return -1;
        }
        let ok = add(ruleset, c"/", READ_FILE | READ_DIR) != -1
            && add(ruleset, plan.scratch, plan.tmp_rights) != -1
            && add(ruleset, c"/dev/null", plan.file_rights) != -1
            && plan
                .exec
                .iter()
                .all(|p| add(ruleset, p, EXECUTE | READ_FILE) != -1)
            && libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) != -1;
        libc::close(ruleset);
        if ok {
            0
        } else {
            -1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_loader_of_python() {
        let loader = elf_loader(Path::new("/usr/bin/python3")).expect("PT_INTERP");
        assert!(loader.contains("ld-linux"), "{loader}");
    }
}

//! The runtime root the interpreters run in, and each job's scratch space.
//!
//! Built once at start-up, inside the worker's own private mount namespace
//! (entered by [`enter_private_mount_namespace`] before any thread exists), so
//! none of these mounts is visible on the host and all of them vanish when the
//! worker exits, however it exits:
//!
//! ```text
//! <state>/root            tmpfs, remounted read-only once built
//!   usr/                  bind of the host /usr, read-only, nosuid, nodev
//!   bin lib lib64 sbin    symlinks into usr/ (Debian is usr-merged), or read-only binds
//!   dev/null zero random urandom   binds of the host devices
//!   etc/                  a handful of files written or copied here (no secrets)
//!   tmp/                  empty: each uid's scratch is bound here in that uid's namespace
//! <state>/scratch/<uid>   one size-capped tmpfs per uid, mode 0700, owned by that uid,
//!                         emptied after every job
//! ```
//! Preparing it is a dozen mounts: well under 10 ms. Each uid's jobs run in
//! a mount namespace made once for that uid (`spawn::hold_mount_namespace`),
//! with the uid's scratch as `/tmp`: a job changes nothing in a mount
//! namespace but the files in its `/tmp`, which [`Scratch::clear`] removes
//! before the uid runs anything else.

use super::uids::UidLease;
use nix::mount::{mount, MsFlags};
use std::ffi::CString;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("creating {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mounting {target}: {source}")]
    Mount {
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("entering a private mount namespace: {0}")]
    Unshare(#[source] nix::Error),
}

/// Where jobs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootMode {
    /// A read-only root built from bind mounts, entered with pivot_root.
    Pivot,
    /// The host allows no mounts: jobs run on the host filesystem, in a scratch
    /// directory, protected only by their uid, rlimits and seccomp.
    HostFs,
}

/// The prepared root and scratch area.
pub struct RuntimeRoot {
    pub mode: RootMode,
    pub root: PathBuf,
    pub scratch_base: PathBuf,
    pub prepared_in: Duration,
}

/// Give the worker a mount namespace of its own, with nothing shared back to
/// the host. Must run before the process has threads: `unshare(CLONE_NEWNS)`
/// only moves the calling thread.
pub fn enter_private_mount_namespace() -> Result<(), RootError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(RootError::Unshare)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(RootError::Unshare)
}

fn create_dir(path: &Path, mode: u32) -> Result<(), RootError> {
    let err = |source| RootError::Create {
        path: path.to_owned(),
        source,
    };
    fs::create_dir_all(path).map_err(err)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(err)
}

fn write_file(path: &Path, contents: &[u8]) -> Result<(), RootError> {
    fs::write(path, contents).map_err(|source| RootError::Create {
        path: path.to_owned(),
        source,
    })
}

fn do_mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), RootError> {
    mount(source, target, fstype, flags, data).map_err(|source| RootError::Mount {
        target: target.to_owned(),
        source,
    })
}

/// Bind `source` on `target` read-only (a bind takes the flags of its source,
/// so read-only needs a second, remounting call).
fn bind_ro(source: &Path, target: &Path) -> Result<(), RootError> {
    do_mount(
        Some(source),
        target,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    do_mount(
        None,
        target,
        None,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        None,
    )
}

/// passwd and group with root and one `sandbox<uid>` entry per job uid, so
/// that user lookups in jobs (getpass, os.userInfo) find a name.
fn accounts(uids: std::ops::RangeInclusive<u32>) -> (String, String) {
    let mut passwd = String::from("root:x:0:0:root:/root:/usr/sbin/nologin\n");
    let mut group = String::from("root:x:0:\n");
    for uid in uids {
        passwd.push_str(&format!(
            "sandbox{uid}:x:{uid}:{uid}:sandq job:/tmp:/usr/sbin/nologin\n"
        ));
        group.push_str(&format!("sandbox{uid}:x:{uid}:\n"));
    }
    (passwd, group)
}
const HOSTS: &str = "127.0.0.1 localhost sandbox\n::1 localhost ip6-localhost\n";
const NSSWITCH: &str = "passwd: files\ngroup: files\nhosts: files dns\n";

/// Build the runtime root under `state_dir`. With `mounts` false (the host gave
/// us no mount namespace) only the scratch area is made.
pub fn prepare(
    state_dir: &Path,
    mounts: bool,
    uids: std::ops::RangeInclusive<u32>,
) -> Result<RuntimeRoot, RootError> {
    let started = Instant::now();
    let root = state_dir.join("root");
    let scratch_base = state_dir.join("scratch");
    create_dir(state_dir, 0o711)?;
    create_dir(&scratch_base, 0o711)?;
    if !mounts {
        return Ok(RuntimeRoot {
            mode: RootMode::HostFs,
            root,
            scratch_base,
            prepared_in: started.elapsed(),
        });
    }
    // The scratch base is a tmpfs too, so job dirs never touch the host disk
    // and disappear with the namespace.
    do_mount(
        Some(Path::new("tmpfs")),
        &scratch_base,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=1m,mode=0711"),
    )?;
    create_dir(&root, 0o755)?;
    do_mount(
        Some(Path::new("tmpfs")),
        &root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("size=8m,mode=0755"),
    )?;

    create_dir(&root.join("usr"), 0o755)?;
    bind_ro(Path::new("/usr"), &root.join("usr"))?;
    // Top-level program and library dirs: mirror the host (symlinks on a
    // usr-merged system, read-only binds otherwise).
    for name in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        let host = Path::new("/").join(name);
        let Ok(meta) = fs::symlink_metadata(&host) else {
            continue;
        };
        let target = root.join(name);
        if meta.file_type().is_symlink() {
            let dest = fs::read_link(&host).map_err(|source| RootError::Create {
                path: host.clone(),
                source,
            })?;
            symlink(&dest, &target).map_err(|source| RootError::Create {
                path: target.clone(),
                source,
            })?;
        } else if meta.is_dir() {
            create_dir(&target, 0o755)?;
            bind_ro(&host, &target)?;
        }
    }

    create_dir(&root.join("dev"), 0o755)?;
    for dev in ["null", "zero", "random", "urandom"] {
        let target = root.join("dev").join(dev);
        write_file(&target, b"")?;
        do_mount(
            Some(&Path::new("/dev").join(dev)),
            &target,
            None,
            MsFlags::MS_BIND,
            None,
        )?;
    }

    let etc = root.join("etc");
    create_dir(&etc, 0o755)?;
    let (passwd, group) = accounts(uids);
    write_file(&etc.join("passwd"), passwd.as_bytes())?;
    write_file(&etc.join("group"), group.as_bytes())?;
    write_file(&etc.join("hosts"), HOSTS.as_bytes())?;
    write_file(&etc.join("nsswitch.conf"), NSSWITCH.as_bytes())?;
    write_file(&etc.join("hostname"), b"sandbox\n")?;
    // Copied, not bound: small files whose later host changes should not leak in.
    for name in ["resolv.conf", "ld.so.cache", "localtime", "mime.types"] {
        if let Ok(bytes) = fs::read(Path::new("/etc").join(name)) {
            write_file(&etc.join(name), &bytes)?;
        }
    }
    // Directories the interpreters read: CA certificates (for network jobs),
    // Debian's Python site configuration, and the alternatives symlinks that
    // shared libraries such as libblas (numpy) resolve through.
    if let Ok(entries) = fs::read_dir("/etc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let wanted = name == "ssl"
                || name == "ca-certificates"
                || name == "alternatives"
                || name.starts_with("python3");
            if wanted && entry.path().is_dir() {
                let target = etc.join(&*name);
                create_dir(&target, 0o755)?;
                bind_ro(&entry.path(), &target)?;
            }
        }
    }
    create_dir(&root.join("tmp"), 0o755)?;

    // Freeze it: from here on nothing in the root can change.
    do_mount(
        None,
        &root,
        None,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("size=8m,mode=0755"),
    )?;
    Ok(RuntimeRoot {
        mode: RootMode::Pivot,
        root,
        scratch_base,
        prepared_in: started.elapsed(),
    })
}

/// One job's private scratch directory, holding the job's uid: with a
/// private root the uid's tmpfs, emptied when dropped; on the host
/// filesystem a fresh dir, removed when dropped. The uid goes back to the
/// pool only once that worked, so no job ever sees another's files.
pub struct Scratch {
    pub path: PathBuf,
    pub c_path: CString,
    lease: Option<UidLease>,
    /// The uid's own tmpfs, kept for its next job.
    reused: bool,
}

impl RuntimeRoot {
    /// Mount `uid`'s scratch tmpfs, once at start-up: capped at `size_mb`
    /// and 16k inodes, mode 0700, owned by the uid, no exec, suid or devices.
    pub fn mount_uid_scratch(
        &self,
        uid: u32,
        gid: u32,
        size_mb: u64,
    ) -> Result<PathBuf, RootError> {
        let path = self.scratch_base.join(uid.to_string());
        create_dir(&path, 0o700)?;
        let opts = format!("size={size_mb}m,nr_inodes=16k,mode=0700,uid={uid},gid={gid}");
        do_mount(
            Some(Path::new("tmpfs")),
            &path,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some(&opts),
        )?;
        Ok(path)
    }

    /// The scratch dir of a job run as the leased uid (gid the same): with a
    /// private root, the uid's tmpfs (empty: the previous job's files were
    /// cleared); on the host filesystem, a fresh dir with a random name,
    /// mode 0700, owned by the uid.
    pub fn scratch(&self, lease: UidLease) -> Result<Scratch, RootError> {
        let (uid, gid) = (lease.uid, lease.uid);
        if self.mode == RootMode::Pivot {
            let path = self.scratch_base.join(uid.to_string());
            let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| {
                RootError::Create {
                    path: path.clone(),
                    source: e.into(),
                }
            })?;
            return Ok(Scratch {
                path,
                c_path,
                lease: Some(lease),
                reused: true,
            });
        }
        let name = format!("{:032x}", rand::random::<u128>());
        let path = self.scratch_base.join(name);
        let err = |source| RootError::Create {
            path: path.clone(),
            source,
        };
        fs::create_dir(&path).map_err(err)?;
        let c_path =
            CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| err(e.into()))?;
        let err = |source| RootError::Create {
            path: path.clone(),
            source,
        };
        let scratch = Scratch {
            path: path.clone(),
            c_path,
            lease: Some(lease),
            reused: false,
        };
        nix::unistd::chown(&scratch.path, Some(uid.into()), Some(gid.into()))
            .map_err(|e| err(e.into()))?;
        fs::set_permissions(&scratch.path, fs::Permissions::from_mode(0o700)).map_err(err)?;
        Ok(scratch)
    }
}

impl Scratch {
    /// Remove what the job left, once every process of it is gone: all of
    /// the uid's tmpfs contents (its mode back to 0700), or the whole dir on
    /// the host filesystem.
    fn clear(&self) -> std::io::Result<()> {
        empty_dir(&self.path)?;
        if self.reused {
            // What the job could set on the directory itself goes back too:
            // its mode, and its times (which would otherwise carry a value
            // to the uid's next job).
            fs::set_permissions(&self.path, fs::Permissions::from_mode(0o700))?;
            let now = std::time::SystemTime::now();
            fs::File::open(&self.path)?
                .set_times(fs::FileTimes::new().set_accessed(now).set_modified(now))
        } else {
            fs::remove_dir(&self.path)
        }
    }
}

/// Delete everything under `root`, but not `root` itself, never following a
/// symlink (a job's links can point anywhere) and never crossing a mount (a
/// job cannot make one). Iterative, holding one directory open at a time: a
/// job can leave a chain of directories thousands deep (`mkdir a; cd a` in a
/// loop), which would overflow the stack of a recursive walk such as
/// `fs::remove_dir_all` or run it out of file descriptors.
fn empty_dir(root: &Path) -> std::io::Result<()> {
    use nix::dir::{Dir, Type};
    use nix::fcntl::{AtFlags, OFlag};
    use nix::sys::stat::{fstatat, Mode, SFlag};
    use nix::unistd::{unlinkat, UnlinkatFlags};
    use std::ffi::CStr;

    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut dir = Dir::open(root, flags, Mode::empty())?;
    // The names from `root` down to `dir`, to remove each once it is empty.
    let mut depth: Vec<CString> = Vec::new();
    loop {
        // A batch of entries: iterating again starts over (nix rewinds), so
        // batches keep the passes over a large directory linear.
        let mut batch: Vec<(CString, Option<Type>)> = Vec::new();
        for entry in dir.iter().take(256) {
            let entry = entry?;
            let name = entry.file_name();
            if name != c"." && name != c".." {
                batch.push((name.to_owned(), entry.file_type()));
            }
        }
        let seen = batch.len();
        let mut subdir = None;
        for (name, kind) in batch {
            let is_dir = match kind {
                Some(kind) => kind == Type::Directory,
                None => {
                    let st = fstatat(&dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)?;
                    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
                }
            };
            if is_dir {
                subdir.get_or_insert(name);
            } else {
                unlinkat(&dir, name.as_c_str(), UnlinkatFlags::NoRemoveDir)?;
            }
        }
        if let Some(name) = subdir {
            dir = Dir::openat(&dir, name.as_c_str(), flags, Mode::empty())?;
            depth.push(name);
            continue;
        }
        if seen > 0 {
            continue;
        }
        // Empty: go up and remove it, or stop at the root.
        let Some(name) = depth.pop() else {
            return Ok(());
        };
        let up: &CStr = c"..";
        dir = Dir::openat(&dir, up, flags, Mode::empty())?;
        unlinkat(&dir, name.as_c_str(), UnlinkatFlags::RemoveDir)?;
    }
}

impl Drop for Scratch {
    /// Clear, then hand the uid back; if clearing failed, the uid is retired
    /// for the rest of this worker's life instead.
    fn drop(&mut self) {
        if let Err(e) = self.clear() {
            tracing::error!(
                path = %self.path.display(),
                error = %e,
                "could not clear a job's scratch dir; its uid is taken out of service"
            );
            if let Some(lease) = self.lease.take() {
                lease.retire();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_dir_handles_what_a_job_can_leave() {
        let base = std::env::temp_dir().join(format!("sandq-empty-{}", std::process::id()));
        let root = base.join("scratch");
        let outside = base.join("outside");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("keep"), b"k").unwrap();
        // A chain 3000 directories deep (longer than PATH_MAX), built
        // relative to each level as a job would with `mkdir d; cd d`.
        {
            use nix::fcntl::{openat, OFlag};
            use nix::sys::stat::{mkdirat, Mode};
            let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
            let mut at = nix::fcntl::open(&root, flags, Mode::empty()).unwrap();
            for i in 0..3000 {
                mkdirat(&at, c"d", Mode::from_bits_truncate(0o755)).unwrap();
                at = openat(&at, c"d", flags, Mode::empty()).unwrap();
                if i % 500 == 0 {
                    let f = openat(
                        &at,
                        c"f",
                        OFlag::O_CREAT | OFlag::O_WRONLY,
                        Mode::from_bits_truncate(0o600),
                    );
                    drop(f.unwrap());
                }
            }
        }
        // Many files in one directory, links out of the tree, a closed dir.
        for i in 0..1000 {
            fs::write(root.join(format!("many-{i}")), b"").unwrap();
        }
        symlink(&outside, root.join("dirlink")).unwrap();
        symlink(outside.join("keep"), root.join("filelink")).unwrap();
        fs::create_dir_all(root.join("closed/inner")).unwrap();
        fs::write(root.join("closed/inner/f"), b"x").unwrap();
        fs::set_permissions(root.join("closed"), fs::Permissions::from_mode(0o000)).unwrap();
        fs::write(root.join(".hidden"), b"x").unwrap();

        // A small stack: the walk must not recurse.
        let r = root.clone();
        std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || empty_dir(&r))
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        assert_eq!(fs::read_dir(&root).unwrap().count(), 0, "everything went");
        assert_eq!(
            fs::read(outside.join("keep")).unwrap(),
            b"k",
            "links were not followed"
        );
        fs::remove_dir_all(&base).unwrap();
    }
}

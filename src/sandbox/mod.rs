//! The sandbox: policy and the child-side mechanics, with no Redis and no tokio.
//!
//! - [`allowlist`]: the seccomp policy as data, a reason per syscall.
//! - [`seccomp`]: compiles the policy to BPF once at start-up.
//! - [`rootfs`]: the read-only runtime root and per-job scratch dirs.
//! - [`cgroup`]: per-job memory and pids limits.
//! - [`uids`]: a distinct uid for every running job.
//! - [`spawn`]: `clone3` and the ordered lock-down up to `execve` (the one
//!   place where the order of the layers is written down).
//!
//! [`Sandbox::prepare`] detects what the host allows, builds all of the above
//! once, and records which isolation layers are active in a [`Layers`] report
//! that the worker logs at start-up, `sandq doctor` prints and metrics export.

pub mod allowlist;
pub mod cgroup;
pub mod landlock;
pub mod rootfs;
pub mod seccomp;
pub mod slots;
pub mod spawn;
pub mod uids;

use crate::job::Language;
use std::collections::HashMap;
use std::ffi::CString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("preparing the runtime root: {0}")]
    Root(#[from] rootfs::RootError),
    #[error("claiming sandbox uids: {0}")]
    Uids(#[from] uids::UidError),
    #[error("interpreter {language} not found at {path}")]
    Interpreter { language: Language, path: PathBuf },
    #[error("asking {path} for its module search path: {reason}")]
    PythonPath { path: PathBuf, reason: String },
    #[error("preparing the slot cgroups: {0}")]
    Slots(#[from] cgroup::CgroupError),
    #[error("required isolation layer {layer} is unavailable: {reason}")]
    Required { layer: &'static str, reason: String },
}

/// What the sandbox is built from; part of the worker's config.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Runtime root, scratch and lock files live here.
    pub state_dir: PathBuf,
    pub python: PathBuf,
    pub node: PathBuf,
    pub uid_first: u32,
    pub uid_last: u32,
    /// How many jobs may run at once (uids to claim).
    pub slots: usize,
    /// Extra syscalls to allow, on top of the defaults.
    pub allow_syscalls: Vec<String>,
    /// Writable scratch per job.
    pub scratch_mb: u64,
    /// Processes and threads per job.
    pub pids_max: u64,
    /// Open files per job.
    pub nofile: u64,
    /// Layers that must be active, or start-up fails (`all` for every one).
    pub require_layers: Vec<String>,
    /// Layers of [`REQUIRED_TO_TAKE_JOBS`] the operator lets jobs run without.
    pub allow_degraded: Vec<String>,
    /// Set by `main`: whether the worker could enter a private mount namespace.
    pub private_mounts: Result<(), String>,
}

/// Layers without which a worker takes no job unless the operator allows it
/// (`--allow-degraded`): without the memory cgroup, `memory_mb` falls back
/// to RLIMIT_AS, which counts address space rather than memory (Node needs
/// far more of it than it uses, so its limit is loose) and misses kernel
/// memory such as socket buffers.
pub const REQUIRED_TO_TAKE_JOBS: &[&str] = &["cgroup memory"];

/// One isolation layer and whether it is in force.
#[derive(Debug, Clone)]
pub struct Layer {
    pub name: &'static str,
    pub what: &'static str,
    pub status: Result<String, String>,
}

/// The report of every layer, in lock-down order.
#[derive(Debug, Clone, Default)]
pub struct Layers(pub Vec<Layer>);

impl Layers {
    fn push(&mut self, name: &'static str, what: &'static str, status: Result<String, String>) {
        self.0.push(Layer { name, what, status });
    }

    pub fn is_active(&self, name: &str) -> bool {
        self.0.iter().any(|l| l.name == name && l.status.is_ok())
    }

    /// Fail on the first required layer (by name, or `all`) that is not
    /// active; an unknown name is an error too, so a typo never passes.
    pub fn require(&self, required: &[String]) -> Result<(), SandboxError> {
        for wanted in required {
            if wanted != "all" && !self.0.iter().any(|l| l.name == wanted) {
                let known: Vec<&str> = self.0.iter().map(|l| l.name).collect();
                return Err(SandboxError::Required {
                    layer: "unknown",
                    reason: format!(
                        "no layer is called {wanted:?} (layers: {})",
                        known.join(", ")
                    ),
                });
            }
            for layer in &self.0 {
                if let (true, Err(reason)) =
                    (wanted == "all" || wanted == layer.name, &layer.status)
                {
                    return Err(SandboxError::Required {
                        layer: layer.name,
                        reason: reason.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// A fixed-width table, one line per layer.
    pub fn table(&self) -> String {
        let mut out = String::new();
        for l in &self.0 {
            let (state, detail) = match &l.status {
                Ok(d) => ("active", d.as_str()),
                Err(r) => ("UNAVAILABLE", r.as_str()),
            };
            out.push_str(&format!(
                "  {:<18} {:<12} {:<48} {}\n",
                l.name, state, l.what, detail
            ));
        }
        out
    }
}

/// Everything prepared once and shared by all jobs.
pub struct Sandbox {
    pub config: SandboxConfig,
    pub filters: seccomp::Filters,
    pub root: rootfs::RuntimeRoot,
    pub uids: uids::UidPool,
    /// Spawning threads living in the uids' slot cgroups (cgroup v1);
    /// declared before `cgroups`, so they are gone when those are removed.
    pub slots: Option<slots::Slots>,
    pub cgroups: Option<cgroup::Cgroups>,
    /// clone3 namespace flags every job gets (net is added per job).
    pub namespaces: u64,
    pub net_namespace: bool,
    /// The empty network namespace jobs without network join.
    pub shared_netns: Option<std::os::fd::OwnedFd>,
    /// The empty IPC namespace every job joins, where no IPC call is allowed.
    pub shared_ipcns: Option<std::os::fd::OwnedFd>,
    /// Per uid, the mount namespace its jobs join (with a private root).
    pub mount_ns: HashMap<u32, std::os::fd::OwnedFd>,
    /// Landlock ABI version and, per language, the files jobs may execute.
    pub landlock: Option<(i32, HashMap<Language, Vec<CString>>)>,
    /// Python's `sys.path` as `site` would make it, as a JSON list: jobs'
    /// interpreters start without `site` and get this instead (see
    /// `prescript/python.py`).
    pub python_path: String,
    pub layers: Layers,
    pub prepared_in: Duration,
}

/// Ask the interpreter, once, for the module search path `site` gives it
/// (site-packages and `.pth` path entries included), with the environment a
/// job has: none.
fn python_site_path(python: &std::path::Path) -> Result<String, SandboxError> {
    let failed = |reason: String| SandboxError::PythonPath {
        path: python.to_owned(),
        reason,
    };
    let out = std::process::Command::new(python)
        .args(["-I", "-c", "import json, sys; print(json.dumps(sys.path))"])
        .env_clear()
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| failed(e.to_string()))?;
    if !out.status.success() {
        return Err(failed(String::from_utf8_lossy(&out.stderr).into_owned()));
    }
    // Re-encoded by us, so the prescript gets a plain list of strings.
    let path: Vec<String> =
        serde_json::from_slice(&out.stdout).map_err(|e| failed(e.to_string()))?;
    serde_json::to_string(&path).map_err(|e| failed(e.to_string()))
}

fn io_root(path: &std::path::Path, source: std::io::Error) -> SandboxError {
    SandboxError::Root(rootfs::RootError::Create {
        path: path.to_owned(),
        source,
    })
}

/// Try a clone3 with `flags` whose child exits at once.
fn probe_clone(flags: u64) -> Result<(), String> {
    spawn::probe(flags).map_err(|e| e.to_string())
}

impl Sandbox {
    /// Detect, prepare and report. `worker_tag` names this worker's cgroups.
    pub fn prepare(config: SandboxConfig, worker_tag: &str) -> Result<Sandbox, SandboxError> {
        let started = Instant::now();
        let mut layers = Layers::default();
        for (language, path) in [
            (Language::Python3, &config.python),
            (Language::Nodejs, &config.node),
        ] {
            if language == Language::Python3 && !path.exists() {
                return Err(SandboxError::Interpreter {
                    language,
                    path: path.clone(),
                });
            }
        }

        let mut namespaces = 0u64;
        let ns = [
            (
                "pid namespace",
                libc::CLONE_NEWPID,
                "own process tree; killing pid 1 ends all",
            ),
            (
                "mount namespace",
                libc::CLONE_NEWNS,
                "per uid, made once; host root detached",
            ),
            (
                "ipc namespace",
                libc::CLONE_NEWIPC,
                "no SysV IPC or POSIX queues shared",
            ),
            ("uts namespace", libc::CLONE_NEWUTS, "own hostname"),
        ];
        // Jobs share one empty IPC namespace unless the operator allowed an
        // IPC call: with none allowed nothing can be created in it, and a
        // namespace per job cost its creation and, at teardown, a kernel
        // worker waiting out an RCU grace period.
        let ipc_calls = config.allow_syscalls.iter().any(|s| allowlist::is_ipc(s));
        let mut shared_ipcns = None;
        for (name, flag, what) in ns {
            let flag = flag as u64;
            let mount_ok = flag != libc::CLONE_NEWNS as u64 || config.private_mounts.is_ok();
            let mut status = if mount_ok {
                probe_clone(flag).map(|_| "clone3 flag".to_owned())
            } else {
                Err(config.private_mounts.clone().unwrap_err())
            };
            if status.is_ok() {
                namespaces |= flag;
                if flag == libc::CLONE_NEWIPC as u64 {
                    status = Ok("one per job (IPC calls are allowed)".to_owned());
                    if !ipc_calls {
                        shared_ipcns = spawn::hold_namespace(flag, "ipc").ok();
                        if shared_ipcns.is_some() {
                            status = Ok("shared empty one; no IPC call is allowed".to_owned());
                        }
                    }
                }
            }
            layers.push(name, what, status);
        }
        let net = probe_clone(libc::CLONE_NEWNET as u64);
        let net_namespace = net.is_ok();
        let shared_netns = if net_namespace {
            spawn::hold_namespace(libc::CLONE_NEWNET as u64, "net").ok()
        } else {
            None
        };
        layers.push(
            "net namespace",
            "never the host's network; lo + egress relay",
            net.map(|_| {
                if shared_netns.is_some() {
                    "shared empty one without network".to_owned()
                } else {
                    "one per job".to_owned()
                }
            }),
        );

        let mounts = namespaces & libc::CLONE_NEWNS as u64 != 0;
        let root = rootfs::prepare(
            &config.state_dir,
            mounts,
            config.uid_first..=config.uid_last,
        )?;
        layers.push(
            "read-only root",
            "pivot_root into /usr binds + private /tmp",
            match root.mode {
                rootfs::RootMode::Pivot => Ok(format!(
                    "prepared in {:.1} ms",
                    root.prepared_in.as_secs_f64() * 1e3
                )),
                rootfs::RootMode::HostFs => {
                    Err("no mount namespace: jobs see the host filesystem".to_owned())
                }
            },
        );

        // Landlock needs no privilege, so it also guards hosts that gave us
        // no private root: there it confines writes to the scratch dir.
        let landlock = match landlock::abi() {
            Ok(abi) => {
                let mut exec = HashMap::new();
                for language in Language::ALL {
                    let path = match language {
                        Language::Python3 => &config.python,
                        Language::Nodejs => &config.node,
                    };
                    let mut files =
                        vec![CString::new(path.as_os_str().as_encoded_bytes()).unwrap_or_default()];
                    if let Some(loader) = landlock::elf_loader(path) {
                        files.push(CString::new(loader).unwrap_or_default());
                    }
                    exec.insert(language, files);
                }
                Ok((abi, exec))
            }
            Err(e) => Err(e),
        };
        layers.push(
            "landlock",
            "writes only in /tmp, exec only the interpreter",
            landlock
                .as_ref()
                .map(|(abi, _)| format!("ABI v{abi}"))
                .map_err(Clone::clone),
        );

        let cgroups = cgroup::Cgroups::detect(worker_tag);
        let (mem_status, pids_status) = match &cgroups {
            Ok(c) => (
                Ok(c.describe()),
                Ok(format!("{}, max {}", c.describe(), config.pids_max)),
            ),
            Err(e) => (
                Err(format!("{e}; falling back to RLIMIT_AS")),
                Err(format!("{e}; falling back to RLIMIT_NPROC per uid")),
            ),
        };
        layers.push(
            "cgroup memory",
            "memory_mb enforced by the kernel",
            mem_status,
        );
        layers.push(
            "cgroup pids",
            "fork and thread bombs stop at pids_max",
            pids_status,
        );
        layers.push(
            "rlimits",
            "cpu, file size, open files, core 0, nproc",
            Ok(format!(
                "nofile {}, fsize {} MiB",
                config.nofile, config.scratch_mb
            )),
        );

        // The lock dir is on the host side (no private mount covers it), so
        // every worker on this host sees the same locks.
        let uids = uids::UidPool::claim(
            &config.state_dir.join("uids"),
            config.uid_first,
            config.uid_last,
            config.slots,
        )?;
        layers.push(
            "uid per job",
            "setresuid to a uid no other job holds",
            Ok(format!(
                "{} uids from {}-{}",
                config.slots, config.uid_first, config.uid_last
            )),
        );
        layers.push(
            "no_new_privs",
            "no setuid binary or file capability applies",
            Ok("prctl".to_owned()),
        );

        let filters = seccomp::Filters::compile(&config.allow_syscalls)?;
        layers.push(
            "seccomp",
            "syscall allowlist, everything else stopped",
            Ok(format!(
                "{} BPF instructions (python3)",
                filters.get(Language::Python3, false).instructions()
            )),
        );
        layers.push(
            "named violations",
            "supervisor names each blocked syscall",
            Ok("seccomp user notification".to_owned()),
        );

        let slots = match &cgroups {
            Ok(c @ cgroup::Cgroups::V1 { .. }) => Some(slots::Slots::start(c, &uids.all())?),
            _ => None,
        };
        // Each uid's scratch tmpfs and mount namespace, made once (see
        // spawn::hold_mount_namespace).
        let mut mount_ns = HashMap::new();
        if root.mode == rootfs::RootMode::Pivot {
            let c = |p: &std::path::Path| CString::new(p.as_os_str().as_encoded_bytes());
            let root_c = c(&root.root).map_err(|e| io_root(&root.root, e.into()))?;
            let tmp = root.root.join("tmp");
            let tmp_c = c(&tmp).map_err(|e| io_root(&tmp, e.into()))?;
            for uid in uids.all() {
                let scratch = root.mount_uid_scratch(uid, uid, config.scratch_mb)?;
                let scratch_c = c(&scratch).map_err(|e| io_root(&scratch, e.into()))?;
                let ns = spawn::hold_mount_namespace(&root_c, &tmp_c, &scratch_c)
                    .map_err(|e| io_root(&scratch, e))?;
                mount_ns.insert(uid, ns);
            }
        }
        let python_path = python_site_path(&config.python)?;
        let sandbox = Sandbox {
            config,
            filters,
            root,
            uids,
            slots,
            cgroups: cgroups.ok(),
            namespaces,
            net_namespace,
            shared_netns,
            shared_ipcns,
            mount_ns,
            landlock: landlock.ok(),
            python_path,
            layers,
            prepared_in: started.elapsed(),
        };
        sandbox.check_required()?;
        Ok(sandbox)
    }

    fn check_required(&self) -> Result<(), SandboxError> {
        self.layers.require(&self.config.require_layers)
    }

    /// Why this sandbox must take no job: a layer of
    /// [`REQUIRED_TO_TAKE_JOBS`] is unavailable and the operator did not
    /// allow running without it.
    pub fn refusal(&self) -> Option<String> {
        REQUIRED_TO_TAKE_JOBS
            .iter()
            .filter(|name| !self.config.allow_degraded.iter().any(|a| a == *name))
            .find_map(|name| {
                let layer = self.layers.0.iter().find(|l| l.name == *name)?;
                let reason = layer.status.as_ref().err()?;
                Some(format!(
                    "isolation layer {name:?} is unavailable ({reason}), so no job is taken; \
                     fix the host, or start with --allow-degraded {name:?} to run jobs without it"
                ))
            })
    }

    pub fn interpreter(&self, language: Language) -> &std::path::Path {
        match language {
            Language::Python3 => &self.config.python,
            Language::Nodejs => &self.config.node,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layers() -> Layers {
        let mut l = Layers::default();
        l.push("seccomp", "", Ok("on".into()));
        l.push("landlock", "", Err("not enabled in this kernel".into()));
        l
    }

    #[test]
    fn required_layers() {
        let l = layers();
        assert!(l.require(&["seccomp".into()]).is_ok());
        let err = l.require(&["landlock".into()]).unwrap_err().to_string();
        assert!(
            err.contains("landlock") && err.contains("not enabled"),
            "{err}"
        );
        assert!(l.require(&["all".into()]).is_err());
        let err = l.require(&["seccmop".into()]).unwrap_err().to_string();
        assert!(err.contains("no layer is called"), "{err}");
    }
}

//! cgroup v2 where users run sandq: in a container's private cgroup
//! namespace, under a systemd unit with `Delegate=yes`, and the mechanism
//! that makes a job born in its group.
//!
//! These need a cgroup v2 host. On another one they are skipped with a note,
//! unless `SANDQ_EXPECT_CGROUP_V2=1` (the cgroup v2 guest of `scripts/vm-test`
//! sets it), where a host without cgroup v2 is a failure.

mod common;
use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const ROOT: &str = "/sys/fs/cgroup";

/// Whether this host has cgroup v2 at /sys/fs/cgroup (else the test returns).
fn cgroup_v2() -> bool {
    let v2 = Path::new(ROOT).join("cgroup.controllers").exists()
        && !Path::new(ROOT).join("memory").exists();
    if !v2 {
        assert!(
            std::env::var("SANDQ_EXPECT_CGROUP_V2").map_or(true, |v| v != "1"),
            "SANDQ_EXPECT_CGROUP_V2=1 but {ROOT} is not a cgroup v2 hierarchy"
        );
        eprintln!("skipping: {ROOT} is not cgroup v2");
    }
    v2
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A fresh group at the hierarchy's root, as a container runtime makes one
/// for a container; removed (with what sandq left in it) when dropped.
struct ContainerGroup(PathBuf);

impl ContainerGroup {
    fn new(name: &str) -> ContainerGroup {
        let dir = Path::new(ROOT).join(format!("{name}-{:08x}", rand::random::<u32>()));
        std::fs::create_dir(&dir).unwrap();
        ContainerGroup(dir)
    }

    /// `args` run as sandq in this group, in a cgroup namespace of its own
    /// rooted here, with cgroup2 mounted afresh at /sys/fs/cgroup (what
    /// Docker and Kubernetes do by default on cgroup v2).
    fn sandq(&self, args: &[&str]) -> Command {
        self.sandq_under("", args)
    }

    /// The same, sandq run under `wrapper` (a command line prefix).
    fn sandq_under(&self, wrapper: &str, args: &[&str]) -> Command {
        self.run_under(wrapper, BIN, args)
    }

    /// A shell script run in this group's namespace (as a container's init
    /// would run it), with `$SANDQ` the binary under test.
    fn shell(&self, script: &str) -> Command {
        let mut cmd = self.run_under("", "sh", &["-c", script]);
        cmd.env("SANDQ", BIN);
        cmd
    }

    /// `program args` run under `wrapper` in this group, in a cgroup
    /// namespace of its own rooted here.
    fn run_under(&self, wrapper: &str, program: &str, args: &[&str]) -> Command {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec unshare --cgroup --mount --propagation private \
             sh -c 'umount -l /sys/fs/cgroup; mount -t cgroup2 none /sys/fs/cgroup && exec {wrapper} \"$0\" \"$@\"' \"$0\" \"$@\"",
            self.0.display()
        );
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .arg(program)
            .args(args)
            .env_remove("SANDQ_CONFIG");
        cmd
    }

    /// The groups in it, relative to it.
    fn tree(&self) -> Vec<String> {
        let mut found = Vec::new();
        let mut todo = vec![self.0.clone()];
        while let Some(dir) = todo.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if entry.path().is_dir() {
                    let rel = entry
                        .path()
                        .strip_prefix(&self.0)
                        .unwrap()
                        .display()
                        .to_string();
                    found.push(rel);
                    todo.push(entry.path());
                }
            }
        }
        found.sort();
        found
    }
}

impl Drop for ContainerGroup {
    fn drop(&mut self) {
        // Deepest first; a group with processes left refuses, which a
        // failing test shows anyway.
        let mut dirs = self.tree();
        dirs.sort_by_key(|d| std::cmp::Reverse(d.len()));
        for d in dirs {
            let _ = std::fs::remove_dir(self.0.join(d));
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The doctor's line for a layer.
fn layer<'a>(doctor: &'a str, name: &str) -> &'a str {
    doctor
        .lines()
        .find(|l| l.trim_start().starts_with(name))
        .unwrap_or_else(|| panic!("no line for {name}:\n{doctor}"))
}

fn assert_cgroup_layers_active(doctor: &str) {
    for name in ["cgroup memory", "cgroup pids"] {
        let line = layer(doctor, name);
        assert!(line.contains(" active "), "{line}\n{doctor}");
        assert!(line.contains("cgroup v2"), "{line}");
        assert!(line.contains("jobs born in their group"), "{line}");
    }
    assert!(!doctor.contains("REFUSING JOBS"), "{doctor}");
}

#[test]
fn in_a_private_cgroup_namespace_every_layer_is_active() {
    if !cgroup_v2() {
        return;
    }
    let group = ContainerGroup::new("sandq-test-ns");
    let out = group.sandq(&["doctor"]).output().unwrap();
    let doctor = text(&out);
    assert_eq!(out.status.code(), Some(0), "{doctor}");
    assert_cgroup_layers_active(&doctor);
    assert!(!doctor.contains("UNAVAILABLE"), "{doctor}");
    // The worker's processes went to a leaf; its job groups are gone.
    assert_eq!(
        group.tree(),
        ["sandq-worker"],
        "left behind: {:?}",
        group.tree()
    );
}

#[test]
fn two_workers_in_one_container_share_its_group() {
    if !cgroup_v2() {
        return;
    }
    // Both start at once from the container's init: the first to set up
    // moves every process (its sibling too) into the leaf; the other must
    // find its controllers all the same, not nest a leaf of its own.
    let group = ContainerGroup::new("sandq-test-twins");
    let out = group
        .shell("$SANDQ doctor > /tmp/sandq-twin-a.$$ 2>&1 & $SANDQ doctor > /tmp/sandq-twin-b.$$ 2>&1 & wait; cat /tmp/sandq-twin-a.$$; echo ===; cat /tmp/sandq-twin-b.$$; rm -f /tmp/sandq-twin-[ab].$$")
        .output()
        .unwrap();
    let both = text(&out);
    assert!(out.status.success(), "{both}");
    let (a, b) = both.split_once("===").expect("two doctor tables");
    for doctor in [a, b] {
        assert_cgroup_layers_active(doctor);
        assert!(!doctor.contains("sandq-worker/sandq-worker"), "{doctor}");
    }
    assert_eq!(group.tree(), ["sandq-worker"], "left behind");
}

#[test]
fn under_a_delegated_systemd_unit_every_cgroup_layer_is_active() {
    if !cgroup_v2() {
        return;
    }
    if !Path::new("/run/systemd/system").exists() {
        assert!(
            std::env::var("SANDQ_EXPECT_SYSTEMD").map_or(true, |v| v != "1"),
            "SANDQ_EXPECT_SYSTEMD=1 but systemd is not running"
        );
        eprintln!("skipping: systemd is not the init system here");
        return;
    }
    let unit = format!("sandq-test-{:08x}", rand::random::<u32>());
    let out = Command::new("systemd-run")
        .args(["--quiet", "--wait", "--pipe", "--collect", "--unit", &unit])
        .args(["-p", "Delegate=yes", BIN, "doctor"])
        .stdin(Stdio::null())
        .output()
        .expect("systemd-run");
    let doctor = text(&out);
    assert_eq!(out.status.code(), Some(0), "{doctor}");
    assert_cgroup_layers_active(&doctor);
    // The job groups were under the unit's own group, never at the root.
    let line = layer(&doctor, "cgroup memory");
    assert!(line.contains(&format!("/{unit}.service/sandq/")), "{line}");
}

#[test]
fn jobs_are_born_in_their_group() {
    if !cgroup_v2() {
        return;
    }
    // The mechanism itself: `clone3` with CLONE_INTO_CGROUP, so nothing the
    // interpreter does at start-up is charged anywhere but the job's group
    // (cgroup v2 does not move charges with a moved process). `sandq run`
    // clones from its main thread, which strace follows without -f.
    if Command::new("strace").arg("-V").output().is_err() {
        assert!(
            std::env::var("SANDQ_EXPECT_CGROUP_V2").map_or(true, |v| v != "1"),
            "strace is needed for this test in the cgroup v2 guest"
        );
        eprintln!("skipping: no strace");
        return;
    }
    let group = ContainerGroup::new("sandq-test-birth");
    let trace = std::env::temp_dir().join(format!("sandq-clone3-{:08x}", rand::random::<u32>()));
    let strace = format!("strace -qq -e trace=clone3 -o {}", trace.display());
    let out = group
        .sandq_under(
            &strace,
            &["run", "--json", "-l", "python3", "-c", "print(1)"],
        )
        .output()
        .unwrap();
    let traced = std::fs::read_to_string(&trace).unwrap_or_default();
    let _ = std::fs::remove_file(&trace);
    assert!(out.status.success(), "{}", text(&out));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_status(&r, "ok");
    let job_clone = traced
        .lines()
        .find(|l| l.contains("CLONE_NEWPID") && l.contains("CLONE_PIDFD"))
        .unwrap_or_else(|| panic!("no job clone3 in the trace:\n{traced}"));
    assert!(job_clone.contains("CLONE_INTO_CGROUP"), "{job_clone}");
    assert!(job_clone.contains("cgroup="), "{job_clone}");
}

#[test]
fn bombs_are_stopped_in_a_private_cgroup_namespace_and_nothing_is_left() {
    let Some(mut c) = redis() else { return };
    if !cgroup_v2() {
        return;
    }
    let p = prefix("cgroup-v2");
    for pool in ["0", "2"] {
        // A container of its own each time, as a restarted container gets:
        // a group that hands controllers down takes no process (v2's "no
        // internal processes" rule), so the last worker's group is no start.
        let group = ContainerGroup::new("sandq-test-worker");
        // The worker's log goes to a file, shown when a job gets no result.
        let log_path = std::env::temp_dir().join(format!("{p}-pool{pool}.log"));
        let mut worker = group
            .sandq(&[
                "worker",
                "--redis",
                &redis_url(),
                "--prefix",
                &p,
                "--metrics-addr",
                "off",
                "--concurrency",
                "2",
                "--pool-size",
                pool,
            ])
            .env("SANDQ_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap();
        let cases = [
            (
                json!({"language": "python3", "code": "b = bytearray(1024 ** 3)\nprint('UNREACHED')", "memory_mb": 128}),
                "memory_limit",
            ),
            (
                json!({"language": "nodejs", "code": "const a = []; while (true) a.push(Buffer.alloc(1 << 20, 1));", "memory_mb": 128}),
                "memory_limit",
            ),
            (
                json!({"language": "python3", "code": "import threading, time\nfor _ in range(1000):\n    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()\nprint('UNREACHED')", "timeout_ms": 10000}),
                "error",
            ),
            (
                json!({"language": "nodejs", "code": "console.log(6 * 7)"}),
                "ok",
            ),
        ];
        for (mut job, status) in cases {
            let id = format!("j-{:016x}", rand::random::<u64>());
            job["id"] = json!(id);
            push(&mut c, &p, &job);
            let r: Option<(String, String)> = redis::cmd("BLPOP")
                .arg(format!("{p}:result:{id}"))
                .arg(scaled(Duration::from_secs(60)).as_secs_f64())
                .query(&mut c)
                .unwrap();
            let Some((_, r)) = r else {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                panic!("pool {pool}: no result for {job}; worker log:\n{log}");
            };
            let r: Value = serde_json::from_str(&r).unwrap();
            assert_status(&r, status);
            if status == "error" {
                assert!(
                    r["stderr"]
                        .as_str()
                        .unwrap()
                        .contains("can't start new thread"),
                    "pool {pool}: {r}"
                );
            }
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(worker.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let status = worker.wait().unwrap();
        assert!(status.success(), "pool {pool}: worker exit {status}");
        // Only the leaf the worker moved into is left: no job group, no
        // worker group.
        assert_eq!(group.tree(), ["sandq-worker"], "pool {pool}");
        let _ = std::fs::remove_file(&log_path);
    }
    delete_prefix(&p);
}

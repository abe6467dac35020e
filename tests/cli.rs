//! The local subcommands: doctor, profile, run with extra syscalls.

mod common;
use common::BIN;
use std::process::Command;

fn sandq(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("SANDQ_CONFIG")
        .output()
        .expect("run sandq");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn doctor_lists_every_layer_active_here() {
    let (code, out, err) = sandq(&["doctor"]);
    assert_eq!(code, 0, "{out}{err}");
    for layer in [
        "pid namespace",
        "mount namespace",
        "ipc namespace",
        "uts namespace",
        "net namespace",
        "read-only root",
        "landlock",
        "cgroup memory",
        "cgroup pids",
        "rlimits",
        "uid per job",
        "no_new_privs",
        "seccomp",
        "named violations",
    ] {
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with(layer))
            .unwrap_or_else(|| panic!("no line for {layer}:\n{out}"));
        assert!(
            line.contains(" active "),
            "{layer} is not active on this machine: {line}"
        );
    }
    assert!(out.contains("self-test          python3: ok"), "{out}");
    assert!(!out.contains("UNAVAILABLE"), "{out}");
}

#[test]
fn doctor_refuses_an_unknown_required_layer() {
    // Every layer is active on this machine, so a missing one cannot be shown
    // here (the unit test of `Layers::require` covers it); a misspelt one
    // must not pass silently.
    let (code, out, err) = sandq(&["doctor", "--require-layer", "seccmop"]);
    assert_eq!(code, 3, "{out}{err}");
    assert!(err.contains("no layer is called \"seccmop\""), "{err}");
    let (code, out, err) = sandq(&["doctor", "--require-layer", "all"]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn profile_names_the_missing_syscalls_and_the_config_line() {
    let code = "import os\nos.sched_setaffinity(0, {0})\nprint('done')";
    let (status, out, err) = sandq(&["profile", "--language", "python3", "--code", code]);
    assert_eq!(
        status, 1,
        "profile exits 1 when the allowlist lacks something: {out}{err}"
    );
    assert!(
        out.contains("status: ok, exit code 0"),
        "the program ran to the end: {out}"
    );
    assert!(out.contains("  sched_setaffinity\n"), "{out}");
    assert!(
        out.contains("allow_syscall = [\"sched_setaffinity\"]"),
        "{out}"
    );
    assert!(out.contains("--allow-syscall sched_setaffinity"), "{out}");

    let (status, out, _) = sandq(&["profile", "--language", "python3", "--code", "print(1)"]);
    assert_eq!(status, 0);
    assert!(
        out.contains("every syscall this program made is on the python3 allowlist"),
        "{out}"
    );
}

#[test]
fn profile_says_socket_is_allowed_by_family() {
    // Without network no family is allowed; learning mode lets it through.
    let code = "import socket\nsocket.socket(40, 1, 0)\nprint('made')";
    let (status, out, err) = sandq(&["profile", "--language", "python3", "--code", code]);
    assert_eq!(status, 1, "{out}{err}");
    assert!(out.contains("status: ok, exit code 0"), "{out}");
    assert!(out.contains("  socket\n"), "{out}");
    assert!(
        out.contains("allowed for some address families only")
            && out.contains("allows every family"),
        "{out}"
    );
}

#[test]
fn allow_syscall_adds_to_the_defaults() {
    let code = "import os\nos.sched_setaffinity(0, {0})\nprint('pinned')";
    let (status, out, err) = sandq(&["run", "--language", "python3", "--code", code]);
    assert_ne!(status, 0);
    assert!(
        err.contains("blocked system call: sched_setaffinity"),
        "{err}"
    );
    assert!(out.is_empty());

    let (status, out, err) = sandq(&[
        "run",
        "--language",
        "python3",
        "--allow-syscall",
        "sched_setaffinity",
        "--code",
        code,
    ]);
    assert_eq!(status, 0, "{err}");
    assert_eq!(out, "pinned\n");
    // The defaults are still there: fork is still a violation.
    let (status, _, err) = sandq(&[
        "run",
        "--language",
        "python3",
        "--allow-syscall",
        "sched_setaffinity",
        "--code",
        "import os\nos.fork()",
    ]);
    assert_ne!(status, 0);
    assert!(err.contains("blocked system call: clone"), "{err}");

    let (status, _, err) = sandq(&[
        "run",
        "--language",
        "python3",
        "--allow-syscall",
        "no_such_call",
        "--code",
        "1",
    ]);
    assert_eq!(
        status, 3,
        "an unknown syscall name is a sandbox error: {err}"
    );
    assert!(err.contains("no_such_call"), "{err}");
}

#[test]
fn run_reports_timeouts_and_reads_code_from_stdin() {
    let (status, _, err) = sandq(&[
        "run",
        "--language",
        "python3",
        "--timeout-ms",
        "300",
        "--code",
        "while True: pass",
    ]);
    assert_eq!(status, 124);
    assert!(err.contains("timeout: timed out after 300 ms"), "{err}");

    let mut child = Command::new(BIN)
        .args(["run", "--language", "nodejs", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"console.log(6 * 7)")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n");
    assert!(out.status.success());
}

/// `sandq` with `args`, in a mount namespace of its own where
/// /sys/fs/cgroup is an empty tmpfs: a host without usable cgroups.
fn without_cgroups(args: &[&str]) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount -t tmpfs none /sys/fs/cgroup && exec "$0" "$@""#)
        .arg(BIN)
        .args(args)
        .env_remove("SANDQ_CONFIG");
    cmd
}

#[test]
fn without_the_memory_cgroup_no_job_is_taken_unless_allowed() {
    let out = without_cgroups(&["doctor"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains("cgroup memory      UNAVAILABLE"), "{text}");
    assert!(text.contains("REFUSING JOBS"), "{text}");
    assert!(
        text.contains("--allow-degraded \"cgroup memory\""),
        "{text}"
    );
    let out = without_cgroups(&["run", "-l", "python3", "-c", "print(1)"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no job is taken"));

    // The worker stays up, not ready, saying why, and leaves jobs queued.
    let Some(mut c) = common::redis() else { return };
    let p = common::prefix("no-cgroups");
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let worker_args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["worker", "--redis", &common::redis_url(), "--prefix", &p]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend([
            "--metrics-addr".into(),
            addr.clone(),
            "--concurrency".into(),
            "1".into(),
        ]);
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let args = worker_args(&[]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut refusing = common::Procs(vec![without_cgroups(&refs)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()]);
    common::push(
        &mut c,
        &p,
        &serde_json::json!({"id": "q1", "language": "python3", "code": "print(1)"}),
    );
    let (status, readyz) =
        common::http_get_when_up(port, "/readyz", std::time::Duration::from_secs(30));
    assert_eq!(status, 503, "{readyz}");
    assert!(readyz.contains("cgroup memory"), "{readyz}");
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(
        common::llen(&mut c, &format!("{p}:queue")),
        1,
        "the job stays queued"
    );
    assert!(
        refusing.0[0].try_wait().unwrap().is_none(),
        "the worker stays up"
    );
    drop(refusing);

    // Allowed to run degraded: the queued job runs.
    let args = worker_args(&["--allow-degraded", "cgroup memory"]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let _degraded = common::Procs(vec![without_cgroups(&refs)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()]);
    let r = common::result(&mut c, &p, "q1", std::time::Duration::from_secs(60));
    common::assert_status(&r, "ok");
    common::delete_prefix(&p);
}

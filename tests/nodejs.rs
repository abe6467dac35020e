//! Node.js end to end: a real worker, real Redis, the real `/usr/bin/node`,
//! talking only through the queue contract. Each test has its own prefix and
//! its own worker; every hostile job is followed by a harmless one that must
//! still succeed.

mod common;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Per-stream output cap (the worker's default).
const OUTPUT_LIMIT: usize = 1024 * 1024;

/// The variables a Node job sees, and nothing else.
const NODE_ENV_KEYS: [&str; 8] = [
    "LANG",
    "HOME",
    "TMPDIR",
    "PATH",
    "USER",
    "LOGNAME",
    "UV_USE_IO_URING",
    "UV_THREADPOOL_SIZE",
];

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// A Node job with extra fields (`stdin`, `timeout_ms`, `memory_mb`, `preload`, ...).
fn node_job(c: &mut redis::Connection, p: &str, code: &str, extra: Value) -> Value {
    let mut job = json!({"language": "nodejs", "code": code});
    if let Value::Object(fields) = extra {
        for (k, v) in fields {
            job[k] = v;
        }
    }
    run_job(c, p, job)
}

#[track_caller]
fn assert_ok_stdout(r: &Value, stdout: &str) {
    assert_status(r, "ok");
    assert_eq!(r["exit_code"], 0, "{r}");
    assert_eq!(r["stdout"], stdout, "{r}");
}

/// A violation naming `syscall` (x86_64 number `number`), the job killed.
/// A socket call's error spells its arguments too: `socketpair(AF_UNIX, ...)`.
#[track_caller]
fn assert_violation(r: &Value, syscall: &str, number: i64) {
    assert_status(r, "violation");
    assert_eq!(r["violation"]["syscall"], syscall, "{r}");
    assert_eq!(r["violation"]["number"], number, "{r}");
    let error = s(&r["error"]);
    if syscall.starts_with("socket") {
        assert!(
            error.starts_with(&format!("blocked system call: {syscall}(AF_")),
            "{r}"
        );
    } else {
        assert_eq!(error, format!("blocked system call: {syscall}"), "{r}");
    }
    assert_eq!(r["signal"], "SIGKILL", "{r}");
    assert!(r["exit_code"].is_null(), "{r}");
}

/// The worker still serves a harmless job.
#[track_caller]
fn assert_still_serves(c: &mut redis::Connection, p: &str) {
    assert_ok_stdout(&node(c, p, "console.log('still here')"), "still here\n");
}

#[test]
fn nodejs_hello_stdin_streams_unicode_big_output() {
    let Some(mut c) = redis() else { return };
    let p = prefix("node-hello");
    let w = Worker::start(&p, &["--concurrency", "2"]);

    let r = node(&mut c, &p, "console.log(\"hello\")");
    assert_ok_stdout(&r, "hello\n");
    assert_eq!(r["stderr"], "");
    assert_eq!(r["language"], "nodejs");
    assert_eq!(r["worker"], w.id.as_str());
    assert!(r["error"].is_null());
    assert!(r["violation"].is_null());

    let r = node_job(
        &mut c,
        &p,
        "const input = require('fs').readFileSync(0, 'utf8');\n\
         process.stdout.write(JSON.stringify([input.length, input.toUpperCase()]));",
        json!({"stdin": "echo me\nline two ✓\n"}),
    );
    assert_ok_stdout(&r, "[19,\"ECHO ME\\nLINE TWO ✓\\n\"]");

    let r = node(
        &mut c,
        &p,
        "console.log('to out');\nconsole.error('to err');\nconsole.warn('warned');",
    );
    assert_ok_stdout(&r, "to out\n");
    assert_eq!(r["stderr"], "to err\nwarned\n");

    let r = node(&mut c, &p, "console.log('héllo wörld ✓ 你好 🎉')");
    assert_ok_stdout(&r, "héllo wörld ✓ 你好 🎉\n");
    // And through stdin, both ways.
    let r = node_job(
        &mut c,
        &p,
        "process.stdout.write(require('fs').readFileSync(0, 'utf8').split('').reverse().join(''))",
        json!({"stdin": "añ✓你"}),
    );
    assert_ok_stdout(&r, "你✓ña");

    let r = node(
        &mut c,
        &p,
        "process.stdout.write('0123456789'.repeat(20000))",
    );
    assert_ok_stdout(&r, &"0123456789".repeat(20_000));
    assert_eq!(r["stdout_truncated"], false);
    let r = node(
        &mut c,
        &p,
        "for (let i = 0; i < 2000; i++) console.log(String(i).padStart(99, '.'))",
    );
    assert_status(&r, "ok");
    let expected: String = (0..2000).map(|i| format!("{i:.>99}\n")).collect();
    assert_eq!(expected.len(), 200_000);
    assert_eq!(r["stdout"], expected.as_str());
}

#[test]
fn nodejs_errors_and_exit_codes() {
    let Some(mut c) = redis() else { return };
    let p = prefix("node-errors");
    let _w = Worker::start(&p, &["--concurrency", "2"]);

    let r = node(
        &mut c,
        &p,
        "console.log('before');\nthrow new Error(\"bad input\")",
    );
    assert_status(&r, "error");
    assert_eq!(r["exit_code"], 1);
    assert_eq!(r["error"], "exited with code 1");
    assert_eq!(r["stdout"], "before\n");
    let stderr = s(&r["stderr"]);
    assert!(stderr.contains("Error: bad input\n"), "{stderr}");
    assert!(stderr.contains("<code>:2:"), "the user's frame: {stderr}");

    let r = node(&mut c, &p, "Promise.reject(new TypeError('async bad'))");
    assert_status(&r, "error");
    assert_eq!(r["exit_code"], 1);
    assert!(
        s(&r["stderr"]).contains("TypeError: async bad"),
        "{}",
        r["stderr"]
    );

    let r = node(&mut c, &p, "process.exit(3)");
    assert_status(&r, "error");
    assert_eq!(r["exit_code"], 3);
    assert_eq!(r["error"], "exited with code 3");
    assert!(r["signal"].is_null());

    let r = node(&mut c, &p, "console.log('bye'); process.exit(0)");
    assert_ok_stdout(&r, "bye\n");
}

#[test]
fn nodejs_builtins_work() {
    let Some(mut c) = redis() else { return };
    let p = prefix("node-builtins");
    let _w = Worker::start(&p, &["--concurrency", "2"]);

    let r = node(
        &mut c,
        &p,
        "const v = JSON.parse('{\"a\":[1,{\"b\":null}],\"s\":\"✓\"}');\n\
         console.log(JSON.stringify(v), v.a[1].b === null, JSON.stringify({n: 1.5, t: true}, null, 1))",
    );
    assert_ok_stdout(
        &r,
        "{\"a\":[1,{\"b\":null}],\"s\":\"✓\"} true {\n \"n\": 1.5,\n \"t\": true\n}\n",
    );

    let r = node(
        &mut c,
        &p,
        "console.log(Buffer.from('hello world ✓').toString('base64'));\n\
         console.log(Buffer.from('aGVsbG8gd29ybGQg4pyT', 'base64').toString('utf-8'));\n\
         console.log(Buffer.from([0xde, 0xad, 0xbe, 0xef]).toString('hex'))",
    );
    assert_ok_stdout(&r, "aGVsbG8gd29ybGQg4pyT\nhello world ✓\ndeadbeef\n");

    let r = node(
        &mut c,
        &p,
        "const crypto = require('crypto');\n\
         console.log(crypto.createHash('sha256').update('abc').digest('hex'));\n\
         console.log(crypto.createHash('sha256').update('').digest('base64'));\n\
         console.log(crypto.createHmac('sha256', 'k').update('m').digest('hex'));\n\
         console.log(crypto.randomBytes(16).length, crypto.randomUUID().length)",
    );
    assert_ok_stdout(
        &r,
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n\
         47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=\n\
         b60090e3052297aeb5a080889ce2fc4bca957e756faeb4df7d31800ca1e771ec\n\
         16 36\n",
    );

    let r = node(
        &mut c,
        &p,
        "const u = new URL('https://user@example.com:8080/p/a?x=1&y=2#h');\n\
         u.searchParams.append('z', 'a b');\n\
         console.log(u.hostname, u.port, u.pathname, u.searchParams.get('y'), u.hash);\n\
         console.log(u.href)",
    );
    assert_ok_stdout(
        &r,
        "example.com 8080 /p/a 2 #h\nhttps://user@example.com:8080/p/a?x=1&y=2&z=a+b#h\n",
    );

    let r = node(
        &mut c,
        &p,
        "const sleep = (ms, v) => new Promise((resolve) => setTimeout(() => resolve(v), ms));\n\
         async function main() {\n\
           const t0 = Date.now();\n\
           const a = await sleep(100, 'a');\n\
           const rest = await Promise.all([sleep(30, 'b'), Promise.resolve('c'), sleep(10, 'd')]);\n\
           const first = await Promise.race([sleep(50, 'slow'), sleep(5, 'fast')]);\n\
           setImmediate(() => console.log('immediate'));\n\
           await new Promise((r) => process.nextTick(r));\n\
           console.log(a, rest.join(','), first, Date.now() - t0 >= 120);\n\
         }\n\
         main().then(() => setImmediate(() => setTimeout(() => console.log('timer done'), 20)));",
    );
    assert_ok_stdout(&r, "a b,c,d fast true\nimmediate\ntimer done\n");
}

#[test]
fn nodejs_escapes_are_stopped() {
    let Some(mut c) = redis() else { return };
    let p = prefix("node-deny");
    let _w = Worker::start(&p, &["--concurrency", "2"]);

    // libuv makes the child's stdio pipes with socketpair before it forks.
    let r = node(
        &mut c,
        &p,
        "console.log('UNREACHED', require(\"child_process\").execSync(\"id\").toString())",
    );
    assert_violation(&r, "socketpair", 53);
    assert_eq!(r["stdout"], "");
    let r = node(
        &mut c,
        &p,
        "const child = require('child_process').spawn('id');\n\
         child.stdout.on('data', (d) => console.log('UNREACHED', String(d)));\n\
         child.on('error', (e) => console.log('spawn error', e.code));",
    );
    assert_violation(&r, "socketpair", 53);
    assert_eq!(r["stdout"], "");
    // Without pipes it gets as far as the fork itself.
    let r = node(
        &mut c,
        &p,
        "const child = require('child_process').spawn('/usr/bin/id', [], {stdio: 'inherit'});\n\
         child.on('error', (e) => console.log('spawn error', e.code));",
    );
    assert_violation(&r, "clone", 56);
    assert_eq!(r["stdout"], "");
    assert_still_serves(&mut c, &p);

    // Redis is right there on the host's loopback; the job has no network.
    let r = node(
        &mut c,
        &p,
        "const s = require('net').connect(6379, '127.0.0.1');\n\
         s.on('connect', () => console.log('UNREACHED'));\n\
         s.on('error', (e) => console.log('error', e.code));",
    );
    assert_violation(&r, "socket", 41);
    assert_eq!(
        r["error"],
        "blocked system call: socket(AF_INET, SOCK_STREAM, 0)"
    );
    assert_eq!(r["stdout"], "");

    let r = node(&mut c, &p, "require('fs').readFileSync('/etc/shadow')");
    assert_status(&r, "error");
    assert_eq!(r["exit_code"], 1);
    assert!(
        s(&r["stderr"]).contains("ENOENT: no such file or directory, open '/etc/shadow'"),
        "{}",
        r["stderr"]
    );

    let r = node(
        &mut c,
        &p,
        "console.log(JSON.stringify({ids: [process.getuid(), process.geteuid(), process.getgid(), \
         process.getuid() !== 0], env: process.env}))",
    );
    assert_status(&r, "ok");
    let out: Value = serde_json::from_str(s(&r["stdout"])).unwrap();
    let ids = out["ids"].as_array().unwrap();
    let uid = ids[0].as_u64().unwrap();
    assert_ne!(uid, 0);
    assert_eq!(ids[1], ids[0], "euid == uid");
    assert_ne!(ids[2], 0);
    assert_eq!(ids[3], true);

    // The environment of that same job: its own uid in USER and LOGNAME.
    let env = out["env"].as_object().unwrap();
    let mut keys: Vec<&str> = env.keys().map(|k| k.as_str()).collect();
    keys.sort_unstable();
    let mut wanted = NODE_ENV_KEYS.to_vec();
    wanted.sort_unstable();
    assert_eq!(keys, wanted, "{env:?}");
    assert_eq!(env["LANG"], "C.UTF-8");
    assert_eq!(env["HOME"], "/tmp");
    assert_eq!(env["TMPDIR"], "/tmp");
    assert_eq!(env["PATH"], "/usr/local/bin:/usr/bin:/bin");
    assert_eq!(env["USER"], format!("sandbox{uid}"));
    assert_eq!(env["LOGNAME"], format!("sandbox{uid}"));
    assert_eq!(env["UV_USE_IO_URING"], "0");
    assert_eq!(env["UV_THREADPOOL_SIZE"], "2");
    for (k, v) in std::env::vars() {
        if NODE_ENV_KEYS.contains(&k.as_str()) {
            continue;
        }
        assert!(!env.contains_key(&k), "worker variable {k} leaked");
        if v.len() >= 8 {
            assert!(
                !env.values().any(|e| e == v.as_str()),
                "value of worker variable {k} leaked"
            );
        }
    }
    assert_still_serves(&mut c, &p);
}

#[test]
fn nodejs_timeout_and_output_flood() {
    let Some(mut c) = redis() else { return };
    let p = prefix("node-limits");
    let _w = Worker::start(&p, &["--concurrency", "2"]);

    let started = Instant::now();
    let r = node_job(&mut c, &p, "while (true) {}", json!({"timeout_ms": 1000}));
    let took = started.elapsed();
    assert_status(&r, "timeout");
    assert_eq!(r["signal"], "SIGKILL");
    assert_eq!(
        r["error"],
        format!("timed out after {} ms", scaled_ms(1000))
    );
    assert!(
        took < scaled(Duration::from_secs(2)),
        "result after {took:?}"
    );
    assert_still_serves(&mut c, &p);

    let r = node(
        &mut c,
        &p,
        "const chunk = 'x'.repeat(1024 * 1024);\nfor (let i = 0; i < 20; i++) process.stdout.write(chunk);",
    );
    assert_status(&r, "output_limit");
    assert_eq!(r["stdout_truncated"], true);
    assert_eq!(r["stderr_truncated"], false);
    assert_eq!(r["signal"], "SIGKILL");
    let out = s(&r["stdout"]);
    assert_eq!(out.len(), OUTPUT_LIMIT);
    assert!(out.bytes().all(|b| b == b'x'));
    assert_eq!(
        r["error"],
        format!(
            "output exceeded the limit of {OUTPUT_LIMIT} bytes per stream; the job was stopped"
        )
    );
    // The same flood on stderr.
    let r = node(
        &mut c,
        &p,
        "const chunk = 'e'.repeat(1024 * 1024);\nfor (let i = 0; i < 20; i++) process.stderr.write(chunk);",
    );
    assert_status(&r, "output_limit");
    assert_eq!(r["stderr_truncated"], true);
    assert_eq!(s(&r["stderr"]).len(), OUTPUT_LIMIT);
    assert_still_serves(&mut c, &p);
}

/// A job that arms `attack` and then must stop at the spawn: nothing of `id`
/// ever reaches the output.
struct Attack {
    name: &'static str,
    preload: &'static str,
    code: &'static str,
    /// `None`: a `socketpair` violation (child_process reached, stopped);
    /// `Some(stdout)`: the job ends `ok` with exactly this output (the
    /// override was never invoked by anyone).
    ok_stdout: Option<&'static str>,
    /// Output printed before the override fired (violation cases).
    stdout: &'static str,
}

const PWN: &str = "const __pwn = function () {\n\
  const out = require('child_process').execSync('id').toString();\n\
  console.log('PWNED', out);\n\
  return out;\n\
};\n";

fn run_attacks(c: &mut redis::Connection, p: &str, attacks: &[Attack]) {
    for a in attacks {
        let preload = if a.preload.is_empty() {
            String::new()
        } else {
            format!("{PWN}{}", a.preload)
        };
        let code = format!("{PWN}{}", a.code);
        let r = node_job(c, p, &code, json!({"preload": preload, "timeout_ms": 5000}));
        let out = s(&r["stdout"]);
        assert!(
            !out.contains("uid=") && !out.contains("PWNED"),
            "{}: id ran: {r}",
            a.name
        );
        assert!(!s(&r["stderr"]).contains("uid="), "{}: {r}", a.name);
        match a.ok_stdout {
            None => {
                assert_eq!(r["status"], "violation", "{}: {r}", a.name);
                assert_violation(&r, "socketpair", 53);
                assert_eq!(r["stdout"], a.stdout, "{}: {r}", a.name);
            }
            Some(expected) => {
                assert_eq!(r["status"], "ok", "{}: {r}", a.name);
                assert_eq!(r["stdout"], expected, "{}: {r}", a.name);
            }
        }
        // And the worker serves the next job normally.
        let r = node(
            c,
            p,
            "console.log(parseInt('42'), JSON.parse('[1]').map((x) => x + 1), Buffer.from('ok').toString())",
        );
        assert_ok_stdout(&r, "42 [ 2 ] ok\n");
    }
}

#[test]
fn nodejs_global_overrides_cannot_spawn() {
    let Some(mut c) = redis() else { return };
    let p = prefix("node-override");
    let _w = Worker::start(&p, &["--concurrency", "2"]);
    let attacks = [
        Attack {
            name: "parseInt, then used",
            preload: "",
            code: "parseInt = function () { return __pwn(); };\nconsole.log(parseInt('42'));",
            ok_stdout: None,
            stdout: "",
        },
        Attack {
            name: "JSON.parse, then used",
            preload: "",
            code: "JSON.parse = function () { return __pwn(); };\nconsole.log(JSON.parse('{}'));",
            ok_stdout: None,
            stdout: "",
        },
        Attack {
            name: "Function.prototype.call (the runtime calls it at once)",
            preload: "",
            code: "Function.prototype.call = function () { return __pwn(); };\nconsole.log('defined');",
            ok_stdout: None,
            stdout: "",
        },
        Attack {
            name: "Array.prototype.map, then used",
            preload: "",
            code: "Array.prototype.map = function () { return __pwn(); };\nconsole.log([1, 2].map((x) => x));",
            ok_stdout: None,
            stdout: "",
        },
        Attack {
            name: "process.exit, then used",
            preload: "",
            code: "process.exit = function () { return __pwn(); };\nprocess.exit(0);",
            ok_stdout: None,
            stdout: "",
        },
        Attack {
            name: "require, then used",
            preload: "",
            code: "const realRequire = require;\n\
                   require = function (id) { realRequire('child_process').execSync('id'); return realRequire(id); };\n\
                   console.log(require('path').sep);",
            ok_stdout: None,
            stdout: "",
        },
        Attack {
            name: "Module.prototype.require, then used",
            preload: "",
            code: "const Module = require('module');\nconst orig = Module.prototype.require;\n\
                   Module.prototype.require = function (id) { orig.call(this, 'child_process').execSync('id'); return orig.call(this, id); };\n\
                   console.log('hooked');\nrequire('path');",
            ok_stdout: None,
            stdout: "hooked\n",
        },
        Attack {
            name: "Buffer.from, then used",
            preload: "",
            code: "Buffer.from = function () { return __pwn(); };\nconsole.log(Buffer.from('x'));",
            ok_stdout: None,
            stdout: "",
        },
        Attack {
            name: "an exit hook",
            preload: "",
            code: "process.on('exit', () => __pwn());\nconsole.log('done');",
            ok_stdout: None,
            stdout: "done\n",
        },
        // Overridden and left armed: nothing after the user's code (no
        // prescript step, no runtime shutdown) calls any of them.
        Attack {
            name: "everything overridden, never called by the job",
            preload: "",
            code: "parseInt = function () { return __pwn(); };\n\
                   JSON.parse = function () { return __pwn(); };\n\
                   JSON.stringify = function () { return __pwn(); };\n\
                   Array.prototype.map = function () { return __pwn(); };\n\
                   Function.prototype.apply = function () { return __pwn(); };\n\
                   Object.keys = function () { return __pwn(); };\n\
                   process.exit = function () { return __pwn(); };\n\
                   process.reallyExit = function () { return __pwn(); };\n\
                   Buffer.from = function () { return __pwn(); };\n\
                   globalThis.require = function () { return __pwn(); };\n\
                   process.stdout.write('armed\\n');",
            ok_stdout: Some("armed\n"),
            stdout: "",
        },
        // Through the preload: it runs first, in the same global scope.
        Attack {
            name: "preload overrides parseInt, code uses it",
            preload: "globalThis.parseInt = function () { return __pwn(); };",
            code: "console.log(parseInt('42'));",
            ok_stdout: None,
            stdout: "",
        },
        Attack {
            name: "preload overrides JSON.parse and Array.prototype.map, code uses them",
            preload: "JSON.parse = function () { return __pwn(); };\n\
                      Array.prototype.map = function () { return __pwn(); };",
            code: "console.log('code runs');\nconsole.log(JSON.parse('[1]'));",
            ok_stdout: None,
            stdout: "code runs\n",
        },
        Attack {
            name: "preload overrides Function.prototype.call (fires before the code)",
            preload: "Function.prototype.call = function () { return __pwn(); };",
            code: "console.log('UNREACHED code ran');",
            ok_stdout: None,
            stdout: "",
        },
        Attack {
            name: "preload hooks Module.prototype.require, code requires",
            preload: "const Module = require('module');\nconst orig = Module.prototype.require;\n\
                      Module.prototype.require = function (id) { console.log('hook', id); \
                      orig.call(this, 'child_process').execSync('id'); return orig.call(this, id); };",
            code: "console.log(require('path').basename('/a/b'));",
            ok_stdout: None,
            stdout: "hook path\n",
        },
        Attack {
            name: "preload overrides process.exit, code exits",
            preload: "process.exit = function () { return __pwn(); };",
            code: "console.log('exiting');\nprocess.exit(0);",
            ok_stdout: None,
            stdout: "exiting\n",
        },
        Attack {
            name: "preload overrides Buffer.from, code decodes base64",
            preload: "const realFrom = Buffer.from;\n\
                      Buffer.from = function (...a) { __pwn(); return realFrom.apply(Buffer, a); };",
            code: "console.log(Buffer.from('aGk=', 'base64').toString());",
            ok_stdout: None,
            stdout: "",
        },
        Attack {
            name: "preload leaves an exit hook",
            preload: "process.on('exit', () => __pwn());",
            code: "console.log('code ran');",
            ok_stdout: None,
            stdout: "code ran\n",
        },
        // The code's own `require` is not the preload's.
        Attack {
            name: "preload replaces require",
            preload: "require = function () { return __pwn(); };\nglobalThis.require = require;",
            code: "console.log(require === globalThis.require, require('path').basename('/a/b'));",
            ok_stdout: Some("false b\n"),
            stdout: "",
        },
    ];
    run_attacks(&mut c, &p, &attacks);

    // A harmless preload that overrides globals is in effect for the code.
    let r = node_job(
        &mut c,
        &p,
        "console.log(JSON.stringify({a: 1}), parseInt('7'), [1, 2].map((x) => x * 10))",
        json!({"preload": "const origStringify = JSON.stringify;\n\
                           JSON.stringify = (v) => 'wrapped:' + origStringify(v);\n\
                           parseInt = (s) => Number(s) + 1000;\n\
                           const origMap = Array.prototype.map;\n\
                           Array.prototype.map = function (f) { return origMap.call(this, f).reverse(); };"}),
    );
    assert_ok_stdout(&r, "wrapped:{\"a\":1} 1007 [ 20, 10 ]\n");
    // And nothing of it is left for the next job.
    let r = node(
        &mut c,
        &p,
        "console.log(JSON.stringify({a: 1}), parseInt('7'), [1, 2].map((x) => x * 10))",
    );
    assert_ok_stdout(&r, "{\"a\":1} 7 [ 10, 20 ]\n");
}

#[test]
fn nodejs_dify_template_is_stable() {
    let Some(mut c) = redis() else { return };
    let p = prefix("node-dify");
    let _w = Worker::start(&p, &["--concurrency", "2"]);
    let user_code = "function main({a, b}) { return {result: a + b} }";
    let inputs = STANDARD.encode(json!({"a": 1, "b": 2}).to_string());
    let code = format!(
        "// declare main function\n{user_code}\n\
         const inputs_obj = JSON.parse(Buffer.from('{inputs}', 'base64').toString('utf-8'))\n\
         const output_obj = main(inputs_obj)\n\
         const result = `<<RESULT>>${{JSON.stringify(output_obj)}}<<RESULT>>`\n\
         console.log(result)\n"
    );
    for i in 0..30 {
        let r = node(&mut c, &p, &code);
        assert_eq!(r["status"], "ok", "run {i}: {r}");
        assert_eq!(r["exit_code"], 0, "run {i}: {r}");
        assert_eq!(
            r["stdout"], "<<RESULT>>{\"result\":3}<<RESULT>>\n",
            "run {i}: {r}"
        );
        assert_eq!(r["stderr"], "", "run {i}: {r}");
    }

    // A richer payload: strings, unicode, nesting, through the same template.
    let user_code = "function main({name, items}) {\n\
                     return {greeting: `héllo ${name} ✓`, total: items.reduce((s, x) => s + x.n, 0), \
                     keys: items.map((x) => x.k).sort()} }";
    let inputs = STANDARD.encode(
        json!({"name": "世界", "items": [{"k": "b", "n": 2}, {"k": "a", "n": 40}]}).to_string(),
    );
    let code = format!(
        "// declare main function\n{user_code}\n\
         const inputs_obj = JSON.parse(Buffer.from('{inputs}', 'base64').toString('utf-8'))\n\
         const output_obj = main(inputs_obj)\n\
         const result = `<<RESULT>>${{JSON.stringify(output_obj)}}<<RESULT>>`\n\
         console.log(result)\n"
    );
    let r = node(&mut c, &p, &code);
    assert_ok_stdout(
        &r,
        "<<RESULT>>{\"greeting\":\"héllo 世界 ✓\",\"total\":42,\"keys\":[\"a\",\"b\"]}<<RESULT>>\n",
    );
}

#[test]
fn nodejs_memory_limits_end_cleanly() {
    let Some(mut c) = redis() else { return };
    let p = prefix("node-memory");
    let mut w = Worker::start(&p, &["--concurrency", "2"]);
    let limits = json!({"memory_mb": 128, "timeout_ms": 10_000});

    // A 2 GiB zero-filled Buffer is only reserved: its pages are not charged
    // until they are written, so allocating it alone succeeds ...
    let r = node_job(
        &mut c,
        &p,
        "const b = Buffer.alloc(2 * 1024 ** 3);\nconsole.log(b.length);",
        limits.clone(),
    );
    assert_ok_stdout(&r, "2147483648\n");
    // ... and using it is stopped by the memory limit.
    for code in [
        "const b = Buffer.alloc(2 * 1024 ** 3);\nb.fill(1);\nconsole.log('UNREACHED', b.length);",
        "const b = Buffer.allocUnsafe(2 * 1024 ** 3);\nb.fill(1);\nconsole.log('UNREACHED', b.length);",
    ] {
        let started = Instant::now();
        let r = node_job(&mut c, &p, code, limits.clone());
        assert!(started.elapsed() < scaled(Duration::from_secs(10)), "{r}");
        assert_status(&r, "memory_limit");
        assert_eq!(r["error"], "exceeded the memory limit of 128 MiB");
        assert_eq!(r["stdout"], "");
        assert!(w.alive());
        assert_still_serves(&mut c, &p);
    }
    // Beyond Buffer's own bound: a clean RangeError (ERR_OUT_OF_RANGE from
    // Node 20, ERR_INVALID_ARG_VALUE in Node 18).
    let r = node_job(&mut c, &p, "Buffer.alloc(8 * 1024 ** 3)", limits.clone());
    assert_status(&r, "error");
    assert_eq!(r["exit_code"], 1);
    assert!(
        [
            "RangeError [ERR_OUT_OF_RANGE]",
            "RangeError [ERR_INVALID_ARG_VALUE]"
        ]
        .iter()
        .any(|e| s(&r["stderr"]).contains(e)),
        "{}",
        r["stderr"]
    );

    // A growing array: V8's heap bound (3/4 of memory_mb) or the cgroup.
    let started = Instant::now();
    let r = node_job(
        &mut c,
        &p,
        "const a = [];\nwhile (true) a.push(new Array(1e6).fill(1.5));",
        limits.clone(),
    );
    assert!(started.elapsed() < scaled(Duration::from_secs(10)), "{r}");
    assert_status(&r, "memory_limit");
    assert_eq!(r["error"], "exceeded the memory limit of 128 MiB");
    assert_eq!(r["stdout"], "");
    assert!(w.alive());
    assert_still_serves(&mut c, &p);
}

#[test]
fn nodejs_network_job_cannot_reach_host_redis() {
    let Some(mut c) = redis() else { return };
    let p = prefix("node-net");
    let _w = Worker::start(&p, &["--concurrency", "2", "--allow-network"]);
    let r = node_job(
        &mut c,
        &p,
        "const s = require('net').connect(6379, '127.0.0.1');\n\
         s.on('connect', () => {\n\
           s.write('PING\\r\\n');\n\
           s.on('data', (d) => { console.log('REACHED', String(d).trim()); s.destroy(); });\n\
         });\n\
         s.on('error', (e) => console.log('error', e.code, e.syscall, e.address + ':' + e.port));",
        json!({"enable_network": true}),
    );
    assert_ok_stdout(&r, "error ECONNREFUSED connect 127.0.0.1:6379\n");
    assert!(!s(&r["stdout"]).contains("PONG"));
    // Listing interfaces takes a netlink socket, which jobs do not get: the
    // call fails with EAFNOSUPPORT (97) instead of ending the job.
    let r = node_job(
        &mut c,
        &p,
        "try { require('os').networkInterfaces() } catch (e) { console.log(e.info.syscall, e.info.errno) }",
        json!({"enable_network": true}),
    );
    assert_ok_stdout(&r, "uv_interface_addresses 97\n");
    // Network or not, still no processes.
    let r = node_job(
        &mut c,
        &p,
        "console.log('UNREACHED', require('child_process').execSync('id').toString())",
        json!({"enable_network": true}),
    );
    assert_violation(&r, "socketpair", 53);
    assert_still_serves(&mut c, &p);
}

/// Node's clients, each printing one line: names through `dns.lookup` with
/// `ADDRCONFIG`, as `net` and `http` look names up (glibc's netlink probe
/// for it is refused quietly), TCP through the relay by `net` and `http`
/// (by name), `fetch` and `https` (which ignore the proxy variables and find
/// nothing listening; by address, so that no happy-eyeballs timing decides
/// which error comes back), UDP by `dgram`.
const NODE_CLIENTS: &str = r#"const dns = require('dns'), net = require('net'), http = require('http'), https = require('https'), dgram = require('dgram');
const step = (f) => new Promise(f);
(async () => {
  console.log('dns', await step((ok) => dns.lookup('localhost', {hints: dns.ADDRCONFIG}, (e, a) => ok(e ? e.code : a))));
  if (process.env.http_proxy === undefined) return;
  console.log('net', await step((ok) => {
    const s = net.connect(3128, 'localhost', () => s.write('GET http://10.0.0.1/ HTTP/1.0\r\n\r\n'));
    let head = '';
    s.on('data', (d) => { head += d; if (head.includes('\r\n')) { ok(head.split(' ')[1]); s.destroy(); } });
    s.on('error', (e) => ok(e.code));
  }));
  console.log('http', await step((ok) => http.get({host: 'localhost', port: 3128, path: 'http://10.0.0.1/'}, (r) => { ok(r.statusCode); r.resume(); }).on('error', (e) => ok(e.code))));
  console.log('fetch', await fetch('http://127.0.0.1:3129/').then(() => 'UNREACHED', (e) => e.cause.code));
  console.log('https', await step((ok) => https.get('https://127.0.0.1:3129/', () => ok('UNREACHED')).on('error', (e) => ok(e.code))));
  console.log('udp', await step((ok) => {
    const s = dgram.createSocket('udp4');
    s.on('message', (m) => { s.close(); ok(String(m)); });
    s.bind(0, '127.0.0.1', () => s.send('datagram', s.address().port, '127.0.0.1'));
  }));
  console.log('udp6', await step((ok) => { const s = dgram.createSocket('udp6'); s.bind(0, () => { s.close(); ok('bound'); }); }));
})();
"#;

#[test]
fn nodejs_network_clients_work_under_the_socket_rules() {
    let Some(mut c) = redis() else { return };
    let p = prefix("node-net-clients");
    let _w = Worker::start(&p, &["--concurrency", "1", "--allow-network"]);
    let r = node_job(
        &mut c,
        &p,
        NODE_CLIENTS,
        json!({"enable_network": true, "timeout_ms": 15_000}),
    );
    assert_ok_stdout(
        &r,
        "dns 127.0.0.1\nnet 403\nhttp 403\nfetch ECONNREFUSED\nhttps ECONNREFUSED\nudp datagram\nudp6 bound\n",
    );
    // Without network, names from the hosts file still resolve: neither the
    // nscd probe (AF_UNIX) nor the interface probe (netlink) ends the job.
    let r = node_job(&mut c, &p, NODE_CLIENTS, json!({}));
    assert_ok_stdout(&r, "dns 127.0.0.1\n");
    assert_still_serves(&mut c, &p);
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

#[test]
fn nodejs_latency_vs_bare() {
    let Some(mut c) = redis() else { return };
    let p = prefix("node-latency");
    let _w = Worker::start(&p, &["--concurrency", "2"]);
    const RUNS: usize = 30;

    // One warm-up each, not counted.
    assert_ok_stdout(&node(&mut c, &p, "console.log(1)"), "1\n");
    let bare = || {
        let out = std::process::Command::new("/usr/bin/node")
            .args(["-e", "console.log(1)"])
            .env_clear()
            .output()
            .expect("run /usr/bin/node");
        assert_eq!(out.stdout, b"1\n");
    };
    bare();

    let queued: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            let r = node(&mut c, &p, "console.log(1)");
            let d = t.elapsed();
            assert_ok_stdout(&r, "1\n");
            d
        })
        .collect();
    let direct: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            bare();
            t.elapsed()
        })
        .collect();
    let (q, b) = (median(queued), median(direct));
    println!(
        "node latency over {RUNS} runs: through the queue median {:.1} ms, bare /usr/bin/node median {:.1} ms, ratio {:.2}",
        q.as_secs_f64() * 1000.0,
        b.as_secs_f64() * 1000.0,
        q.as_secs_f64() / b.as_secs_f64()
    );
}

// sandq prescript for Node.js, rendered once per run.
//
// By the time this file runs, the worker has already applied every layer of
// the lock-down (namespaces, read-only root, rlimits, cgroup, uid/gid drop,
// no_new_privs, seccomp) before exec: user code can redefine any global it
// likes, there is no unfiltered moment left for it to exploit. This file only
// checks that the lock-down is in place, decodes the job and runs it.
//
// Placeholders (each filled once, in this order): uid, gid, enable_network,
// preload, code, each written in double braces below.
// The code and preload travel XOR-ed with a fresh 512-bit key and
// base64-encoded; the key arrives separately, on fd 3, and never touches disk.
'use strict';
const sandq = (() => {
  const fs = require('fs');
  const vm = require('vm');
  const userRequire = require('module').createRequire('/tmp/code.js');
  // Empty when this interpreter was started ahead of its job.
  const blobs = { preload: '{{preload}}', code: '{{code}}' };
  // Streams are created on first use, which costs milliseconds: do it before
  // waiting for the job, not after.
  void process.stdout;
  void process.stderr;
  if (blobs.code === '') {
    // console.log compiles its formatting code on first use (about half a
    // millisecond): a pre-started interpreter runs it once, into nothing.
    const stdout = process.stdout;
    const own = Object.prototype.hasOwnProperty.call(stdout, 'write');
    const write = stdout.write;
    stdout.write = () => true;
    try {
      console.log('%s %d %j', '', 0, {}, [0], { a: '' });
    } finally {
      if (own) stdout.write = write;
      else delete stdout.write;
    }
  }
  // fd 3: the key, then (when this interpreter was started ahead of its job)
  // the preload and the code, one base64 line each. Reading it to EOF is also
  // how a pre-started interpreter waits for its one job.
  const parts = fs.readFileSync(3, 'latin1').split('\n');
  fs.closeSync(3);
  try {
    fs.unlinkSync(__filename);
  } catch (_) {
    // already gone
  }
  if (process.getuid() !== {{uid}} || process.getgid() !== {{gid}} || process.getuid() === 0) {
    process.stderr.write('sandq: the sandbox identity check failed; refusing to run\n');
    process.exit(125);
  }
  const key = Buffer.from(parts[0], 'base64');
  const reveal = (blob) => {
    const data = Buffer.from(blob, 'base64');
    for (let i = 0; i < data.length; i++) data[i] ^= key[i % key.length];
    return data.toString('utf8');
  };
  const warm = parts.length >= 3;
  return {
    network: {{enable_network}},
    preload: reveal(warm ? parts[1] : blobs.preload),
    code: reveal(warm ? parts[2] : blobs.code),
    require: userRequire,
    vm,
  };
})();

// Each part runs as the body of a CommonJS module, so `require`, `module` and
// `exports` behave as in a file; compileFunction keeps the user's own line and
// column numbers, and stack traces name `<preload>` and `<code>`.
for (const [name, text] of [['<preload>', sandq.preload], ['<code>', sandq.code]]) {
  if (!text) continue;
  const fn = sandq.vm.compileFunction(text, ['exports', 'require', 'module', '__filename', '__dirname'], {
    filename: name,
  });
  const mod = { exports: {} };
  fn.call(mod.exports, mod.exports, sandq.require, mod, '/tmp/code.js', '/tmp');
}

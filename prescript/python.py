# sandq prescript for Python 3, rendered once per run.
#
# By the time this file runs, the worker has already applied every layer of the
# lock-down (namespaces, read-only root, rlimits, cgroup, uid/gid drop,
# no_new_privs, seccomp) before exec, so nothing here is a security boundary:
# it checks that the lock-down is in place, decodes the job and runs it.
#
# Placeholders (each filled once, in this order): uid, gid, enable_network,
# preload, code, each written in double braces below.
# The code and preload travel XOR-ed with a fresh 512-bit key and base64-encoded;
# the key arrives separately, on fd 3, and never touches the disk.
import os
import sys


def _sandq_load():
    key = b""
    while True:
        chunk = os.read(3, 4096)
        if not chunk:
            break
        key += chunk
    os.close(3)
    try:
        os.unlink(__file__)
    except OSError:
        pass
    if os.getuid() != {{uid}} or os.getgid() != {{gid}} or os.getuid() == 0:
        sys.stderr.write("sandq: the sandbox identity check failed; refusing to run\n")
        os._exit(125)
    from binascii import a2b_base64

    key = a2b_base64(key)

    def reveal(blob):
        data = a2b_base64(blob)
        n = len(data)
        if n == 0:
            return ""
        stream = (key * (n // len(key) + 1))[:n]
        plain = int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")
        return plain.to_bytes(n, "little").decode("utf-8")

    return reveal("{{preload}}"), reveal("{{code}}")


def _sandq_run(preload, code, network):
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    sys.argv = ["<code>"]
    try:
        if preload:
            exec(compile(preload, "<preload>", "exec"), namespace)
        exec(compile(code, "<code>", "exec"), namespace)
    except SystemExit:
        raise
    except BaseException as exc:
        # Print the traceback without this file's frames, with the user's
        # source lines, then exit 1 as an uncaught exception would.
        import linecache
        import traceback

        for name, text in (("<preload>", preload), ("<code>", code)):
            linecache.cache[name] = (len(text), None, text.splitlines(True), name)
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
            tb = tb.tb_next
        traceback.print_exception(type(exc), exc, tb)
        sys.stderr.flush()
        sys.exit(1)


_sandq_run(*_sandq_load(), {{enable_network}})

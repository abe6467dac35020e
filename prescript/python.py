# sandq prescript for Python 3, rendered once per run.
#
# By the time this file runs, the worker has already applied every layer of the
# lock-down (namespaces, read-only root, rlimits, cgroup, uid/gid drop,
# no_new_privs, seccomp) before exec, so nothing here is a security boundary:
# it checks that the lock-down is in place, decodes the job and runs it.
#
# Placeholders (each filled once, in this order): uid, gid, enable_network,
# python_path, preload, code, each written in double braces below.
# The code and preload travel XOR-ed with a fresh 512-bit key and base64-encoded;
# the key arrives separately, on fd 3, and never touches the disk.
import os
import sys
from binascii import a2b_base64


def _sandq_site():
    # The interpreter starts with -S, without `site`: it costs milliseconds
    # per run (directory scans, .pth start-up hooks, a sitecustomize lookup)
    # and would run the host's start-up hooks inside the sandbox. What a job
    # can see of it is recreated here: the search path `site` builds (asked
    # of this interpreter once, when the worker starts) and the builtins it
    # adds. Host .pth import lines and sitecustomize do not run.
    import builtins
    import _sitebuiltins

    sys.path[:] = {{python_path}}
    builtins.exit = _sitebuiltins.Quitter("exit", "Ctrl-D (i.e. EOF)")
    builtins.quit = _sitebuiltins.Quitter("quit", "Ctrl-D (i.e. EOF)")
    builtins.help = _sitebuiltins._Helper()
    builtins.copyright = _sitebuiltins._Printer("copyright", sys.copyright)
    builtins.credits = _sitebuiltins._Printer(
        "credits",
        "    Thanks to CWI, CNRI, BeOpen.com, Zope Corporation and a cast of thousands\n"
        "    for supporting Python development.  See www.python.org for more information.",
    )
    here = os.path.dirname(os.__file__)
    builtins.license = _sitebuiltins._Printer(
        "license",
        "See https://www.python.org/psf/license/",
        ["LICENSE.txt", "LICENSE"],
        [os.path.join(here, os.pardir), here, os.curdir],
    )



def _sandq_load():
    # fd 3: the key, then (when this interpreter was started ahead of its job)
    # the preload and the code, one base64 line each. Reading it to EOF is
    # also how a pre-started interpreter waits for its one job.
    data = b""
    while True:
        chunk = os.read(3, 1 << 20)
        if not chunk:
            break
        data += chunk
    os.close(3)
    try:
        os.unlink(__file__)
    except OSError:
        pass
    if os.getuid() != {{uid}} or os.getgid() != {{gid}} or os.getuid() == 0:
        sys.stderr.write("sandq: the sandbox identity check failed; refusing to run\n")
        os._exit(125)

    parts = data.split(b"\n")
    key = a2b_base64(parts[0])

    def reveal(blob):
        data = a2b_base64(blob)
        n = len(data)
        if n == 0:
            return ""
        stream = (key * (n // len(key) + 1))[:n]
        plain = int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")
        return plain.to_bytes(n, "little").decode("utf-8")

    if len(parts) >= 3:
        return reveal(parts[1]), reveal(parts[2])
    return reveal("{{preload}}"), reveal("{{code}}")


def _sandq_run(preload, code, network):
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    sys.argv = ["<code>"]
    status = 0
    try:
        if preload:
            exec(compile(preload, "<preload>", "exec"), namespace)
        exec(compile(code, "<code>", "exec"), namespace)
    except SystemExit as exc:
        # sys.exit semantics: None is 0, an int is the status, anything else
        # is printed and means 1.
        if exc.code is None:
            status = 0
        elif isinstance(exc.code, int):
            status = exc.code
        else:
            sys.stderr.write(f"{exc.code}\n")
            status = 1
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
        status = 1
    _sandq_exit(status)


def _sandq_exit(status):
    # What a normal interpreter exit does that a job can observe: wait for
    # non-daemon threads, run atexit callbacks, flush stdout and stderr. Then
    # leave without the interpreter's teardown (module and GC finalization):
    # nothing can observe it, the process and its scratch dir go anyway, and
    # it costs milliseconds per job.
    try:
        threading = sys.modules.get("threading")
        if threading is not None:
            threading._shutdown()
        import atexit

        atexit._run_exitfuncs()
    except BaseException as exc:
        sys.stderr.write(f"sandq: error during exit: {exc!r}\n")
        status = status or 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(status & 0xFF if isinstance(status, int) else 1)


_sandq_site()
_sandq_run(*_sandq_load(), {{enable_network}})

"""The CLI in a process of its own, forked from a server that has imported it already.

A fresh `python -m moe_offload` spends seconds importing torch and transformers before the command
starts, and the suite starts ~40 of them. A fork server imports those once; every call then forks a
process of its own (own pid, file descriptors, environment, working directory and exit status) that
runs the same `cli.main()` a user's process runs and ends the way Python ends one (exit handlers,
then the status; an uncaught exception prints its traceback and exits 1). The server imports and
never computes, so no thread pool is forked. Tests about how a process starts (the parser's imports,
ctrl-c, terminals) start a real one.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import traceback

_PRELOAD = ["torch", "transformers", "moe_offload", "moe_offload.cli", "moe_offload.model", "moe_offload.conversion"]
_context = None


def _server():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    return _context


def _main(argv: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY)
        os.dup2(f, fd)
        os.close(f)
    sys.stdin = open(0, closefd=False)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
    sys.argv = ["moe-offload", *argv]
    code = 1
    try:
        from moe_offload.cli import main

        code = main(argv)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        traceback.print_exc()
    threading._shutdown()  # what the interpreter does at exit: wait for the threads, then exit handlers
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Like subprocess.run([python, -m, moe_offload, *args], capture_output=True, text=True)."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        for path in (out, err):
            open(path, "w").close()
        process = _server().Process(target=_main, args=(list(args), env, os.getcwd(), out, err))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(["moe-offload", *args], timeout)
        with open(out) as o, open(err) as e:
            return subprocess.CompletedProcess(["moe-offload", *args], process.exitcode, o.read(), e.read())

"""llama.cpp in the bench: its own `llama-bench` on a GGUF of the same model, as one more column.

llama-bench runs with the thread count of our modes, a prompt of LONG_PREFILL tokens (its pp test,
next to our long prefill) and --max-new-tokens generated tokens (its tg test, next to our decode),
each as its own invocation (`-p N -n 0`, then `-p 0 -n N`), so that a crash of one test still leaves
the other's number. It prints JSON (`-o json`): a list of tests, each with n_prompt, n_gen,
avg_ts (tokens/s over the repetitions), stddev_ts, samples_ts and the build and model it ran.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .mode import LONG_PREFILL

LLAMACPP = "llamacpp"
REPETITIONS = 3
RATIO_KEYS = {"decode": "decode_tokens_per_s", "prefill": "long_prefill_tokens_per_s"}


def find_llama_bench(path: str | None = None) -> str:
    """The llama-bench binary: the given path, else the one on PATH; a clear error if neither exists."""
    from ..errors import MoeOffloadError

    if path:
        p = Path(path)
        if p.is_dir():
            p = p / "llama-bench"
        if not p.is_file() or not os.access(p, os.X_OK):
            raise MoeOffloadError(f"--llama-bench {path}: no executable llama-bench there")
        return str(p.resolve())
    found = shutil.which("llama-bench")
    if not found:
        raise MoeOffloadError("--gguf needs llama.cpp's llama-bench, and none is on PATH: build llama.cpp "
                              "(e.g. cmake --build build --target llama-bench) and pass --llama-bench "
                              "PATH/TO/llama-bench, or put it on PATH")
    return found


def llama_bench_commands(binary: str, gguf: str, threads: int, n_prompt: int = LONG_PREFILL, n_gen: int = 128,
                         repetitions: int = REPETITIONS, extra: list[str] | None = None) -> dict[str, list[str]]:
    """The prefill (pp) and decode (tg) invocations; extra arguments go last, so they win."""
    base = [binary, "-m", str(gguf), "-t", str(threads), "-r", str(repetitions), "-o", "json"]
    extra = list(extra or [])
    return {"prefill": [*base, "-p", str(n_prompt), "-n", "0", *extra],
            "decode": [*base, "-p", "0", "-n", str(n_gen), *extra]}


def parse_llama_bench_json(text: str) -> list[dict]:
    """llama-bench's `-o json` output: a JSON list of tests (a truncated one, from a crash, loses the last)."""
    from ..errors import MoeOffloadError

    start = text.find("[")
    if start < 0:
        raise MoeOffloadError("llama-bench printed no JSON list")
    try:
        tests = json.loads(text[start:])
    except ValueError:
        body = text[start:].rstrip().rstrip(",")  # a run cut short: keep the complete tests
        end = body.rfind("}")
        try:
            tests = json.loads(body[:end + 1] + "]") if end >= 0 else []
        except ValueError as e:
            raise MoeOffloadError(f"llama-bench's output is not JSON: {e}") from e
    if not isinstance(tests, list) or not all(isinstance(t, dict) and "avg_ts" in t for t in tests):
        raise MoeOffloadError("llama-bench's JSON is not a list of tests with avg_ts")
    return tests


def _test(tests: list[dict], phase: str) -> dict | None:
    for t in tests:
        if phase == "prefill" and t.get("n_prompt", 0) > 0 and t.get("n_gen", 0) == 0:
            return t
        if phase == "decode" and t.get("n_gen", 0) > 0 and t.get("n_prompt", 0) == 0:
            return t
    return None


def run_llamacpp(spec: dict, progress=None, wrap=None, before_each=None, oom_kills=None) -> dict:
    """Run llama-bench's prefill and decode tests on the GGUF; returns the llamacpp column.

    spec: binary, gguf, threads, n_prompt, n_gen, repetitions, extra_args. wrap(cmd) -> cmd starts
    the command somewhere else (a memory cgroup); before_each() runs before each invocation (drop the
    GGUF's pages); oom_kills() counts the out-of-memory kills there. A test that fails leaves its
    number out and says why in the column (llama.cpp runs last: its failure must not lose the
    others' numbers); if both fail, the column is a failure."""
    from ..errors import MoeOffloadError
    from .cgroup import KILLED_OOM

    commands = llama_bench_commands(spec["binary"], spec["gguf"], spec["threads"], spec["n_prompt"], spec["n_gen"],
                                    spec.get("repetitions", REPETITIONS), spec.get("extra_args"))
    tests, failed, peaks, seconds = {}, {}, [], {}
    for phase, cmd in commands.items():
        if before_each:
            before_each()
        kills = oom_kills() if oom_kills else 0
        started = time.perf_counter()
        out, err, status, peak = _run(wrap(cmd) if wrap else cmd)
        seconds[phase] = round(time.perf_counter() - started, 2)
        peaks.append(peak)
        test, why = None, None
        if status != 0:
            killed = oom_kills is not None and oom_kills() > kills
            why = KILLED_OOM if killed else f"failed (exit status {status})"
        else:
            try:
                test = _test(parse_llama_bench_json(out), phase)
                why = None if test else f"failed (no {phase} test in its output)"
            except MoeOffloadError as e:
                why = f"failed ({e})"
        if why:
            tail = "\n".join(err.strip().splitlines()[-15:])
            failed[phase] = {"status": why, "returncode": status, "stderr_tail": tail}
            print(f"llama-bench ({phase}) {why}: {shlex.join(cmd)}\n{tail}", file=sys.stderr)
        else:
            tests[phase] = test
        if progress:
            progress({"mode": LLAMACPP, "what": phase})
    return llamacpp_result(tests, commands, max(peaks), seconds, failed)


def llamacpp_result(tests: dict[str, dict], commands: dict[str, list[str]], peak_rss: int | None = None,
                    seconds: dict | None = None, failed: dict | None = None) -> dict:
    """The column: tokens/s where our modes have them, None where llama-bench has no equivalent (or
    its test failed: then `cell_notes` says why, in that row's cell)."""
    pp, tg = tests.get("prefill"), tests.get("decode")
    failed = failed or {}
    r = {
        "decode_tokens_per_s": round(tg["avg_ts"], 3) if tg else None,
        "decode_tokens": tg["n_gen"] * len(tg.get("samples_ts") or [0]) if tg else 0,
        "prefill_tokens_per_s": None,  # llama-bench has no chat prompts' prefill, only its pp test
        "long_prefill_tokens_per_s": round(pp["avg_ts"], 3) if pp else None,
        "peak_rss_bytes": peak_rss,
        "tokens": [],
        "llama_bench": {"commands": {k: shlex.join(v) for k, v in commands.items()},
                        "seconds": seconds or {}, "tests": tests, "failed": failed},
    }
    if failed and not tests:  # nothing measured: the column is the failure (the decode's, if they differ)
        r["failed"] = (failed.get("decode") or next(iter(failed.values())))["status"]
    elif failed:
        r["cell_notes"] = {RATIO_KEYS[phase]: f["status"] for phase, f in failed.items()}
    return r


def _run(cmd: list[str]) -> tuple[str, str, int, int]:
    """Run a command; (stdout, stderr, exit status (-signal if killed), its peak RSS in bytes)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return out.read(), err.read(), proc.returncode, usage.ru_maxrss * 1024


def add_ratios(results: dict) -> None:
    """Each mode's decode and prefill (LONG_PREFILL tokens) over llama.cpp's: `llamacpp_<phase>_ratio`."""
    ref = results.get(LLAMACPP)
    if not ref:
        return
    for mode, r in results.items():
        if mode == LLAMACPP:
            continue
        for phase, key in RATIO_KEYS.items():
            mine, theirs = r.get(key), ref.get(key)
            r[f"llamacpp_{phase}_ratio"] = round(mine / theirs, 3) if mine and theirs else None


def gguf_info(path: str) -> dict:
    p = Path(path)
    return {"path": str(p.resolve()), "bytes": p.stat().st_size if p.is_file() else None}

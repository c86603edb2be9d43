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


def run_llamacpp(spec: dict, progress=None, wrap=None, before_each=None) -> dict:
    """Run llama-bench's prefill and decode tests on the GGUF; returns the llamacpp column.

    spec: binary, gguf, threads, n_prompt, n_gen, repetitions, extra_args. wrap(cmd) -> cmd starts
    the command somewhere else (a memory cgroup); before_each() runs before each invocation (drop the
    GGUF's pages). A failed invocation raises LlamaBenchFailed, with its exit status."""
    commands = llama_bench_commands(spec["binary"], spec["gguf"], spec["threads"], spec["n_prompt"], spec["n_gen"],
                                    spec.get("repetitions", REPETITIONS), spec.get("extra_args"))
    tests, peaks, seconds = {}, [], {}
    for phase, cmd in commands.items():
        if before_each:
            before_each()
        started = time.perf_counter()
        out, err, status, peak = _run(wrap(cmd) if wrap else cmd)
        seconds[phase] = round(time.perf_counter() - started, 2)
        peaks.append(peak)
        if status != 0:
            raise LlamaBenchFailed(phase, cmd, status, err)
        test = _test(parse_llama_bench_json(out), phase)
        if test is None:
            raise LlamaBenchFailed(phase, cmd, status, f"no {phase} test in its output:\n{out[-2000:]}")
        tests[phase] = test
        if progress:
            progress({"mode": LLAMACPP, "what": phase})
    return llamacpp_result(tests, commands, max(peaks), seconds)


def llamacpp_result(tests: dict[str, dict], commands: dict[str, list[str]], peak_rss: int | None = None,
                    seconds: dict | None = None) -> dict:
    """The column: tokens/s where our modes have them, None where llama-bench has no equivalent."""
    pp, tg = tests.get("prefill"), tests.get("decode")
    return {
        "decode_tokens_per_s": round(tg["avg_ts"], 3) if tg else None,
        "decode_tokens": tg["n_gen"] * len(tg.get("samples_ts") or [0]) if tg else 0,
        "prefill_tokens_per_s": None,  # llama-bench has no chat prompts' prefill, only its pp test
        "long_prefill_tokens_per_s": round(pp["avg_ts"], 3) if pp else None,
        "peak_rss_bytes": peak_rss,
        "tokens": [],
        "llama_bench": {"commands": {k: shlex.join(v) for k, v in commands.items()},
                        "seconds": seconds or {}, "tests": tests},
    }


class LlamaBenchFailed(Exception):
    def __init__(self, phase: str, cmd: list[str], returncode: int, stderr: str):
        self.phase, self.cmd, self.returncode = phase, cmd, returncode
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        super().__init__(f"llama-bench ({phase}) failed with exit status {returncode}: {shlex.join(cmd)}\n{tail}")


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

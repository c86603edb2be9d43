"""A stand-in for llama.cpp's llama-bench: prints `-o json` output in llama-bench's own format (the
fields and layout of tools/llama-bench/llama-bench.cpp's json_printer in the llama.cpp that
llama-cpp-python 0.3.36 vendors), so that the bench's llamacpp column is tested without llama.cpp."""
import os
import stat
import sys
import textwrap
from pathlib import Path

SCRIPT = '''#!{python}
import json, sys
args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
def opt(name, default):
    return args[len(args) - 1 - args[::-1].index(name) + 1] if name in args else default
if {alloc_mb}:
    hog = bytearray({alloc_mb} * 2**20)
    for i in range(0, len(hog), 4096):
        hog[i] = 1
if {exit_code}:
    print("llama_model_load: error loading model", file=sys.stderr)
    sys.exit({exit_code})
n_prompt, n_gen, reps = int(opt("-p", "512")), int(opt("-n", "128")), int(opt("-r", "5"))
if {crash_prefill} and n_prompt:
    import os
    print("ggml_abort: GGML_ASSERT failed", file=sys.stderr)
    sys.stderr.flush()
    os.abort()
print("load_backend: loaded CPU backend", file=sys.stderr)
tests = [(n_prompt, 0, {pp}), (0, n_gen, {tg})]
sys.stdout.write("[\\n")
first = True
for p, g, ts in [t for t in tests if t[0] or t[1]]:
    if not first:
        sys.stdout.write(",\\n")
    first = False
    ns = int(1e9 * (p or g) / ts)
    fields = [
        ("build_commit", '"0c1e570"'), ("build_number", "1"), ("cpu_info", '"Fake CPU"'), ("gpu_info", '""'),
        ("backends", '"CPU"'), ("model_filename", json.dumps(opt("-m", ""))), ("model_type", '"llama 8x7B Q4_K - Medium"'),
        ("model_size", "1747304448"), ("model_n_params", "2970000000"), ("n_batch", "2048"), ("n_ubatch", "512"),
        ("n_threads", opt("-t", "2")), ("cpu_mask", '"0x0"'), ("cpu_strict", "false"), ("poll", "50"),
        ("type_k", '"f16"'), ("type_v", '"f16"'), ("n_gpu_layers", "99"), ("n_cpu_moe", "0"), ("split_mode", '"layer"'),
        ("main_gpu", "0"), ("no_kv_offload", "false"), ("flash_attn", "-1"), ("devices", '"auto"'),
        ("tensor_split", '"0.00"'), ("tensor_buft_overrides", '"none"'), ("load_mode", '"mmap"'), ("lazy_mode", '"auto"'),
        ("embeddings", "false"), ("no_op_offload", "0"), ("no_host", "false"), ("repack", "true"), ("fit_target", "0"),
        ("fit_min_ctx", "4096"), ("n_prompt", str(p)), ("n_gen", str(g)), ("n_depth", "0"),
        ("test_time", '"2026-11-30T20:00:00Z"'), ("avg_ns", str(ns)), ("stddev_ns", "1000"),
        ("avg_ts", "%f" % ts), ("stddev_ts", "0.100000"),
    ]
    sys.stdout.write("  {{\\n")
    for k, v in fields:
        sys.stdout.write('    "%s": %s,\\n' % (k, v))
    sys.stdout.write('    "samples_ns": [ %s ],\\n' % ", ".join([str(ns)] * reps))
    sys.stdout.write('    "samples_ts": [ %s ]\\n' % ", ".join(["%g" % ts] * reps))
    sys.stdout.write("  }}")
sys.stdout.write("\\n]\\n")
'''


def write_fake_llama_bench(folder, pp=150.5, tg=24.25, alloc_mb=0, exit_code=0, crash_prefill=False) -> tuple[Path, Path]:
    """A llama-bench in folder; returns (its path, the file each call's arguments are appended to)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path, log = folder / "llama-bench", folder / "llama-bench.calls"
    path.write_text(textwrap.dedent(SCRIPT).format(python=sys.executable, log=str(log), pp=pp, tg=tg,
                                                   alloc_mb=alloc_mb, exit_code=exit_code,
                                                   crash_prefill=crash_prefill))
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path, log


if __name__ == "__main__":
    print(write_fake_llama_bench(os.getcwd())[0])

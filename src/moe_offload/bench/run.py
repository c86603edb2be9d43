"""The bench run: every mode one after the other, then what their numbers say together.

Each mode runs in its own Python process (so peak RSS is that mode's), with the store's and the
source's pages dropped from the page cache before it, and reports to this process as JSON lines.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import MoeOffloadError
from .cgroup import KILLED_OOM, CgroupError, MemoryCgroup, check_available
from .compare import _compare_tokens, targets
from .forecast import attach as attach_forecast
from .forecast import forecaster
from .llamacpp import LLAMACPP, add_ratios, gguf_info, run_llamacpp
from .mode import HF_MODES, LONG_PREFILL, OURS, PROMPTS, run_mode
from .roofline import blob_bandwidth, disk_bandwidth, ram_bandwidth, roofline_around
from .system import drop_page_cache


def run_bench(store: Path, source: Path | None, modes: list[str], *, explicit_modes: bool = True,
              prompts: int = len(PROMPTS), max_new_tokens: int = 128, accelerate_tokens: int = 8,
              load_kwargs: dict | None = None, in_process: bool = False, shape: str | None = None,
              llamacpp: dict | None = None, cgroup_limit: int | None = None,
              forecast: bool = True) -> dict:
    """Run the modes one after the other; returns everything the table, the JSON and the plot show.

    llamacpp: {"binary": llama-bench, "gguf": FILE, "extra_args": [...]} for the llamacpp mode.
    cgroup_limit: bytes; every mode then runs in a memory cgroup of that size (page cache counted),
    and one killed for memory is reported as such while the others still run."""
    import torch
    from tqdm.auto import tqdm

    from .. import __version__
    from ..store import EXPERTS_FILE, Store

    st = Store.open(store)
    load_kwargs = dict(load_kwargs or {})
    source = Path(source) if source else _recorded_source(st)
    modes = _check_source(modes, source, explicit_modes)
    if LLAMACPP in modes and not llamacpp:
        raise MoeOffloadError("the llamacpp mode needs a GGUF of the model: pass --gguf FILE")
    cgroup = _check_cgroup(cgroup_limit, in_process)
    threads = torch.get_num_threads()
    llama_spec = None
    if LLAMACPP in modes:
        llama_spec = dict(binary=llamacpp["binary"], gguf=str(llamacpp["gguf"]), threads=threads,
                          n_prompt=LONG_PREFILL, n_gen=max_new_tokens, repetitions=llamacpp.get("repetitions", 3),
                          extra_args=list(llamacpp.get("extra_args") or []))
    cache_bytes = expert_cache_bytes(st, load_kwargs)
    memory_limit = st.manifest["dense_file_size"] + cache_bytes
    files = [st.path] + ([source] if source else []) + ([Path(llama_spec["gguf"])] if llama_spec else [])

    print("measuring RAM and disk read bandwidth ...", file=sys.stderr)
    sequential, blobs = disk_bandwidth(st.path / EXPERTS_FILE), blob_bandwidth(st)
    roofline = {"ram_bytes_per_s": ram_bandwidth(), "disk_bytes_per_s": max(sequential, blobs),
                "disk_sequential_bytes_per_s": sequential, "disk_blob_bytes_per_s": blobs}
    planner = None
    if forecast:
        print("timing a resident decode for moe-offload plan's predictions ...", file=sys.stderr)
        planner = forecaster(st, modes, load_kwargs, PROMPTS[:prompts], max_new_tokens)
    predicted = {}
    spec_base = dict(store=str(st.path), source=str(source) if source else None,
                     prompts=list(PROMPTS[:prompts]), max_new_tokens=max_new_tokens,
                     accelerate_tokens=min(accelerate_tokens, max_new_tokens), load_kwargs=load_kwargs,
                     memory_limit=memory_limit, drop=[str(f) for f in files])
    ram_samples = [roofline["ram_bytes_per_s"]]
    load_before = os.getloadavg()[0]  # other work on the machine skews every number: say how much there was
    steps = sum(2 if m == LLAMACPP else 2 + prompts for m in modes)  # per mode: load, each prompt, long prefill
    results: dict[str, dict] = {}
    with tqdm(total=steps, unit="step", desc="bench", dynamic_ncols=True) as bar, _closing(planner):
        for mode in modes:
            bar.set_description(mode)
            if planner is not None and mode in OURS:
                predicted[mode] = planner.predict(mode)
            drop_page_cache(*files)
            spec = dict(spec_base, mode=mode)
            progress = lambda event: "partial" in event or bar.update(1)  # noqa: E731  (a partial result is no step)
            cg = MemoryCgroup.create(cgroup_limit, mode) if cgroup_limit else None
            try:
                results[mode] = _run_one(mode, spec, llama_spec, progress, in_process, cg)
            finally:
                if cg is not None:
                    cg.remove()
            if in_process:
                gc.collect()
            # The RAM bandwidth of a shared machine moves from minute to minute: each mode's roofline
            # takes the mean of the measures just before and just after it (roofline_around).
            ram_samples.append(ram_bandwidth())
            results[mode]["ram_bytes_per_s_around"] = ram_samples[-2:]
            if mode in predicted:
                planner.sample_after(predicted[mode])
    if not results:
        raise MoeOffloadError("no mode to run")
    measured = {m: r for m, r in results.items() if m != LLAMACPP and not r.get("failed")}
    for r in measured.values():
        r.update(roofline_around(r, roofline))
    _compare_tokens(measured)
    add_ratios(results)
    for mode, f in predicted.items():
        if mode in measured:
            attach_forecast(measured[mode], f)
    ran = {m: r for m, r in results.items() if not r.get("failed") and not r.get("incomplete")}
    return {
        "moe_offload_version": __version__,
        "store": str(st.path), "source": str(source) if source else None, "shape": shape,
        "model": {"moe_layers": st.num_layers, "experts": st.num_experts, "top_k": st.top_k,
                  "expert_blob_bytes": st.blob_size, "quant": st.manifest["quant"],
                  "convert_seconds": st.manifest.get("convert_seconds")},
        "settings": {"prompts": prompts, "max_new_tokens": max_new_tokens,
                     "accelerate_tokens": spec_base["accelerate_tokens"], "load_kwargs": load_kwargs,
                     "expert_cache_bytes": cache_bytes, "memory_limit_bytes": memory_limit,
                     "isolation": "in-process" if in_process else "one process per mode",
                     "torch_threads": threads, "cpu_count": os.cpu_count(),
                     "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                     "memory_cgroup": cgroup,
                     "llamacpp": dict(llama_spec, gguf=gguf_info(llama_spec["gguf"])) if llama_spec else None},
        "roofline": roofline,
        "modes": results,
        "targets": targets(ran, st.manifest, memory_limited=bool(cgroup_limit)),
    }


@contextlib.contextmanager
def _closing(planner):
    """The planner's model stays loaded for the modes (it times their compute again before each)."""
    try:
        yield
    finally:
        if planner is not None:
            planner.close()


def _check_cgroup(limit: int | None, in_process: bool) -> dict | None:
    """Whether every mode can run in a memory cgroup of this size: the settings to record, or a clear
    error (never a silent run without the limit)."""

    if not limit:
        return None
    if in_process:
        raise MoeOffloadError("--memory-limit runs each mode in its own process inside a memory cgroup: "
                              "it cannot be combined with --in-process")
    try:
        version, swap_limited = check_available(limit)
    except CgroupError as e:
        raise MoeOffloadError(f"--memory-limit: cannot run the modes in a memory cgroup: {e}") from e
    return {"limit_bytes": limit, "cgroup_version": version, "swap_limited": swap_limited,
            "page_cache_counted": True}


def _run_one(mode: str, spec: dict, llama_spec: dict | None, progress, in_process: bool,
             cg: MemoryCgroup | None) -> dict:
    """One mode's result; under a memory limit, a mode the OOM killer ended is a result too."""

    wrap = cg.wrap if cg is not None else None
    try:
        if mode == LLAMACPP:
            result = run_llamacpp(llama_spec, progress, wrap=wrap, before_each=lambda: drop_page_cache(llama_spec["gguf"]),
                                  oom_kills=cg.oom_kills if cg is not None else None)
        elif in_process:
            result = run_mode(spec, progress)
        else:
            result = run_mode_subprocess(spec, progress, wrap=wrap)
    except ModeFailed as e:
        if cg is not None and cg.killed_by_oom(e.returncode):
            print(f"{mode}: {KILLED_OOM} in a {cg.limit_bytes / 1e9:.2f} GB memory cgroup"
                  + (" in the long prefill, after the prompts" if e.partial else ""), file=sys.stderr)
            result = failed_result(KILLED_OOM) if e.partial is None else killed_in_long_prefill(e.partial)
        else:
            raise MoeOffloadError(str(e)) from None
    if cg is not None:
        result["cgroup_peak_bytes"] = cg.peak_bytes()
        result["cgroup_oom_kills"] = cg.oom_kills()
    return result


def failed_result(why: str) -> dict:
    """The column of a mode that did not finish: no numbers, the reason."""
    return {"failed": why, "tokens": [], "decode_tokens_per_s": None, "prefill_tokens_per_s": None,
            "long_prefill_tokens_per_s": None, "peak_rss_bytes": None}


def killed_in_long_prefill(partial: dict) -> dict:
    """The column of a mode killed after its prompts: their numbers, and the long prefill's cell says so."""
    return dict(partial, incomplete=KILLED_OOM, long_prefill_tokens_per_s=None,
                cell_notes={"long_prefill_tokens_per_s": KILLED_OOM})


class ModeFailed(MoeOffloadError):
    """A mode's process ended without its result: its exit status (-signal), and the numbers it
    reported after its prompts, if it got that far."""

    def __init__(self, message: str, returncode: int | None, partial: dict | None = None):
        super().__init__(message)
        self.returncode, self.partial = returncode, partial


def _recorded_source(st) -> Path | None:
    path = st.manifest.get("source", {}).get("path")
    return Path(path) if path and (Path(path) / "config.json").is_file() else None


def _check_source(modes: list[str], source: Path | None, explicit: bool) -> list[str]:
    """The accelerate and transformers modes need the source checkpoint; skip them if it is gone."""

    need = [m for m in modes if m in HF_MODES]
    if not need or (source and (source / "config.json").is_file()):
        return modes
    if explicit:
        raise MoeOffloadError(f"mode(s) {', '.join(need)} need the source checkpoint: pass --source DIR "
                              f"(the Hugging Face folder the store was converted from)")
    print(f"skipping {', '.join(need)}: the store's source checkpoint is not on this machine (pass --source DIR)",
          file=sys.stderr)
    return [m for m in modes if m not in HF_MODES]


def expert_cache_bytes(st, load_kwargs: dict) -> int:
    """Bytes of expert-cache slots that load() would allocate with these options."""
    pools = st.num_layers if (load_kwargs.get("cache_scope") or "layer") == "layer" else 1
    return cache_slots_per_pool(st, load_kwargs) * pools * st.blob_size


def cache_slots_per_pool(st, load_kwargs: dict) -> int:
    from ..config import OffloadConfig
    from ..model import slots_per_pool

    cfg = OffloadConfig(expert_cache=load_kwargs.get("expert_cache"),
                        experts_per_layer=load_kwargs.get("experts_per_layer"),
                        cache_scope=load_kwargs.get("cache_scope") or "layer")
    return slots_per_pool(st, cfg)


def run_mode_subprocess(spec: dict, progress, wrap=None) -> dict:
    """Run one mode in a fresh interpreter; it reports JSON lines on its stdout. wrap(cmd) -> cmd
    starts it somewhere else (a memory cgroup). A crash raises ModeFailed, with its exit status."""

    package_root = str(Path(__file__).resolve().parents[2])  # src/, above moe_offload/bench/
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-c", "from moe_offload.bench import worker_main; worker_main()", json.dumps(spec)]
    if wrap is not None:
        cmd = wrap(cmd)
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        result, error, partial = None, None, None
        for line in proc.stdout:
            event = json.loads(line)
            if event["event"] == "step" and "partial" in event:
                partial = event["partial"]
            elif event["event"] == "step":
                progress(event)
            elif event["event"] == "result":
                result = event["result"]
            elif event["event"] == "error":
                error = event["message"]
        proc.wait()
        if error:
            raise MoeOffloadError(f"{spec['mode']}: {error}")
        if proc.returncode != 0 or result is None:
            err.seek(0)
            tail = "".join(err.readlines()[-20:])
            raise ModeFailed(f"mode {spec['mode']} failed (exit code {proc.returncode}):\n{tail}", proc.returncode,
                             partial)
    return result


def worker_main() -> None:
    """Entry point of a mode's process: events go to the original stdout, anything else to stderr."""

    events = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints from libraries must not mix with the events

    def emit(event: dict) -> None:
        events.write(json.dumps(event) + "\n")

    try:
        result = run_mode(json.loads(sys.argv[1]), lambda e: emit({"event": "step", **e}))
        emit({"event": "result", "result": result})
    except MoeOffloadError as e:
        emit({"event": "error", "message": str(e)})
        sys.exit(2)

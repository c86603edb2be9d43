"""The bench run: every mode one after the other, then what their numbers say together.

Each mode runs in its own Python process (so peak RSS is that mode's), with the store's and the
source's pages dropped from the page cache before it, and reports to this process as JSON lines.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .compare import _compare_tokens, targets
from .forecast import attach as attach_forecast
from .forecast import forecaster
from .mode import HF_MODES, OURS, PROMPTS, run_mode
from .roofline import blob_bandwidth, disk_bandwidth, ram_bandwidth, roofline_for
from .system import drop_page_cache


def run_bench(store: Path, source: Path | None, modes: list[str], *, explicit_modes: bool = True,
              prompts: int = len(PROMPTS), max_new_tokens: int = 128, accelerate_tokens: int = 8,
              load_kwargs: dict | None = None, in_process: bool = False, shape: str | None = None,
              forecast: bool = True) -> dict:
    """Run the modes one after the other; returns everything the table, the JSON and the plot show."""
    import torch
    from tqdm.auto import tqdm

    from .. import __version__
    from ..errors import MoeOffloadError
    from ..store import EXPERTS_FILE, Store

    st = Store.open(store)
    load_kwargs = dict(load_kwargs or {})
    source = Path(source) if source else _recorded_source(st)
    modes = _check_source(modes, source, explicit_modes)
    cache_bytes = expert_cache_bytes(st, load_kwargs)
    memory_limit = st.manifest["dense_file_size"] + cache_bytes
    files = [st.path] + ([source] if source else [])

    print("measuring RAM and disk read bandwidth ...", file=sys.stderr)
    sequential, blobs = disk_bandwidth(st.path / EXPERTS_FILE), blob_bandwidth(st)
    roofline = {"ram_bytes_per_s": ram_bandwidth(), "disk_bytes_per_s": max(sequential, blobs),
                "disk_sequential_bytes_per_s": sequential, "disk_blob_bytes_per_s": blobs}
    planner = None
    if forecast:
        print("timing a resident decode for moe-offload plan's predictions ...", file=sys.stderr)
        planner = forecaster(st, modes, load_kwargs)
    predicted = {}
    spec_base = dict(store=str(st.path), source=str(source) if source else None,
                     prompts=list(PROMPTS[:prompts]), max_new_tokens=max_new_tokens,
                     accelerate_tokens=min(accelerate_tokens, max_new_tokens), load_kwargs=load_kwargs,
                     memory_limit=memory_limit, drop=[str(f) for f in files])
    load_before = os.getloadavg()[0]  # other work on the machine skews every number: say how much there was
    steps = len(modes) * (2 + prompts)  # per mode: load, each prompt, the long prefill
    results: dict[str, dict] = {}
    with tqdm(total=steps, unit="step", desc="bench", dynamic_ncols=True) as bar:
        for mode in modes:
            bar.set_description(mode)
            if planner is not None and mode in OURS:
                predicted[mode] = planner.predict(mode)
            drop_page_cache(*files)
            spec = dict(spec_base, mode=mode)
            run = run_mode if in_process else run_mode_subprocess
            results[mode] = run(spec, lambda event: bar.update(1))
            if in_process:
                gc.collect()
    if not results:
        raise MoeOffloadError("no mode to run")
    for r in results.values():
        r.update(roofline_for(r, roofline))
    for mode, f in predicted.items():
        attach_forecast(results[mode], f)
    _compare_tokens(results)
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
                     "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                     "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
        "roofline": roofline,
        "modes": results,
        "targets": targets(results, st.manifest),
    }


def _recorded_source(st) -> Path | None:
    path = st.manifest.get("source", {}).get("path")
    return Path(path) if path and (Path(path) / "config.json").is_file() else None


def _check_source(modes: list[str], source: Path | None, explicit: bool) -> list[str]:
    """The accelerate and transformers modes need the source checkpoint; skip them if it is gone."""
    from ..errors import MoeOffloadError

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


def run_mode_subprocess(spec: dict, progress) -> dict:
    """Run one mode in a fresh interpreter; it reports JSON lines on its stdout."""
    from ..errors import MoeOffloadError

    package_root = str(Path(__file__).resolve().parents[2])  # src/, above moe_offload/bench/
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-c", "from moe_offload.bench import worker_main; worker_main()", json.dumps(spec)]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        result, error = None, None
        for line in proc.stdout:
            event = json.loads(line)
            if event["event"] == "step":
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
            raise MoeOffloadError(f"mode {spec['mode']} failed (exit code {proc.returncode}):\n{tail}")
    return result


def worker_main() -> None:
    """Entry point of a mode's process: events go to the original stdout, anything else to stderr."""
    from ..errors import MoeOffloadError

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

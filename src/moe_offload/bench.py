"""`moe-offload bench`: the seed protocol in several modes side by side, with a roofline.

Each mode runs in its own Python process (so peak RSS is that mode's), with the store's and the
source's pages dropped from the page cache before it, and reports to this process as JSON lines.
Modes:
  resident      every expert in the cache, loaded before timing (the upper bound)
  offload       the expert-cache budget with speculative prefetch (the product's default)
  lru-only      the same budget, prefetch off
  no-cache      the minimal cache (top-k slots per layer), emptied after every layer: every
                expert is read from disk for every use (the lower bound of the mechanism)
  accelerate    transformers + accelerate disk offload on the source weights, with the same
                memory limit; the page cache is emptied before every forward, since a machine
                with that limit could not keep the offloaded weights in it
  transformers  the source checkpoint fully in RAM (the fidelity reference)
"""
from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("resident", "offload", "lru-only", "no-cache", "accelerate", "transformers")
OURS = ("resident", "offload", "lru-only", "no-cache")
HF_MODES = ("accelerate", "transformers")
PROMPTS = (  # the seed documents' protocol
    "Write the recipe for a chicken curry with coconut milk.",
    "Translate into French the following sentence: I love bread and cheese!",
    "Cite 20 famous people.",
    "Where is the moon right now?",
)
WARMUP_PROMPT = "Hello!"
LONG_PREFILL = 128  # tokens of the prefill measured on its own (the prefill target)


# ----------------------------------------------------------------------------- command line

def add_parser(sub) -> None:
    from .cli import add_budget_args

    p = sub.add_parser(
        "bench", help="benchmark offloading modes side by side against accelerate and transformers",
        description="Run the seed protocol (4 chat prompts, greedy) in several modes side by side, each in "
        "its own process with a cold page cache, and print prefill/decode tokens/s, peak RSS, cache hit "
        "rate, prefetch precision/recall, bytes read from disk and stall time, next to a roofline built from "
        "the measured RAM and disk bandwidth.",
        epilog="Modes: " + ", ".join(MODES) + ". Example: moe-offload bench --shape quarter --json bench.json")
    p.add_argument("store", nargs="?", help="a store made by `moe-offload convert` (or use --shape)")
    p.add_argument("--shape", choices=["tiny", "small", "quarter"],
                   help="build a random Mixtral of this size (quarter = Mixtral-8x7B at a quarter of its width), "
                   "convert it with 4-bit experts and 4-bit dense weights, and benchmark it")
    p.add_argument("--dir", default=".bench", help="where --shape keeps its models, reused across runs "
                   "(default .bench)")
    p.add_argument("--source", help="the Hugging Face checkpoint the store came from, for the accelerate and "
                   "transformers modes (default: the one recorded in the store, if it still exists)")
    p.add_argument("--modes", nargs="+", metavar="MODE", help=f"modes to run, in order (default: all of "
                   f"{', '.join(MODES)}; commas work too)")
    p.add_argument("--prompts", type=int, default=len(PROMPTS), metavar="N",
                   help=f"how many of the {len(PROMPTS)} seed prompts to run (default {len(PROMPTS)})")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="tokens generated per prompt "
                   "(exactly N: end-of-sequence is suppressed so every mode decodes the same count; default 128)")
    p.add_argument("--accelerate-tokens", type=int, default=8, metavar="N",
                   help="tokens per prompt in accelerate mode, which reads every offloaded weight for every token "
                   "(default 8)")
    add_budget_args(p)
    p.add_argument("--in-process", action="store_true", help="run every mode in this process: faster to start, "
                   "but peak RSS then also holds what earlier modes left behind")
    p.add_argument("--json", metavar="FILE", help="write every number to FILE")
    p.add_argument("--plot", metavar="FILE.png", help="draw bars per mode into FILE.png (needs matplotlib)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> None:
    from .cli import load_kwargs
    from .errors import MoeOffloadError

    modes = parse_modes(args.modes)
    if args.plot:
        _require_matplotlib()
    if args.prompts < 1 or args.prompts > len(PROMPTS):
        raise MoeOffloadError(f"--prompts must be between 1 and {len(PROMPTS)}, got {args.prompts}")
    if args.max_new_tokens < 1 or args.accelerate_tokens < 1:
        raise MoeOffloadError("--max-new-tokens and --accelerate-tokens must be at least 1")
    if args.shape and args.store:
        raise MoeOffloadError("give either a STORE or --shape, not both")
    if not args.shape and not args.store:
        raise MoeOffloadError("give a STORE to benchmark, or --shape tiny|small|quarter to build one")
    if "accelerate" in modes:
        _require("accelerate", "the accelerate mode needs accelerate: pip install 'accelerate>=1.0,<2'")

    if args.shape:
        source, store = prepare_shape(args.shape, Path(args.dir))
    else:
        store, source = Path(args.store), None
    source = Path(args.source) if args.source else source
    results = run_bench(store, source, modes, explicit_modes=args.modes is not None, prompts=args.prompts,
                        max_new_tokens=args.max_new_tokens, accelerate_tokens=args.accelerate_tokens,
                        load_kwargs=load_kwargs(args), in_process=args.in_process, shape=args.shape)
    print(format_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"\nwrote {args.json}", file=sys.stderr)
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)


def parse_modes(given: list[str] | None) -> list[str]:
    from .errors import MoeOffloadError

    if not given:
        return list(MODES)
    modes = [m.strip() for item in given for m in item.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise MoeOffloadError(f"unknown mode {', '.join(unknown) or '(none)'}: choose from {', '.join(MODES)}")
    return list(dict.fromkeys(modes))  # keep the order, drop repeats


def _require(module: str, message: str) -> None:
    import importlib.util

    from .errors import MoeOffloadError

    if importlib.util.find_spec(module) is None:
        raise MoeOffloadError(message)


def _require_matplotlib() -> None:
    _require("matplotlib", "--plot needs matplotlib: pip install 'matplotlib>=3.7,<4' "
             "(or pip install 'moe-offload[bench]')")


def prepare_shape(shape: str, root: Path) -> tuple[Path, Path]:
    """Build (or reuse) a random Mixtral of a named shape and its 4-bit store under root/shape."""
    from . import convert
    from .synthetic import build_random_mixtral

    source, store = root / shape / "source", root / shape / "store-e4-d4"
    if not (source / "config.json").is_file():
        print(f"building a random Mixtral-architecture model of shape {shape!r} in {source} ...", file=sys.stderr)
        started = time.perf_counter()
        partial = source.with_name(source.name + ".partial")  # renamed when complete: a crash leaves no half model
        if partial.exists():
            import shutil

            shutil.rmtree(partial)
        build_random_mixtral(partial, shape, seed=0)
        os.rename(partial, source)
        print(f"built in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if not (store / "manifest.json").is_file():
        print(f"converting it into {store} (4-bit experts, 4-bit dense) ...", file=sys.stderr)
        started = time.perf_counter()
        convert(source, store, expert_bits=4, dense_bits=4, overwrite=True)
        print(f"converted in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return source, store


# ----------------------------------------------------------------------------- the run

def run_bench(store: Path, source: Path | None, modes: list[str], *, explicit_modes: bool = True,
              prompts: int = len(PROMPTS), max_new_tokens: int = 128, accelerate_tokens: int = 8,
              load_kwargs: dict | None = None, in_process: bool = False, shape: str | None = None) -> dict:
    """Run the modes one after the other; returns everything the table, the JSON and the plot show."""
    import torch
    from tqdm.auto import tqdm

    from . import __version__
    from .errors import MoeOffloadError
    from .store import EXPERTS_FILE, Store

    st = Store.open(store)
    load_kwargs = dict(load_kwargs or {})
    source = Path(source) if source else _recorded_source(st)
    modes = _check_source(modes, source, explicit_modes)
    cache_bytes = expert_cache_bytes(st, load_kwargs)
    memory_limit = st.manifest["dense_file_size"] + cache_bytes
    files = [st.path] + ([source] if source else [])

    print("measuring RAM and disk read bandwidth ...", file=sys.stderr)
    roofline = {"ram_bytes_per_s": ram_bandwidth(), "disk_bytes_per_s": disk_bandwidth(st.path / EXPERTS_FILE)}
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
    from .errors import MoeOffloadError

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
    from .config import OffloadConfig
    from .model import slots_per_pool

    cfg = OffloadConfig(expert_cache=load_kwargs.get("expert_cache"),
                        experts_per_layer=load_kwargs.get("experts_per_layer"),
                        cache_scope=load_kwargs.get("cache_scope") or "layer")
    pools = st.num_layers if cfg.cache_scope == "layer" else 1
    return slots_per_pool(st, cfg) * pools * st.blob_size


def run_mode_subprocess(spec: dict, progress) -> dict:
    """Run one mode in a fresh interpreter; it reports JSON lines on its stdout."""
    from .errors import MoeOffloadError

    package_root = str(Path(__file__).resolve().parents[1])
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
    from .errors import MoeOffloadError

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


# ----------------------------------------------------------------------------- one mode

def run_mode(spec: dict, progress) -> dict:
    """Load the model of one mode, warm it up, run the prompts and a long prefill; return the numbers."""
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    mode = spec["mode"]
    _reset_peak_rss()
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["source"] if mode in HF_MODES else spec["store"],
                                              local_files_only=True)
    with tempfile.TemporaryDirectory(prefix="moe-offload-bench-") as scratch:
        model, info = open_model(spec, scratch)
        try:
            load_seconds = time.perf_counter() - started
            progress({"mode": mode, "what": "loaded"})
            clock = PhaseClock(model, info.get("stats"))
            if mode == "accelerate":  # see the module docstring: the limit leaves no room for a page cache
                drop = [*spec["drop"], scratch]

                def drop_before_forward(module, args):  # registered first, so it runs outside the timing
                    if clock.phase != "warmup":
                        drop_page_cache(*drop)

                model.register_forward_pre_hook(drop_before_forward)
            clock.install()
            new_tokens = spec["accelerate_tokens"] if mode == "accelerate" else spec["max_new_tokens"]

            clock.phase = "warmup"  # first calls pay for lazy initialisation: keep them out of the numbers
            _generate(model, tokenizer, WARMUP_PROMPT, 2)
            if mode == "resident":
                _load_all_experts(model)
            drop_page_cache(*spec["drop"])
            load_peak = _peak_rss()
            if info.get("stats") is not None:
                info["stats"].reset()  # also restarts the peak-RSS watermark
            _reset_peak_rss()

            clock.phase = "prompts"
            tokens = []
            for prompt in spec["prompts"]:
                tokens.append(_generate(model, tokenizer, prompt, new_tokens))
                progress({"mode": mode, "what": "prompt"})
            stats = info["stats"].as_dict() if info.get("stats") is not None else None
            run_peak = _peak_rss()

            clock.phase = "long_prefill"
            _long_prefill(model, tokenizer, spec["prompts"])
            progress({"mode": mode, "what": "long prefill"})
        finally:
            if hasattr(model, "close"):
                model.close()
    return _mode_result(mode, clock, stats, tokens, info, load_seconds, max(load_peak, run_peak), run_peak)


def open_model(spec: dict, scratch: str):
    """The model of a mode, and what the roofline needs to know about it."""
    mode = spec["mode"]
    if mode in OURS:
        from . import load

        options = dict(spec["load_kwargs"])
        if mode in ("resident", "no-cache"):
            options.update(expert_cache=None, experts_per_layer=None)
        if mode == "resident":
            options["experts_per_layer"] = _num_experts(spec["store"])
        if mode == "no-cache":
            options["experts_per_layer"] = _top_k(spec["store"])
        if mode != "offload":
            options["prefetch"] = 0
        model = load(spec["store"], **options)
        if mode == "no-cache":
            forget_after_use(model.offload_runtime.cache)
        return model, dict(stats=model.offload_stats(), **bytes_per_token_offloaded(model), options=options)

    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype="auto", experts_implementation="eager", local_files_only=True)  # eager: faster on CPU
    if mode == "accelerate":
        kwargs.update(device_map="auto", max_memory={"cpu": spec["memory_limit"]}, offload_folder=scratch)
    model = AutoModelForCausalLM.from_pretrained(spec["source"], **kwargs)
    model.eval()
    info = bytes_per_token_hf(model)
    info["dtype"] = str(model.dtype).removeprefix("torch.")
    if mode == "accelerate":
        info["device_map"] = sorted(set(getattr(model, "hf_device_map", {}).values()), key=str)
    return model, info


def _num_experts(store: str) -> int:
    from .store import Store

    return Store.open(store).num_experts


def _top_k(store: str) -> int:
    from .store import Store

    return Store.open(store).top_k


def forget_after_use(cache) -> None:
    """no-cache mode: once a layer's experts have run, free every slot of its pool, so that the next
    use of any expert reads it from disk again. With prefetch off nothing else is loading."""
    stream = cache.stream

    def stream_then_forget(layer, experts):
        yield from stream(layer, experts)
        cache.forget(layer)

    cache.stream = stream_then_forget


def _load_all_experts(model) -> None:
    """resident mode: read every expert into its slot before timing (the pools hold them all)."""
    rt = model.offload_runtime
    for layer in rt.store.moe_layers:
        for _ in rt.cache.stream(layer, range(rt.store.num_experts)):
            pass


def _chat_ids(tokenizer, prompt: str):
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


def _generate(model, tokenizer, prompt: str, new_tokens: int) -> list[int]:
    import torch

    ids = _chat_ids(tokenizer, prompt)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def _long_prefill(model, tokenizer, prompts: list[str]) -> None:
    """One forward over LONG_PREFILL tokens of the prompts' text, repeated (the prefill target)."""
    import torch

    ids = tokenizer(" ".join(prompts), return_tensors="pt")["input_ids"][0]
    ids = ids.repeat(LONG_PREFILL // len(ids) + 1)[:LONG_PREFILL].unsqueeze(0)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)


class PhaseClock:
    """Times every forward of the model and counts its disk reads, by phase: the prompts' prefill,
    their decode steps, and the long prefill. Forwards during warm-up are not counted."""

    def __init__(self, model, stats=None):
        self.model, self.stats = model, stats
        self.phase = "warmup"
        self.totals: dict[str, dict] = {}
        self._start: dict | None = None

    def install(self) -> None:
        self.model.register_forward_pre_hook(self._before, with_kwargs=True)
        self.model.register_forward_hook(self._after, with_kwargs=True)

    def _expert_bytes(self) -> int:
        return sum(self.stats.bytes_read.values()) if self.stats is not None else 0

    def _before(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        self._start = dict(t=time.perf_counter(), tokens=ids.shape[0] * ids.shape[1], long=ids.shape[1] > 1,
                           disk=disk_read_bytes(), experts=self._expert_bytes())

    def _after(self, module, args, kwargs, output) -> None:
        s, self._start = self._start, None
        if s is None or self.phase == "warmup":
            return
        key = "long_prefill" if self.phase == "long_prefill" else ("prefill" if s["long"] else "decode")
        t = self.totals.setdefault(key, dict(tokens=0, seconds=0.0, forwards=0, disk_bytes=0, expert_bytes=0))
        t["tokens"] += s["tokens"]
        t["seconds"] += time.perf_counter() - s["t"]
        t["forwards"] += 1
        t["disk_bytes"] += disk_read_bytes() - s["disk"]
        t["expert_bytes"] += self._expert_bytes() - s["experts"]

    def rate(self, key: str) -> float:
        t = self.totals.get(key)
        return round(t["tokens"] / t["seconds"], 3) if t and t["seconds"] > 0 else 0.0


def _mode_result(mode, clock: PhaseClock, stats, tokens, info, load_seconds, peak, run_peak) -> dict:
    totals = clock.totals
    decode = totals.get("decode", {})
    prompts_disk = sum(totals.get(k, {}).get("disk_bytes", 0) for k in ("prefill", "decode"))
    r = {
        "prefill_tokens": totals.get("prefill", {}).get("tokens", 0),
        "prefill_tokens_per_s": clock.rate("prefill"),
        "decode_tokens": decode.get("tokens", 0),
        "decode_tokens_per_s": clock.rate("decode"),
        "long_prefill_tokens_per_s": clock.rate("long_prefill"),
        "load_seconds": round(load_seconds, 2),
        "peak_rss_bytes": peak,
        "peak_rss_run_bytes": run_peak,
        "disk_bytes_read": prompts_disk,
        "decode_disk_bytes_per_token": _per(decode.get("disk_bytes", 0), decode.get("tokens", 0)),
        "decode_expert_bytes_per_token": _per(decode.get("expert_bytes", 0), decode.get("tokens", 0)),
        "ram_bytes_per_token": info["ram_bytes_per_token"],
        "dense_bytes_per_token": info["dense_bytes_per_token"],
        "active_expert_bytes_per_token": info["active_expert_bytes_per_token"],
        "hit_rate": None, "prefetch_precision": None, "prefetch_recall": None,
        "expert_bytes_read": None, "stall_seconds": None,
        "phases": totals,
        "tokens": tokens,
    }
    if stats is not None:
        r.update(hit_rate=stats["hit_rate"], expert_bytes_read=sum(stats["bytes_read"].values()),
                 stall_seconds=stats["stall_seconds"], offload_stats=stats, load_options=info["options"])
        if mode == "offload":
            r.update(prefetch_precision=stats["prefetch_precision"], prefetch_recall=stats["prefetch_recall"])
    for key in ("dtype", "device_map"):
        if key in info:
            r[key] = info[key]
    return r


def _per(n: int, tokens: int) -> int:
    return round(n / tokens) if tokens else 0


# ----------------------------------------------------------------------------- bytes, bandwidth, roofline

def bytes_per_token_offloaded(model) -> dict:
    """Weights one decode token reads from RAM: every dense tensor except the embedding table (one
    row of it), plus top-k experts in every MoE layer."""
    rt = model.offload_runtime
    embed = model.get_input_embeddings().weight
    dense = sum(t.nbytes for t in [*model.parameters(), *model.buffers()] if t is not embed)
    spec_bytes = 0
    for matrix in rt.store.layout.matrices.values():
        for t in matrix["tensors"]:
            spec_bytes += math.prod(t["shape"]) * _itemsize(t["dtype"])
    active = rt.store.top_k * rt.store.num_layers * spec_bytes
    return dict(dense_bytes_per_token=dense, active_expert_bytes_per_token=active, ram_bytes_per_token=dense + active)


def _itemsize(dtype_name: str) -> int:
    from .store import DTYPES

    return DTYPES[dtype_name].itemsize


def bytes_per_token_hf(model) -> dict:
    """The same count for a stock transformers model (offloaded parameters sit on the meta device,
    whose sizes still count: a token needs them)."""
    cfg = model.config
    embed = model.get_input_embeddings().weight
    experts = dense = 0
    for name, p in model.named_parameters():
        if p is embed:
            continue
        if ".experts." in name:
            experts += p.nbytes
        else:
            dense += p.nbytes
    num_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    active = experts * cfg.num_experts_per_tok // num_experts
    return dict(dense_bytes_per_token=dense, active_expert_bytes_per_token=active, ram_bytes_per_token=dense + active)


def ram_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of a torch sum over a 1 GiB tensor on 2 threads (best of a few: the machine is shared)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        x = torch.ones(nbytes // 4, dtype=torch.float32)
        x.sum()  # first touch
        best = math.inf
        for _ in range(repeats):
            t = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t)
        del x
    finally:
        torch.set_num_threads(threads)
    return round(nbytes / best)


def disk_bandwidth(path: Path, limit: int = 1 << 30, chunk: int = 16 << 20) -> float:
    """Bytes/s of a cold sequential read of (up to 1 GiB of) the experts file."""
    drop_page_cache(path)
    buf = bytearray(chunk)
    done = 0
    with open(path, "rb", buffering=0) as f:
        t = time.perf_counter()
        while done < limit:
            n = f.readinto(buf)
            if not n:
                break
            done += n
        seconds = time.perf_counter() - t
    drop_page_cache(path)
    return round(done / seconds) if seconds > 0 else 0


def roofline_for(r: dict, roofline: dict) -> dict:
    """Tokens/s if a decode token cost nothing but its reads: its weights from RAM at the measured
    RAM bandwidth, plus what this mode actually read from disk per token at the disk bandwidth.
    Also the disk throughput the mode reached while decoding: the disk of a shared machine varies,
    and a mode that read faster than the bandwidth measured up front exceeds 100% of its roofline."""
    decode = r["phases"].get("decode", {})
    achieved = decode.get("disk_bytes", 0) / decode["seconds"] if decode.get("seconds") else 0.0
    seconds = r["ram_bytes_per_token"] / roofline["ram_bytes_per_s"]
    if r["decode_disk_bytes_per_token"] and roofline["disk_bytes_per_s"]:
        seconds += r["decode_disk_bytes_per_token"] / roofline["disk_bytes_per_s"]
    ceiling = 1 / seconds if seconds > 0 else 0.0
    ratio = r["decode_tokens_per_s"] / ceiling if ceiling else 0.0
    return {"roofline_tokens_per_s": round(ceiling, 3), "roofline_ratio": round(ratio, 4),
            "decode_disk_bytes_per_s": round(achieved)}


def _compare_tokens(results: dict) -> None:
    """For every mode, the share of its tokens equal to the reference's before the first difference
    (transformers: the fp model; resident: the same quantized weights without offloading)."""
    for ref in ("transformers", "resident"):
        if ref not in results:
            continue
        for r in results.values():
            same = total = 0
            for mine, theirs in zip(r["tokens"], results[ref]["tokens"]):
                n = min(len(mine), len(theirs))
                k = next((i for i in range(n) if mine[i] != theirs[i]), n)
                same, total = same + k, total + n
            r[f"match_{ref}"] = round(same / total, 4) if total else None


def targets(results: dict, manifest: dict | None = None) -> list[dict]:
    """The issue's targets, from this run's numbers (only those whose modes ran), and the store's
    conversion time as its manifest recorded it."""
    out = []

    def ratio(a: str, b: str, key: str = "decode_tokens_per_s"):
        if a in results and b in results and results[b][key]:
            return results[a][key] / results[b][key]
        return None

    def add(name, value, goal, unit="x"):
        if value is not None:
            met = value <= goal if unit == "min" else value >= goal
            out.append({"target": name, "value": round(value, 3), "goal": goal, "met": met, "unit": unit})

    if "resident" in results:
        add("resident decode / its roofline", results["resident"]["roofline_ratio"], 0.5, "ratio")
    add("offload / accelerate decode", ratio("offload", "accelerate"), 3.0)
    add("offload / no-cache decode", ratio("offload", "no-cache"), 1.3)
    add("offload / lru-only decode (prefetch gain; paper 1.05-1.34)", ratio("offload", "lru-only"), 1.0)
    for mode in ("offload", "resident"):
        if mode in results and results[mode]["decode_tokens_per_s"]:
            add(f"{mode} prefill ({LONG_PREFILL} tokens) / decode",
                results[mode]["long_prefill_tokens_per_s"] / results[mode]["decode_tokens_per_s"], 10.0)
    if manifest and manifest.get("convert_seconds") is not None and manifest["quant"]["expert_bits"] == 4:
        workers = manifest.get("convert_workers", 1)
        add(f"conversion at 4-bit experts ({workers} worker(s), "
            f"{manifest.get('convert_seconds_per_expert', '?')} s/expert)", manifest["convert_seconds"] / 60, 10.0, "min")
    return out


# ----------------------------------------------------------------------------- page cache, RSS, /proc

def drop_page_cache(*paths) -> None:
    """Ask the kernel to forget the cached pages of every file under the given paths."""
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else [f for f in root.rglob("*") if f.is_file()] if root.is_dir() else []
        for f in files:
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)  # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
            finally:
                os.close(fd)


def disk_read_bytes() -> int:
    """Bytes this process (all its threads) made the block layer read: page-cache hits excluded."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _peak_rss() -> int:
    from .stats import peak_rss_bytes

    return peak_rss_bytes()


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


# ----------------------------------------------------------------------------- output

def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def _num(fmt: str):
    return lambda v: "-" if v is None else fmt.format(v)


ROWS = [  # label, key, format
    ("decode tok/s", "decode_tokens_per_s", _num("{:.2f}")),
    ("prefill tok/s (prompts)", "prefill_tokens_per_s", _num("{:.1f}")),
    (f"prefill tok/s ({LONG_PREFILL} tokens)", "long_prefill_tokens_per_s", _num("{:.1f}")),
    ("tokens decoded", "decode_tokens", _num("{}")),
    ("peak RSS MiB", "peak_rss_bytes", _mib),
    ("hit rate", "hit_rate", _num("{:.3f}")),
    ("prefetch precision", "prefetch_precision", _num("{:.3f}")),
    ("prefetch recall", "prefetch_recall", _num("{:.3f}")),
    ("MiB read from disk", "disk_bytes_read", _mib),
    ("stall s", "stall_seconds", _num("{:.2f}")),
    ("RAM MiB / token", "ram_bytes_per_token", _mib),
    ("disk MiB / decode token", "decode_disk_bytes_per_token", _mib),
    ("disk MiB/s while decoding", "decode_disk_bytes_per_s", _mib),
    ("roofline tok/s", "roofline_tokens_per_s", _num("{:.2f}")),
    ("% of roofline", "roofline_ratio", lambda v: "-" if v is None else f"{100 * v:.0f}%"),
    ("tokens = transformers", "match_transformers", _num("{:.2f}")),
    ("tokens = resident", "match_resident", _num("{:.2f}")),
]


def format_table(results: dict) -> str:
    """A Markdown table (readable as is in a terminal): one row per metric, one column per mode."""
    modes = results["modes"]
    rows = [(label, [fmt(r.get(key)) for r in modes.values()]) for label, key, fmt in ROWS
            if any(key in r for r in modes.values())]
    header = ["", *modes]
    widths = [max(len(header[0]), *(len(label) for label, _ in rows))]
    widths += [max(len(m), *(len(vals[i]) for _, vals in rows)) for i, m in enumerate(modes)]

    def line(cells):
        return "| " + " | ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells)) + " |"

    out = [line(header), "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"]
    out += [line([label, *vals]) for label, vals in rows]
    return "\n".join(out)


def format_report(results: dict) -> str:
    from .config import format_size

    m, s, roof = results["model"], results["settings"], results["roofline"]
    lines = [
        f"store {results['store']}: {m['moe_layers']} MoE layers x {m['experts']} experts (top-{m['top_k']}), "
        f"expert blob {format_size(m['expert_blob_bytes'])}, experts {m['quant']['expert_bits']}-bit, "
        f"dense {m['quant']['dense_bits']}-bit",
        f"{s['prompts']} prompt(s) x {s['max_new_tokens']} new tokens (accelerate: {s['accelerate_tokens']}), "
        f"greedy; expert cache {format_size(s['expert_cache_bytes'])}; accelerate's memory limit "
        f"{format_size(s['memory_limit_bytes'])} (dense part + expert cache); {s['isolation']}, "
        f"{s['torch_threads']} torch threads; load average {s['load_average'][0]:.1f} before, "
        f"{s['load_average'][1]:.1f} after",
        f"roofline: RAM read {roof['ram_bytes_per_s'] / 1e9:.1f} GB/s (torch sum, 1 GiB, 2 threads), disk read "
        f"{roof['disk_bytes_per_s'] / 1e9:.2f} GB/s (cold sequential read of experts.bin)",
        "",
        format_table(results),
        "",
        "RAM MiB / token: weights a decode token reads from memory (dense part + top-k experts per layer);",
        "disk MiB / decode token: what the mode read from disk per decode token; roofline tok/s = 1 / (RAM "
        "bytes / RAM bandwidth + disk bytes / disk bandwidth);",
        "above 100% of the roofline, the disk delivered more while decoding than in the up-front measurement.",
    ]
    if results["targets"]:
        lines += ["", "targets (issue #4):"]
        for t in results["targets"]:
            if t["unit"] == "min":
                value, goal = f"{t['value']:.1f} min", f"<= {t['goal']:g} min"
            elif t["unit"] == "ratio":
                value, goal = f"{100 * t['value']:.0f}%", f">= {100 * t['goal']:.0f}%"
            else:
                value, goal = f"{t['value']:.2f}x", f">= {t['goal']:g}x"
            lines.append(f"  {'met   ' if t['met'] else 'MISSED'} {t['target']}: {value} (goal {goal})")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    """Bars per mode: decode and prefill tokens/s, and the share of each mode's roofline."""
    _require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results["modes"])
    panels = [("decode tok/s", "decode_tokens_per_s", 1), (f"prefill tok/s ({LONG_PREFILL} tokens)",
              "long_prefill_tokens_per_s", 1), ("% of roofline (decode)", "roofline_ratio", 100)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (title, key, scale) in zip(axes, panels):
        values = [(results["modes"][m].get(key) or 0) * scale for m in modes]
        bars = ax.bar(modes, values, color="tab:blue")
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=35)
    fig.suptitle(f"moe-offload bench: {results.get('shape') or Path(results['store']).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

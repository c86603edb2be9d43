"""One mode of `moe-offload bench`: load its model, warm it up, run the prompts and a long prefill,
and time every forward by phase.

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

import tempfile
import time

from ..engine import freeze_heap
from .roofline import bytes_per_token_hf, bytes_per_token_offloaded
from .system import _peak_rss, _reset_peak_rss, disk_read_bytes, drop_page_cache

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
# New tokens of the warm-up generation: our modes' decode paths check themselves once on their first
# decode tokens (attention, then each layer, the layers' order, the base model's forward: four
# tokens, each slower than the ones after), a one-off cost of a loaded model like its kernels' build.
WARMUP_TOKENS = {"ours": 6, "hf": 2}
LONG_PREFILL = 128  # tokens of the prefill measured on its own (the prefill target)


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
            if mode == "accelerate" and not _on_gpu(spec):  # the module docstring: no room for a page cache
                drop = [*spec["drop"], scratch]

                def drop_before_forward(module, args):  # registered first, so it runs outside the timing
                    if clock.phase != "warmup":
                        drop_page_cache(*drop)

                model.register_forward_pre_hook(drop_before_forward)
            clock.install()
            new_tokens = spec["accelerate_tokens"] if mode == "accelerate" else spec["max_new_tokens"]

            clock.phase = "warmup"  # first calls pay for lazy initialisation: keep them out of the numbers
            if hasattr(model, "offload_warm_up"):
                model.offload_warm_up()  # the prefill kernels load() leaves to first use: the long prefill is timed
            if mode == "resident":
                model.offload_runtime.preload()  # every expert read before timing, as the command line does
            # (after preload: with every expert resident the checks include the whole-stack ones)
            _generate(model, tokenizer, WARMUP_PROMPT, WARMUP_TOKENS["ours" if mode in OURS else "hf"])
            freeze_heap()  # as the command line does after loading (engine.freeze_heap), for every mode
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
            # the numbers so far, in case the long prefill does not finish (killed under a memory limit)
            progress({"mode": mode, "what": "prompts measured", "partial": _mode_result(
                mode, clock, stats, tokens, info, load_seconds, max(load_peak, run_peak), run_peak)})

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
        from .. import load
        from ..plan.predict import every_use_read

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
            every_use_read(model.offload_runtime.cache)
        return model, dict(stats=model.offload_stats(), **bytes_per_token_offloaded(model), options=options)

    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype="auto", experts_implementation="eager", local_files_only=True)  # eager: faster on CPU
    if mode == "accelerate" and _on_gpu(spec):
        # The paper's baseline: the GPU holds what our dense part and expert cache take, the rest
        # waits in host RAM and crosses PCIe when its layer runs.
        kwargs.update(device_map="auto", max_memory={_gpu_index(spec): spec["memory_limit"], "cpu": "1000GiB"},
                      offload_folder=scratch)
    elif mode == "accelerate":
        kwargs.update(device_map="auto", max_memory={"cpu": spec["memory_limit"]}, offload_folder=scratch)
    elif _on_gpu(spec):
        kwargs.update(device_map=spec["load_kwargs"]["device"])
    model = AutoModelForCausalLM.from_pretrained(spec["source"], **kwargs)
    model.eval()
    info = bytes_per_token_hf(model)
    info["dtype"] = str(model.dtype).removeprefix("torch.")
    if mode == "accelerate":
        info["device_map"] = sorted(set(getattr(model, "hf_device_map", {}).values()), key=str)
    return model, info


def _on_gpu(spec: dict) -> bool:
    """bench --device cuda[:N]: our modes load with it (load_kwargs), the HF modes place on that GPU."""
    return spec.get("load_kwargs", {}).get("device", "cpu") != "cpu"


def _gpu_index(spec: dict) -> int:
    device = spec["load_kwargs"]["device"]
    return int(device.split(":")[1]) if ":" in device else 0


def _num_experts(store: str) -> int:
    from ..store import Store

    return Store.open(store).num_experts


def _top_k(store: str) -> int:
    from ..store import Store

    return Store.open(store).top_k


def _chat_ids(tokenizer, prompt: str):
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)["input_ids"]


def _generate(model, tokenizer, prompt: str, new_tokens: int) -> list[int]:
    import torch

    ids = _chat_ids(tokenizer, prompt).to(_input_device(model))
    # Exactly new_tokens tokens: no end-of-sequence token ends the run (as in llama-bench). Not with
    # min_new_tokens: its logits processors mask the vocabulary every token (4-8% of a quarter decode, measured).
    with torch.inference_mode():  # as the command line and the server generate (engine.py)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, eos_token_id=None,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def _input_device(model):
    """Where the token ids go: the model's device, except accelerate's disk offload, which reports the
    meta device of its offloaded weights and takes ids on the CPU."""
    import torch

    return torch.device("cpu") if model.device.type == "meta" else model.device


def _long_prefill(model, tokenizer, prompts: list[str]) -> None:
    """One forward over LONG_PREFILL tokens of the prompts' text, repeated (the prefill target)."""
    import torch

    ids = tokenizer(" ".join(prompts), return_tensors="pt")["input_ids"][0]
    ids = ids.repeat(LONG_PREFILL // len(ids) + 1)[:LONG_PREFILL].unsqueeze(0).to(_input_device(model))
    with torch.inference_mode():
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
        self._start = dict(tokens=ids.shape[0] * ids.shape[1], long=ids.shape[1] > 1, disk=disk_read_bytes(),
                           experts=self._expert_bytes())
        self._start["t"] = time.perf_counter()  # last: reading /proc/self/io (~20 µs) is not the model's time

    def _after(self, module, args, kwargs, output) -> None:
        end, s, self._start = time.perf_counter(), self._start, None
        if s is None or self.phase == "warmup":
            return
        key = "long_prefill" if self.phase == "long_prefill" else ("prefill" if s["long"] else "decode")
        t = self.totals.setdefault(key, dict(tokens=0, seconds=0.0, forwards=0, disk_bytes=0, expert_bytes=0))
        t["tokens"] += s["tokens"]
        t["seconds"] += end - s["t"]
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
        if "bytes_to_device" in stats:  # a host tier (bench --device cuda, or --host-cache)
            r.update(pcie_bytes=stats["bytes_to_device"], experts_cpu=stats["experts_cpu"])  # over the prompts
        split = stats.get("memory") or {}
        if split:  # the prompts' peak RSS split: libraries, dense part, the cache's touched slots, the rest
            r.update(memory_baseline_bytes=split["baseline_bytes"], memory_dense_bytes=split["dense_bytes"],
                     memory_cache_bytes=split["cache_resident_bytes"], memory_rest_bytes=split["rest_bytes"])
        if mode == "offload" and stats["prefetch_guesses"]:  # no guesses: no precision to show, not 0
            r.update(prefetch_precision=stats["prefetch_precision"], prefetch_recall=stats["prefetch_recall"])
    for key in ("dtype", "device_map"):
        if key in info:
            r[key] = info[key]
    return r


def _per(n: int, tokens: int) -> int:
    return round(n / tokens) if tokens else 0

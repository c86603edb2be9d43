"""Predict, before running, whether a store fits a RAM budget and how fast it will decode.

  memory      dense weights (resident) + cache slots x blob size + the runtime's own footprint
  cache size  what is left for the cache, in whole experts per MoE layer (at most all of them)
  hit rate    the simulator's LRU at that cache size over decode steps (what the live cache does),
              on the given trace, else on the routing of the timed decode below; with neither
              (--no-measure): slots / experts, the rate of routing with no locality at all
  tokens/s    1 / (compute + reads): compute is a short decode timed with every expert
              resident (or dense + top-k expert bytes over the RAM bandwidth), and, for a cache
              that misses, each layer step that waits for a read at the compute such a step
              was timed at (a core that sat idle runs the next kernels slower); reads are the
              expected misses per token, (1 - hit rate) x top-k x MoE layers, times the blob size
              over the rate at which blobs come back through the loader (measured cold, a layer's
              misses submitted together as the cache does, in the simulator's group sizes, into a
              cache of the planned slots per layer; or given)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import MoeOffloadError
from ..store import DENSE_FILE, Store

TIMING_PROMPT = "Tell me a story."  # any text: the timed decode only needs tokens to follow it
PLAN_TOKENS = 32  # per turn of `plan`'s timed decode, one turn per seed prompt of `bench`
# The resident turns are timed this many times, the median kept: on a 2-core VM one timing of a
# quarter second (the reference store's) once ran 1.47x slower than the mode measured right after it.
RESIDENT_REPEATS = 3

RUNTIME_BYTES = 400 << 20  # python + torch + transformers + tokenizer, measured RSS of a loaded tiny store ~350 MiB


@dataclass
class Plan:
    ram: int
    dense_bytes: int
    blob_size: int
    moe_layers: int
    num_experts: int
    top_k: int
    fits: bool
    slots_per_layer: int
    cache_bytes: int
    hit_rate: float
    hit_rate_source: str
    misses_per_token: float
    compute_seconds: float
    compute_source: str
    disk_bytes_per_s: float
    read_seconds: float
    decode_tokens_per_s: float

    def as_dict(self) -> dict:
        return asdict(self)


def cache_slots(store: Store, ram: int, runtime: int = RUNTIME_BYTES) -> tuple[bool, int]:
    dense = (store.path / DENSE_FILE).stat().st_size
    left = ram - dense - runtime
    slots = min(store.num_experts, left // (store.blob_size * len(store.moe_layers))) if left > 0 else 0
    return slots >= store.top_k, int(max(slots, 0))


def waited_fraction(hit_rate: float, groups: dict[int, int], top_k: int) -> float:
    """The share of MoE layer steps that wait for at least one read, from the simulator's groups
    (misses in one layer step -> how often) and hit rate: steps = misses / ((1 - hit rate) x top-k)."""
    misses = sum(m * n for m, n in groups.items())
    if hit_rate >= 1 or not misses:
        return 0.0
    return min(1.0, sum(groups.values()) * (1 - hit_rate) * top_k / misses)


def read_work(blob: int, disk_read: float, waiting: float) -> float:
    """Seconds of the cache's own work around one read (not its wait for the loader), which a read
    sampled at disk_read bytes/s with this waited share holds: the compute a waited step counted."""
    return (1 - waiting) * blob / disk_read if disk_read else 0.0


def trace_misses(trace, slots: int, policy: str = "lru", scope: str = "layer") -> tuple[float, dict[int, int]]:
    """The simulator over a trace's decode steps (what a decode token pays), at this cache size: the
    hit rate, and how the misses group by layer step (misses in one step of one layer -> how often),
    which is how the cache submits them to the loader."""
    from ..routing import Setting, Steps, load_trace, simulate

    steps = trace if isinstance(trace, Steps) else Steps(load_trace(trace))
    result = simulate(steps, Setting(policy, slots, scope))
    if result.decode_hits + result.decode_misses:
        return result.decode_hit_rate, dict(result.decode_miss_groups)
    return result.hit_rate, {}


@dataclass
class Timing:
    """A short decode timed with every expert resident, and the routing it took."""

    seconds_per_token: float
    tokens: int  # per prompt
    prompts: tuple[str, ...]
    steps: object  # routing.Steps of a second, traced run of the same prompts
    # the same turns layer by layer: a cache that misses never takes the stacked step (stack_decode)
    seconds_per_token_layered: float | None = None
    # and again with every expert read again at every use, less the waits for those reads: the
    # compute of a token whose every layer step waited (no-cache's)
    seconds_per_token_waited: float | None = None
    reads_per_token_waited: int = 0  # that pass's reads a token: top-k in every MoE layer
    decoder: ResidentDecode | None = field(default=None, repr=False, compare=False)  # time_decode(keep=True)

    def drift(self) -> float:
        """How much longer the same resident turns take now than when they were timed: a shared
        machine's speed moved by up to 1.8x within a minute (README, "Planning"), which the
        prediction should not be judged on. 1.0 without a kept model."""
        if self.decoder is None:
            return 1.0
        return self.decoder.seconds_per_token(RESIDENT_REPEATS) / self.seconds_per_token

    def close(self) -> None:
        if self.decoder is not None:
            self.decoder.close()
            self.decoder = None

    def compute(self, all_resident: bool, waited: float = 0.0, work_per_read: float = 0.0) -> float:
        """Seconds of compute a decode token takes with every expert resident, or with misses, of
        which the share `waited` of layer steps wait for a read first. work_per_read: seconds of
        the cache's own work around each read that the read term already holds (the disk sample
        times it), taken out of the waited pass, which counted it as compute."""
        if all_resident or self.seconds_per_token_layered is None:
            return self.seconds_per_token
        after_wait = self.seconds_per_token_layered
        if self.seconds_per_token_waited:
            after_wait = max(after_wait, self.seconds_per_token_waited - work_per_read * self.reads_per_token_waited)
        return (1 - waited) * self.seconds_per_token_layered + waited * after_wait


class ResidentDecode:
    """A store loaded with every expert resident and its kernels warmed up, and the chat turns it
    decodes: one turn per prompt, through the chat template when the tokenizer has one (the common use)."""

    def __init__(self, store: Store, tokens: int, prompts: tuple[str, ...]):
        import torch
        from transformers import AutoTokenizer

        from ..engine import chat_prompt_ids
        from ..model import load

        self.store, self.tokens = store, tokens
        self.model = load(store.path, experts_per_layer=store.num_experts, prefetch=0)
        try:
            self.model.offload_warm_up()  # kernels load (or compile) on first use: not inside the timed turns
            self.tok = tok = AutoTokenizer.from_pretrained(store.path, local_files_only=True)
            self.turns = [torch.tensor([chat_prompt_ids(tok, [{"role": "user", "content": p}]) if tok.chat_template
                                        else tok(p).input_ids]) for p in prompts]
            self.generate(self.turns[0], 4)
            self.model.offload_runtime.preload()  # every expert, so the timed runs read nothing
        except BaseException:
            self.model.close()
            raise

    def generate(self, ids, n: int | None = None) -> None:
        """Exactly n tokens (default: the timed count), greedy, as the bench generates (bench/mode.py):
        no end-of-sequence token ends the run."""
        import torch

        with torch.inference_mode():
            self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n or self.tokens,
                                eos_token_id=None, do_sample=False,
                                pad_token_id=self.tok.pad_token_id or self.tok.eos_token_id)

    def seconds_per_token(self, repeats: int = 1) -> float:
        """The turns decoded as they run; seconds per decode token, the median of `repeats` runs."""
        import statistics

        stats, runs = self.model.offload_stats(), []
        for _ in range(repeats):
            stats.reset()
            for ids in self.turns:
                self.generate(ids)
            d = stats.as_dict()
            runs.append(d["seconds_decode"] / max(1, d["tokens_decode"]))
        return statistics.median(runs)

    def close(self) -> None:
        self.model.close()


def time_decode(store: Store, tokens: int = 64, prompts=(TIMING_PROMPT,), keep: bool = False) -> Timing:
    """Seconds per decode token with every expert resident (nothing read after warm-up); the same
    turns layer by layer, and with every expert read again at every use; then the turns again under
    the trace recorder, whose hooks must not be in the timing. The trace's turns follow each other
    as a session's would, so the simulator carries its cache from one turn to the next as the live
    cache does (one short turn alone gave a hit rate 0.11 below four: README, "Planning").
    keep: the loaded model stays with the Timing, to time the turns again later (Timing.drift)."""
    from .. import stack_decode
    from ..routing import Steps
    from ..routing.recorder import TraceRecorder

    prompts = (prompts,) if isinstance(prompts, str) else tuple(prompts)
    decoder = ResidentDecode(store, tokens, prompts)
    try:
        resident = decoder.seconds_per_token(RESIDENT_REPEATS)
        with stack_decode.layer_by_layer(decoder.model):
            layered = decoder.seconds_per_token()
        waited = _time_waited_decode(decoder)
        recorder = TraceRecorder(decoder.model, depth=1)
        try:
            for i, ids in enumerate(decoder.turns):
                recorder.prompt = i
                decoder.generate(ids)
        finally:
            recorder.close()
        timing = Timing(resident, tokens, prompts, Steps(recorder.trace({})), layered, waited,
                        store.top_k * len(store.moe_layers), decoder if keep else None)
    finally:
        if not keep:
            decoder.close()
    return timing


def every_use_read(cache) -> None:
    """Empty a layer's pool once its experts have run, so that every use of an expert reads it
    again (the bench's no-cache mode). With prefetch off nothing else is loading."""
    stream = cache.stream

    def stream_then_forget(layer, experts, **kwargs):
        try:
            yield from stream(layer, experts, **kwargs)
        finally:  # also when a one-call layer closes the stream early
            cache.forget(layer)

    cache.stream = stream_then_forget


def _time_waited_decode(decoder: ResidentDecode) -> float:
    """Decode seconds per token, less the waits for reads, with every expert read again at every
    use: what a layer step's compute becomes when its core has just waited for the disk. Measured,
    not derived: on a 2-core VM every kernel after such a wait ran 1.5-2x slower (README, "Planning")."""
    from .. import stack_decode

    model = decoder.model
    cache, stats = model.offload_runtime.cache, model.offload_stats()
    seen = {"stall": 0.0, "decode_stall": 0.0}

    def before(module, args, kwargs):
        seen["stall"] = stats.stall_seconds

    def after(module, args, kwargs, output):  # a prompt's prefill waits too: only decode steps count
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[-1] == 1:
            seen["decode_stall"] += stats.stall_seconds - seen["stall"]

    hooks = [model.register_forward_pre_hook(before, with_kwargs=True),
             model.register_forward_hook(after, with_kwargs=True)]
    stream = cache.stream
    every_use_read(cache)
    try:
        stats.reset()
        with stack_decode.layer_by_layer(model):
            for ids in decoder.turns:
                decoder.generate(ids)
        d = stats.as_dict()
    finally:
        cache.stream = stream
        for h in hooks:
            h.remove()
        decoder.model.offload_runtime.preload()  # resident again, for the passes after this
    return max(0.0, d["seconds_decode"] - seen["decode_stall"]) / max(1, d["tokens_decode"])


def decode_rate(store: Store, hit_rate: float, compute: float, disk_read: float) -> tuple[float, float, float]:
    """(expert reads per token, read seconds per token, tokens/s): compute plus the misses' reads."""
    misses = (1 - hit_rate) * store.top_k * len(store.moe_layers)
    read = misses * store.blob_size / disk_read
    return misses, read, 1 / (compute + read)


def estimate_compute(store: Store, ram_bw: float) -> float:
    dense = (store.path / DENSE_FILE).stat().st_size
    return (dense + store.top_k * len(store.moe_layers) * store.blob_size) / ram_bw


def plan(store_path, ram: int, *, disk_read: float | None = None, trace=None, measure: bool = True,
         runtime: int = RUNTIME_BYTES) -> Plan:
    store = Store.open(store_path)
    fits, slots = cache_slots(store, ram, runtime)
    L, E, k, blob = len(store.moe_layers), store.num_experts, store.top_k, store.blob_size
    if disk_read is not None and disk_read <= 0:
        raise MoeOffloadError("the disk read bandwidth must be positive")
    if measure:
        from ..bench.mode import PROMPTS

        timing = time_decode(store, PLAN_TOKENS, PROMPTS)
    else:
        timing = None
    groups = None  # how the misses group per layer step; None: top-k, every expert missed
    if not fits:
        hit, source = 0.0, "does not fit"
    elif trace is not None:
        (hit, groups), source = trace_misses(trace, slots), f"LRU on trace {trace}"
    elif timing is not None:
        (hit, groups), source = (trace_misses(timing.steps, slots),
                                 f"LRU on the timed run's own routing ({len(timing.prompts)} turns of "
                                 f"{timing.tokens} tokens)")
    else:
        hit, source = slots / E, "slots / experts (no trace: routing without locality)"
    work_per_read = 0.0  # the cache's work around a read that the sampled read rate holds
    if disk_read is None:
        from ..bench.roofline import blob_read_sample

        disk_read, waiting = (blob_read_sample(store, groups, limit=256 << 20, slots_per_layer=max(slots, k))
                              if hit < 1 else (1.0, 1.0))
        if disk_read <= 0:
            raise MoeOffloadError("the disk read bandwidth could not be measured")
        work_per_read = read_work(blob, disk_read, waiting)
    if timing is not None:
        waited = waited_fraction(hit, groups or {k: 1}, k)
        compute = timing.compute(hit >= 1, waited, work_per_read)
        csource = "timed decode, every expert resident" + (
            "" if hit >= 1 else f", layer by layer (as a cache that misses runs), {waited:.0%} of the layer "
                                "steps at the compute timed after a wait")
    else:
        from ..bench.roofline import ram_bandwidth

        compute, csource = estimate_compute(store, ram_bandwidth(256 << 20)), "bytes / RAM bandwidth"
    misses, read, tps = decode_rate(store, hit, compute, disk_read)
    return Plan(ram, (store.path / DENSE_FILE).stat().st_size, blob, L, E, k, fits, slots, slots * L * blob, hit,
                source, misses, compute, csource, disk_read, read, tps if fits else 0.0)

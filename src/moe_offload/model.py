"""load(): a transformers model whose dense part is resident and whose experts live in the store.

The skeleton is built on the meta device with the "moe_offload" experts implementation (moe.py),
dense weights are copied in from the store one tensor at a time, and each experts module loses its
expert tensors and reads its experts from the cache's slots: expert weights never exist in memory
anywhere else.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import sys
import time
from types import MethodType
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import (attention_decode, base_decode, kernels, kernels_int4pack, layer_decode, memory, moe, norm_decode,
               router_decode, stack_decode, tiers)
from .archs import MoeSpec, build_meta_model, describe
from .cache import ExpertCache
from .config import DEFAULT_PREFETCH, OffloadConfig, format_size, parse_size
from .errors import MoeOffloadError
from .loader import DiskLoader
from .prefetch import Prefetcher
from .quant import QMatrix, int4pack_layout_id
from .stats import OffloadStats
from .store import DENSE_FILE, EXPERTS_FILE, Store


# "1": transformers' own attention, norms, routers and decoder layers at decode (attention_decode.py,
# norm_decode.py, router_decode.py, layer_decode.py), for comparisons
STOCK_DECODE = "MOE_OFFLOAD_STOCK_DECODE"


class QuantLinear(nn.Module):
    """nn.Linear on a stored weight format (the dense part's quantized projections)."""

    def __init__(self, meta: dict, bias: bool):
        super().__init__()
        self.meta = meta
        self.in_features, self.out_features = meta["k"], meta["n"]
        self.bias = None
        self._names: list[str] = []
        self.has_bias = bias
        self._qmatrix: QMatrix | None = None  # built once: rebuilding it per call cost ~2 ms per decode token

    def set_tensor(self, name: str, t: torch.Tensor) -> None:
        if name == "bias":
            self.bias = nn.Parameter(t, requires_grad=False)
        else:
            # safetensors places tensors 8-byte aligned; torch's AVX-512 int8 kernel reads its
            # weight with aligned 64-byte loads and crashes on anything less
            if t.data_ptr() % 64:
                t = t.clone()
            self.register_buffer(name, t, persistent=False)
            self._names.append(name)
        self._qmatrix = None

    def _apply(self, fn, *args, **kwargs):
        self._qmatrix = None  # .to() and friends replace the buffers
        # They may move the stored format, never cast it: model.to(torch.float32) used to turn fp16
        # scales into fp32 ones the kernels then read as fp16 (wrong logits).
        dtypes = {n: b.dtype for n, b in self._buffers.items() if b is not None}
        out = super()._apply(fn, *args, **kwargs)
        for n, dtype in dtypes.items():
            if self._buffers[n] is not None and self._buffers[n].dtype != dtype:
                self._buffers[n] = self._buffers[n].to(dtype)
        return out

    def qmatrix(self) -> QMatrix:
        if self._qmatrix is None:
            m = self.meta
            self._qmatrix = QMatrix(m["fmt"], m["n"], m["k"], m["bits"], m["group"],
                                    {n: getattr(self, n) for n in self._names})
        return self._qmatrix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.linear(x, self.qmatrix())
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.meta['fmt']} {self.meta['bits']}-bit"


class StoredEmbedding(nn.Module):
    """The input embedding table at its stored width (bf16 in every quantized store), mapped from the
    store's file where it can be: only the rows a step looks up are read into memory (a 32k x 1024
    table was 125 MiB in fp32). Looked-up rows are cast to the model's dtype, which gives the same
    values as casting the table first. `weight` is a buffer, not a parameter: transformers takes a
    model's dtype from its first floating-point parameter, and this one is narrower."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, padding_idx: int | None = None,
                 mapping: _Mapping | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx, self.out_dtype, self.mapping = padding_idx, dtype, mapping
        self.register_buffer("weight", weight)

    @property
    def mapped(self) -> bool:
        return self.mapping is not None

    def read_ahead(self) -> None:
        """Have the kernel read the whole mapped table in the background, so that no later lookup
        waits for the disk (for a model with room for every expert: the table is small beside them)."""
        if self.mapping is not None:
            self.mapping.advise(getattr(mmap, "MADV_WILLNEED", None))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx).to(self.out_dtype)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, stored {str(self.weight.dtype).removeprefix('torch.')}"
                f"{', mapped from the store' if self.mapped else ''}")


class OffloadRuntime:
    """What the offloaded model owns besides its modules: store, loader, cache, prefetcher, stats."""

    device = "cpu"  # where the dense part and the expert slots live
    hybrid: tiers.Hybrid | None = None  # CPU compute of experts that sit in host RAM (tiers.py)

    def __init__(self, store: Store, cache: ExpertCache, loader, prefetcher: Prefetcher | None, stats: OffloadStats):
        self.store, self.cache, self.loader, self.prefetcher, self.stats = store, cache, loader, prefetcher, stats
        self.mapped_tables: list[StoredEmbedding] = []  # read ahead by preload
        self.residuals: dict[int, torch.Tensor] = {}

    def close(self) -> None:
        self.loader.close()

    def holds_every_expert(self) -> bool:
        """Whether the cache has a slot for every expert of every MoE layer."""
        every = self.store.num_experts * len(self.store.moe_layers)
        return sum(len(pool.slots) for pool in self.cache.pools.values()) >= every

    def preload(self) -> bool:
        """Read every expert into a cache that holds them all, then start the statistics afresh:
        the decode then runs from its first token as the bench's `resident` mode does, the whole
        stack in one call (stack_decode.py), instead of waiting for every expert's first use (with
        128 experts a layer, some may never come). The mapped embedding table is read ahead meanwhile,
        so no lookup waits for the disk either. CPU tier only; False when nothing was done."""
        if self.device != "cpu" or isinstance(self.loader, tiers.HostCache) or not self.holds_every_expert():
            return False
        # Every read submitted at once keeps the loader's threads busy across layers (a layer at a
        # time through `stream`: quarter's 1,512 MiB 3.0-3.4 s against 2.2-2.8, qwen3-quarter's
        # 984 MiB 3.7 s against 1.4-1.5).
        for table in self.mapped_tables:
            table.read_ahead()
        reads = [f for layer in self.store.moe_layers for f in self.cache.fill(layer, range(self.store.num_experts))]
        for read in reads:
            read.result()  # a blob that fails its check raises the store's own error here
        self.stats.reset()
        return True


def slots_per_pool(store: Store, cfg: OffloadConfig) -> int:
    layers, experts, top_k, blob = store.num_layers, store.num_experts, store.top_k, store.blob_size
    if cfg.auto_budget():
        return auto_slots_per_pool(store, cfg)[0]
    budget = cfg.budget_bytes()
    pools = layers if cfg.cache_scope == "layer" else 1
    if cfg.experts_per_layer is not None:
        total = cfg.experts_per_layer * layers
    elif budget is not None:
        total = budget // blob
    else:
        total = max(top_k, math.ceil(experts / 4)) * layers  # a quarter of the experts
    per_pool = total // pools
    minimum = top_k  # the experts one token needs in one layer
    if per_pool < minimum:
        need = minimum * pools * blob
        raise MoeOffloadError(
            f"the expert cache holds {per_pool} expert(s) {'per layer' if pools > 1 else 'in all'}; the minimum is "
            f"{minimum} (the router's top-k), i.e. --experts-per-layer {minimum} or --expert-cache {need} "
            f"({format_size(need)}); one expert takes {blob} bytes")
    return min(per_pool, experts if pools > 1 else experts * layers)


def auto_slots_per_pool(store: Store, cfg: OffloadConfig, loaded: bool = False) -> tuple[int, str]:
    """`expert_cache="auto"`: slots per pool from the memory available now (memory.py), and the
    sentence saying what was chosen. `loaded`: the dense part is already in memory (load() sizes the
    cache after it); otherwise its stored size is counted as still to come."""
    if cfg.device != "cpu":  # VRAM: the dense part moves there after the cache is made, and each
        # product dequantizes its matrix on the device first (memory.DEVICE_DEQUANTIZE_BYTES_PER_WEIGHT)
        available = memory.available_device_memory(cfg.device)
        largest = max(m["n"] * m["k"] for m in _all_formats(store))
        still_needed = (memory.RUNTIME_RESERVE + store.manifest["dense_file_size"]
                        + memory.DEVICE_DEQUANTIZE_BYTES_PER_WEIGHT * largest)
    else:
        available = memory.available_memory()
        still_needed = (memory.RUNTIME_RESERVE + memory.numba_still_to_load({m["fmt"] for m in _all_formats(store)})
                        + (0 if loaded else store.manifest["dense_file_size"]))
    pools = store.num_layers if cfg.cache_scope == "layer" else 1
    return memory.auto_cache_slots(available.bytes, still_needed, store.blob_size, experts=store.num_experts,
                                   top_k=store.top_k, pools=pools, layers=store.num_layers, source=available.source)


def load(store: str | os.PathLike, *, device: str = "cpu", expert_cache: int | str | None = None,
         experts_per_layer: int | None = None, prefetch: int | None = None, lookahead: int = 1, policy: str = "lru",
         cache_scope: str = "layer", dtype: torch.dtype = torch.float32,
         host_cache: int | str | None = None, _tier_costs: tiers.TierCosts | None = None):
    """Load a store as a transformers PreTrainedModel whose experts are offloaded.

    `expert_cache` is the byte budget of the expert cache (int or "2GiB"), or "auto": as many experts
    as the memory available now allows (the cgroup limit or MemAvailable, less the dense part, a
    runtime reserve and a margin; memory.py), which is what the command line does by default.
    `experts_per_layer` is the other way to give a budget. With neither, the cache holds a quarter of
    the experts: the same on every machine, whatever else the calling process will allocate. The
    returned model has `offload_stats()` and `close()` besides everything transformers gives.

    `prefetch` experts are guessed and loaded ahead for each upcoming layer (0: none). By default 2,
    or none when the cache holds every expert: then nothing is left to load, and a decode without a
    prefetcher can take the whole stack in one call (stack_decode.py).

    `device="cuda"` puts the dense part, the KV cache and the expert slots (`expert_cache`: the VRAM
    budget) on the GPU, with a pinned host-RAM cache of `host_cache` bytes in front of the disk
    (README, "GPU tier"). With `device="cpu"` and a `host_cache`, the same three
    tiers run with the "device" slots in host memory (the stand-in the CPU tests use).
    """
    from transformers import AutoConfig, GenerationConfig

    cfg = OffloadConfig(device, expert_cache, experts_per_layer, prefetch, lookahead, policy, cache_scope)
    if device != "cpu" and not torch.cuda.is_available():
        raise MoeOffloadError(f"device {device!r}: this torch has no CUDA device (torch.cuda.is_available() is "
                              "False); use device='cpu' or a CUDA build of torch on a machine with a GPU")
    st = Store.open(store)
    config = AutoConfig.from_pretrained(st.path, local_files_only=True)
    int4pack_shapes = {(m["n"], m["k"]) for m in _all_formats(st) if m["fmt"] == "int4pack"}
    uses_int4pack = bool(int4pack_shapes)
    if uses_int4pack and st.manifest["int4pack_layout"] != int4pack_layout_id():
        raise MoeOffloadError(f"{st.path} was converted on a CPU whose int4 weight layout differs from this one's; "
                              "run `moe-offload convert` again on this machine")
    auto = cfg.auto_budget()
    per_pool = None if auto else slots_per_pool(st, cfg)  # a budget below the minimum fails here, before loading
    model = build_meta_model(config, moe.IMPLEMENTATION, dtype)
    spec = describe(model)
    if spec.moe_layers != st.moe_layers or spec.num_experts != st.num_experts:
        raise MoeOffloadError(f"{st.path} does not match its own config.json (MoE layers or experts differ): "
                              "convert again")

    stats = OffloadStats(st.moe_layers)
    loader, transport = _tiers(st, stats, device, host_cache)
    runtime = OffloadRuntime(st, None, loader, None, stats)  # the cache comes once the dense part is in
    runtime.device = device
    try:
        for layer in spec.layers:
            moe.attach(model.get_submodule(layer.experts), layer.index, runtime, spec.expert_params)
        _swap_quantized_linears(model, st.manifest["dense_linears"])
        release_free_heap()
        baseline = memory.rss_bytes()  # torch, transformers, the other libraries: before the model's tensors
        _load_dense(model, st, dtype)
        _rebuild_meta_buffers(model)
        model.tie_weights()
        _check_no_meta(model)
        release_free_heap()
        dense, mapped = memory.module_bytes(model)
        if auto:  # sized now, from what is really left once the dense part is in memory
            per_pool, stats.cache_choice = auto_slots_per_pool(st, cfg, loaded=True)
        runtime.cache = ExpertCache(st.moe_layers, per_pool, st.blob_size, loader, stats, cfg.cache_scope,
                                    st.layout.views, cfg.policy,
                                    **({"allocate": transport.allocate_device} if transport else {}))
        # by default nothing is guessed for a cache of every expert: nothing is left to load ahead
        prefetch = cfg.prefetch if cfg.prefetch is not None else (
            0 if runtime.holds_every_expert() else DEFAULT_PREFETCH)
        if cfg.prefetch is None and not prefetch and stats.cache_choice:
            stats.cache_choice += "; prefetch off: the cache holds every expert"
        runtime.prefetcher = _prefetcher(model, spec, runtime.cache, stats, cfg, prefetch) if prefetch else None
    except BaseException:
        loader.close()
        raise
    stats.memory = dict(baseline_bytes=baseline, dense_bytes=dense, dense_mapped_bytes=mapped,
                        cache_bytes=runtime.cache.buffer.numel())
    if not runtime.cache.buffer.is_cuda:
        stats.cache_touched = lambda: memory.resident_bytes(runtime.cache.buffer)
    if device != "cpu":
        model.to(device)
    first_experts = model.get_submodule(spec.layers[0].experts)._offload
    if (isinstance(loader, tiers.HostCache) and (_tier_costs is not None or device != "cpu")
            and first_experts.post_norm is None):  # a post-expert norm lives on the device only
        costs = _tier_costs or _measure_tier_costs(model, spec, st, transport, config.hidden_size, dtype)
        runtime.hybrid = tiers.Hybrid(loader, costs, stats)
    model.generation_config = _generation_config(st, config, GenerationConfig)
    model.eval()
    _install_hooks(model, runtime, spec)
    fast_decode = device == "cpu" and os.environ.get(STOCK_DECODE) != "1"
    if fast_decode:
        fast_decode = attention_decode.install(model) + norm_decode.install(model) + router_decode.install(model) > 0
        layer_decode.install(model)  # after the three above: it builds on their paths
        base_decode.install(model)  # after layer_decode: it hands whole tokens to its stack runner
    model.offload_runtime = runtime
    runtime.mapped_tables = [m for m in model.modules() if isinstance(m, StoredEmbedding) and m.mapped]
    model.offload_spec = spec
    model.offload_stats = MethodType(lambda self: self.offload_runtime.stats, model)
    model.close = MethodType(lambda self: self.offload_runtime.close(), model)
    # Kernels are built (or loaded from numba's cache) on first use, not here: int4pack's prefill
    # kernels (numba's unpacker, oneDNN's bf16 matmuls: ~140 MiB) are never paid for by a run whose
    # prompts stay short. Callers that time their first prompt call this before it (bench's warm-up,
    # generate): with `prompt_rows`, int4pack's prefill kernels only if that prompt will use them.
    uses_rowtile = any(m["fmt"] == "rowtile" for m in _all_formats(st))

    def warm_up(self, prompt_rows: int | None = None) -> None:
        if uses_rowtile and runtime.device == "cpu":
            from . import kernels_layer

            kernels_layer.warm_up()  # every run calls them; the first load costs ~0.5 s (LLVM), a compile 10 s or more
            if fast_decode:
                attention_decode.warm_up()
                stack_decode.warm_up()
        if prompt_rows is None or prompt_rows >= kernels_int4pack.PREFILL_ROWS:
            kernels_int4pack.warm_up(int4pack_shapes)
        if "numba" in sys.modules:  # LLVM's library pages served the kernels' loading only
            memory.page_out_mappings("libllvmlite")

    model.offload_warm_up = MethodType(warm_up, model)
    return model


def release_free_heap() -> None:
    """Hand the heap that loading freed (safetensors copies, casts) back to the system: glibc keeps
    freed memory in its arenas, where it still counts as this process's RSS."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _prefetcher(model, spec: MoeSpec, cache, stats, cfg, prefetch: int) -> Prefetcher | None:
    """Guesses need each MoE layer's router and the norm in front of it; families whose norm is
    unknown run without speculation."""
    if any(layer.norm is None or layer.router_args is None for layer in spec.layers):
        return None
    routers = {layer.index: router_call(model, layer) for layer in spec.layers}
    norms = {layer.index: model.get_submodule(layer.norm) for layer in spec.layers}
    # The embedding stands in for the first MoE layer's input only when no dense layer precedes it.
    embed = model.get_input_embeddings() if spec.moe_layers[0] == 0 else None
    return Prefetcher(cache, stats, routers, norms, prefetch, cfg.lookahead, embed)


def _all_formats(st: Store):
    yield from st.manifest["expert_layout"]["matrices"].values()
    yield from st.manifest["dense_linears"].values()


class _RouterCall:
    """A router as its MoE block calls it: the hidden states (flat [T, H], or [1, T, H] for routers
    that unpack a batch dimension), then the block's own tensors it needs; outputs come back flat."""

    def __init__(self, router, block, args: tuple[str, ...]):
        self.router, self.block, self.args, self.batched = router, block, args, False

    def __call__(self, h: torch.Tensor):
        extra = [getattr(self.block, name) for name in self.args]
        if not self.batched:
            try:
                return self.router(h, *extra)
            except (ValueError, RuntimeError):
                self.batched = True
        out = self.router(h.unsqueeze(0), *extra)
        return tuple(t.reshape(-1, t.shape[-1]) for t in out) if isinstance(out, tuple) else out.reshape(-1, out.shape[-1])


def router_call(model, layer) -> _RouterCall:
    return _RouterCall(model.get_submodule(layer.router), model.get_submodule(layer.router.rpartition(".")[0]),
                       layer.router_args)


def _swap_quantized_linears(model: nn.Module, dense_linears: dict) -> None:
    for name, meta in dense_linears.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        setattr(parent, attr, QuantLinear(meta, bias=getattr(old, "bias", None) is not None))


def _load_dense(model: nn.Module, st: Store, dtype: torch.dtype) -> None:
    from safetensors import safe_open

    embed_weight = _compact_embedding_name(model)
    with safe_open(st.path / DENSE_FILE, "pt") as f:
        for name in f.keys():
            module_name, _, attr = name.rpartition(".")
            if name == embed_weight:
                _set_stored_embedding(model, module_name, st.path / DENSE_FILE, name, f, dtype)
                continue
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                raise MoeOffloadError(f"the store holds {name}, which this model does not have: convert again") from None
            t = f.get_tensor(name)
            if isinstance(module, QuantLinear):
                module.set_tensor(attr, t)
            elif attr in module._parameters:
                module._parameters[attr] = nn.Parameter(t.to(dtype), requires_grad=False)
            else:
                module._buffers[attr] = t.to(dtype) if t.is_floating_point() else t


def _compact_embedding_name(model: nn.Module) -> str | None:
    """The input embedding's weight name if it can stay at its stored width: a plain nn.Embedding
    (families with their own embedding class, e.g. a scaled one, keep it) that no output layer shares."""
    embed = model.get_input_embeddings()
    if type(embed) is not nn.Embedding or embed.max_norm is not None:
        return None
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(text_config, "tie_word_embeddings", False) and not isinstance(model.get_output_embeddings(), QuantLinear):
        return None  # a tied lm_head multiplies by this table in the model's dtype
    return next((f"{n}.weight" for n, m in model.named_modules() if m is embed), None)


def _set_stored_embedding(model: nn.Module, module_name: str, path, name: str, f, dtype: torch.dtype) -> None:
    old = model.get_submodule(module_name)
    weight, mapping = _map_tensor(path, name) or (None, None)
    if weight is None:
        weight = f.get_tensor(name)
    if not weight.is_floating_point():
        weight = weight.to(dtype)
    parent_name, _, attr = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, StoredEmbedding(weight, dtype, old.padding_idx, mapping))


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


class _Mapping(NamedTuple):
    """Where a mapped tensor lies in its file's mapping."""
    mem: mmap.mmap
    start: int
    length: int

    def advise(self, advice: int | None) -> None:
        """madvise the tensor's pages (nothing where the system has no such advice)."""
        if advice is None or not hasattr(self.mem, "madvise"):
            return
        first = self.start - self.start % mmap.PAGESIZE
        try:
            self.mem.madvise(advice, first, self.start + self.length - first)
        except (OSError, ValueError):
            pass


def _map_tensor(path, name: str) -> tuple[torch.Tensor, _Mapping] | None:
    """One tensor of a safetensors file, mapped copy-on-write: pages are read on first touch and,
    being the file's, can be dropped again under memory pressure. None if it cannot be mapped.

    The pages are advised random: a lookup then reads the page it touches, not the kernel's usual
    read-around of the pages near it (measured on a cold page cache, quarter's table: 1.3 MB read a
    decode token, 1.3 ms a token slower, against 5 KB)."""
    try:
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            info = json.loads(f.read(header_size)).get(name)
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"]) if info else None
            if dtype is None:
                return None
            start, end = info["data_offsets"]
            offset = 8 + header_size + start
            size = dtype.itemsize
            if offset % size or (end - start) % size or end == start:
                return None
            mem = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # the tensor keeps the mapping alive
        mapping = _Mapping(mem, offset, end - start)
        mapping.advise(getattr(mmap, "MADV_RANDOM", None))
        tensor = torch.frombuffer(mem, dtype=dtype, count=(end - start) // size, offset=offset)
        return tensor.reshape(info["shape"]), mapping
    except (OSError, ValueError, KeyError):
        return None


def _rebuild_meta_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (rotary frequencies) are not in checkpoints: rebuild those modules."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)) and hasattr(module, "config"):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, type(module)(module.config))


def _check_no_meta(model: nn.Module) -> None:
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise MoeOffloadError(f"the store lacks {len(missing)} tensor(s) the model needs (e.g. {missing[0]}): "
                              "convert again")


def _generation_config(st: Store, config, GenerationConfig):
    if (st.path / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(st.path, local_files_only=True)
    return GenerationConfig.from_model_config(config)


class KeepResidual:
    """A pre-hook on the norm before an MoE block: keeps its input (the residual stream) for the
    prefetcher. It only observes, so the fused decode step (layer_decode.py) may call it itself
    with the same tensor instead of calling the norm as a module."""
    observes_only = True

    def __init__(self, residuals: dict, layer: int):
        self.residuals, self.layer = residuals, layer

    def __call__(self, module, args):
        self.residuals[self.layer] = args[0]


def _install_hooks(model: nn.Module, runtime: OffloadRuntime, spec: MoeSpec) -> None:
    """Capture the residual stream before each MoE norm (for prefetch), guess the first MoE layer's
    experts (from the dense layer before it, or for the next token from the logits), and time every
    forward."""
    first = spec.layers[0]
    if runtime.prefetcher is not None:
        for layer in spec.layers:
            model.get_submodule(layer.norm).register_forward_pre_hook(KeepResidual(runtime.residuals, layer.index))
        if first.index > 0:
            # Dense layers come first: the one just before the first MoE layer guesses for it.
            dense_norm = first.norm.replace(f".{first.index}.", f".{first.index - 1}.", 1)
            try:
                norm = model.get_submodule(dense_norm)
            except AttributeError:
                norm = None
            if norm is not None:
                def guess_first(module, args):
                    runtime.prefetcher.guess(first.index - 1, args[0])
                norm.register_forward_pre_hook(guess_first)
        else:
            def guess_next_token(module, args, logits):
                runtime.prefetcher.guess_first_layer(logits)
            model.get_output_embeddings().register_forward_hook(guess_next_token)

    stats = runtime.stats
    clock: dict[str, float] = {}

    def before(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        clock["tokens"] = ids.shape[0] * ids.shape[1]
        clock["prefill"] = ids.shape[1] > 1
        clock["start"] = time.perf_counter()

    on_gpu = runtime.device != "cpu"

    def after(module, args, kwargs, output):
        if on_gpu:  # the forward only queued its kernels: time them, not their launch
            torch.cuda.synchronize(runtime.device)
        seconds = time.perf_counter() - clock.pop("start", time.perf_counter())
        if clock.get("prefill"):
            stats.add(tokens_prefill=clock["tokens"], seconds_prefill=seconds)
        else:
            stats.add(tokens_decode=clock["tokens"], seconds_decode=seconds)
        runtime.residuals.clear()

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, with_kwargs=True)


# ---------------------------------------------------------------- the tiers (tiers.py)

def _tiers(st: Store, stats: OffloadStats, device: str, host_cache):
    """The loader the expert cache reads from, and the transport whose memory its slots use (None:
    the CPU path, slots in page-aligned host memory read straight from disk, as before tiers).
    CUDA: disk -> pinned host cache (a few staging slots when no host budget is given) -> VRAM."""
    disk = DiskLoader(st, stats)
    if device == "cpu" and host_cache is None:
        return disk, None
    if device == "cpu":
        transport = tiers.HostCopy()  # the CPU stand-in of the three tiers
    else:
        from .transport_cuda import CudaTransport  # the only import of CUDA code, on request

        transport = CudaTransport(device)
    slots = 0 if host_cache is None else parse_size(host_cache) // st.blob_size
    return tiers.HostCache(disk, slots, st.blob_size, stats, transport, st.layout.views), transport


def _measure_tier_costs(model, spec: MoeSpec, st: Store, transport, hidden_size: int, dtype) -> tiers.TierCosts:
    """What the hybrid decision needs, measured now: host -> device copies of one blob, and the CPU
    kernels' time for one expert at one token (on the first expert's blob, read without the cache)."""
    layer = spec.layers[0]
    blob = st.blob(layer.index, 0)
    with open(st.path / EXPERTS_FILE, "rb") as f:
        f.seek(blob["offset"])
        data = torch.frombuffer(bytearray(f.read(blob["size"])), dtype=torch.uint8)
    expert = model.get_submodule(layer.experts)._offload.expert
    cpu_seconds = tiers.measure_cpu_expert(expert, st.layout.views(data), hidden_size, dtype)
    copy_bytes_per_s, copy_latency = transport.measure(st.blob_size)
    return tiers.TierCosts(copy_bytes_per_s, copy_latency, cpu_seconds)

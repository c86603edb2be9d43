"""The experts seam: offloaded experts for every family whose experts class uses it.

transformers routes each decorated experts module's forward, `experts(hidden[T, H],
top_k_index[T, k], top_k_weights[T, k]) -> [T, H]`, through `ALL_EXPERTS_FUNCTIONS` by the name
in `config._experts_implementation`. We register "moe_offload": the stock module stays in the
model (its expert tensors removed), so its flags and its own gating (`_apply_gate`, e.g. gpt-oss's
clamped SwiGLU) and post-expert norm still apply, while the weights come from the cache slots.
"""
from __future__ import annotations

import sys
from importlib.util import find_spec

import numpy as np
import torch


def _import_cache_utils_without_hqq() -> None:
    """transformers' cache_utils imports hqq whenever hqq is installed (ours is a test dependency: the
    oracle of quant.hqq_codes), for an HQQ-quantized KV cache we never use; hqq in turn imports
    torch._inductor: ~25 MiB of resident memory and ~0.5 s in every process that loads a model.
    Import cache_utils first with transformers believing hqq absent; the flag is restored right
    after, so transformers' HqqConfig still sees hqq (only cache_utils' HQQ KV cache stays off
    in a process that imported moe_offload before it)."""
    if "transformers.cache_utils" in sys.modules or find_spec("hqq") is None:
        return
    import transformers.utils as utils

    original = utils.is_hqq_available
    utils.is_hqq_available = lambda *args, **kwargs: False
    try:
        import transformers.cache_utils  # noqa: F401
    finally:
        utils.is_hqq_available = original


_import_cache_utils_without_hqq()

from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, _default_apply_gate  # noqa: E402

from . import archs, kernels, kernels_layer  # noqa: E402
from .quant import QMatrix  # noqa: E402

IMPLEMENTATION = "moe_offload"


class LayerExperts:
    """One MoE layer's offloaded experts: attached to the stock experts module as `_offload`."""

    def __init__(self, layer: int, module: torch.nn.Module, runtime):
        self.layer, self.runtime = layer, runtime
        self.num_experts = module.num_experts if hasattr(module, "num_experts") else runtime.store.num_experts
        self.post_norm = module.post_expert_norm if module.has_post_expert_norm else None
        act = getattr(module, "act_fn", None)
        # The stock gating is SwiGLU on concatenated halves: let the kernel fuse it (same arithmetic);
        # any other gating (or a plain activation for gate-less experts) is the family's own code.
        self.fused_act = act if module.has_gate and type(module)._apply_gate is _default_apply_gate else None
        self.gate = None if self.fused_act is not None else (module._apply_gate if module.has_gate else act)
        # "rowtile" SwiGLU experts without biases or post-norm: one kernel call per layer at decode,
        # per layer (or per expert, when the pool is smaller than the prompt's experts) at prefill.
        layout = runtime.store.layout.matrices
        self.layer_call = (layout["gate_up"]["fmt"] == layout["down"]["fmt"] == "rowtile" and self.fused_act is not None
                           and self.post_norm is None and "gate_up_bias" not in layout
                           and kernels_layer.is_silu(self.fused_act) and runtime.device == "cpu")
        if self.layer_call:  # checked once here: every slot holds this layout
            shapes = [QMatrix(**{k: layout[n][k] for k in ("fmt", "n", "k", "bits", "group")}) for n in ("gate_up", "down")]
            self.shape = kernels_layer.layer_shape(*shapes)
            self.tag = None  # the kernel variant, read at the first call (numba loads lazily)
            self.slot_addrs: dict[int, tuple[int, int]] = {}  # slot index -> its gate_up and down tile addresses
            # every expert's tile addresses while all are resident (resident_table), and the cache's
            # change count they were read at
            self.table, self.table_at = None, -1

    def expert(self, x: torch.Tensor, w: dict) -> torch.Tensor:
        y = kernels.expert_forward(x, w["gate_up"], w["down"], self.fused_act,
                                   gate=self.gate,
                                   gate_up_bias=w.get("gate_up_bias"), down_bias=w.get("down_bias"))
        return y if self.post_norm is None else self.post_norm(y)

    def __call__(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # generate() has turned gradients off already: no context to enter
            with torch.no_grad():
                return self(hidden_states, top_k_index, top_k_weights)
        rt = self.runtime
        decode = hidden_states.shape[0] == 1
        if decode:
            # One token: no gather/scatter. index_add_ costs ~30x a plain add at this size (measured).
            weight_of, used = self._weight_of(top_k_index[0].tolist(), top_k_weights[0].tolist())
        else:
            used = [e for e in torch.unique(top_k_index).tolist() if e < self.num_experts]
        self._speculate(used)
        # Hybrid (tiers.py): experts that miss the device but sit in host RAM, computed on the CPU when
        # that beats copying them; their host slots stay pinned until they are computed.
        on_cpu = {} if rt.hybrid is None or self.post_norm is not None else (
            rt.hybrid.take(rt.cache, self.layer, used, hidden_states.shape[0]))
        if on_cpu:
            try:
                return self._forward(hidden_states, top_k_index, top_k_weights, decode,
                                     weight_of if decode else None, used, on_cpu)
            finally:
                rt.hybrid.release(on_cpu)
        if self.layer_call and used and not kernels.reference_mode():
            if decode:
                x = hidden_states[0]
                y = self._decode_call(x.numpy() if x.dtype == torch.float32 and x.is_contiguous()
                                      else x.float().contiguous().numpy(), used, weight_of)
                return torch.from_numpy(y).view(1, -1).to(hidden_states.dtype)
            return self._rows_call(hidden_states, top_k_index, top_k_weights, used)
        return self._forward(hidden_states, top_k_index, top_k_weights, decode, weight_of if decode else None, used)

    def _weight_of(self, index: list[int], weights: list[float]) -> tuple[dict, list[int]]:
        """One token's expert -> weight, and its experts in order."""
        weight_of = dict(zip(index, weights))
        if len(weight_of) < len(index):  # an expert chosen twice (not by a top-k): its weights add up
            weight_of = {}
            for e, w in zip(index, weights):
                weight_of[e] = weight_of.get(e, 0.0) + w
        return weight_of, sorted(e for e in weight_of if e < self.num_experts)

    def decode_step(self, h, index, weights):
        """__call__ for one token as numpy arrays (h [H] fp32, index and weights [k]), for the fused
        decoder layer (layer_decode.py): y [H] fp32, with the same bookkeeping (the prefetcher's guess
        and score, the cache's hits and misses) and the same floats. None, with nothing done, when the
        layer is not one kernel call or the runtime has a hybrid tier (the caller then makes the module
        call). Misses are read here too: a step that waits for the disk skips the module call's
        tensor conversions as well."""
        rt = self.runtime
        if not self.layer_call or rt.hybrid is not None or kernels.reference_mode():
            return None
        weight_of, used = self._weight_of(index.tolist(), weights.tolist())
        if not used:  # (the experts' module call: its general path sums nothing)
            return None
        self._speculate(used)
        return self._decode_call(h, used, weight_of)

    def resident_table(self):
        """(table [2, E] int64 of every expert's gate_up and down tile addresses, the layer shape,
        the cache's change count it was read at, the slots) when every expert of the layer is resident and loaded and nothing else decides a step's
        experts (no prefetcher, no hybrid tier): the fused layer step then computes the experts in
        its attention call (attention_decode.attend_route). Else None. Read again only after the
        cache's residency changed (or while an expert is still loading)."""
        rt = self.runtime
        if not self.layer_call or rt.prefetcher is not None or rt.hybrid is not None or kernels.reference_mode():
            return None
        cache = rt.cache
        if self.table_at == cache.changes:
            return self.table
        with cache.lock:
            changes = cache.changes
            pool = cache.pool(self.layer)
            slots = None if len(pool.slots) < self.num_experts else cache.loaded_slots(self.layer, range(self.num_experts))
            loading = slots is None and len(pool.slots) >= self.num_experts and all(
                cache.contains(self.layer, e) for e in range(self.num_experts))
        self.table = None if slots is None else (
            np.array([self.slot_addrs.get(s.index) or self._addrs(s) for s in slots], np.int64).T.copy(), self.shape,
            changes, slots)
        self.table_at = -1 if loading else changes  # a load completes without a change: look again
        return self.table

    def record_resident(self, index: np.ndarray, table) -> bool:
        """The bookkeeping of a step computed from resident_table()'s `table` (hits, LRU order,
        uses), if the cache's residency did not change since it was read (another thread's step
        could have evicted a slot mid-call); False, with nothing recorded, if it did."""
        cache = self.runtime.cache
        with cache.lock:
            if cache.changes != table[2]:
                return False
            self.record_resident_locked(index, table)
        return True

    def record_resident_locked(self, index: np.ndarray, table) -> None:
        self.runtime.cache.record_hits(*self.resident_step(index, table))

    def resident_step(self, index: np.ndarray, table) -> tuple[int, list[int], list]:
        """(layer, the experts of `index` in expert order, their slots): a step computed from
        resident_table()'s `table`, as the cache books it."""
        used = sorted(index.tolist())
        return self.layer, used, [table[3][e] for e in used]

    def _speculate(self, used: list[int]) -> None:
        """The prefetcher's part of a step: guess the next layers from the residual stream kept before
        this layer's MoE norm (their reads start before this layer computes), and score this layer's
        guesses against `used`."""
        pf = self.runtime.prefetcher
        if pf is None:
            return
        residual = self.runtime.residuals.pop(self.layer, None)
        if residual is not None:
            pf.guess(self.layer, residual)
        pf.score(self.layer, set(used))

    def _decode_call(self, x, used: list[int], weight_of: dict):
        """One token's y [H] fp32 for x [H] fp32 by one kernel call: every expert of `used` (sorted, so
        summed in expert order) pinned at once, resident ones without the stream's generator."""
        cache = self.runtime.cache
        slots = cache.pin_resident(self.layer, used)
        if slots is not None:
            try:
                return self._kernel(x, [self.slot_addrs.get(s.index) or self._addrs(s) for s in slots], used, weight_of)
            finally:
                cache.unpin(slots)
        stream = cache.stream(self.layer, used, hold=True)
        try:
            got = dict(next(stream) for _ in used)
            return self._kernel(x, [_tile_addrs(got[e]) for e in used], used, weight_of)
        finally:
            stream.close()

    def _kernel(self, x, addrs, used, weight_of):
        if self.tag is None:
            self.tag = kernels_layer._tag(kernels_layer.variant())
        return kernels_layer.moe_layer_decode_at(x, self.shape, [a for a, _ in addrs], [b for _, b in addrs],
                                                 [weight_of[e] for e in used], self.tag)

    def _forward(self, hidden_states, top_k_index, top_k_weights, decode: bool, weight_of, used, on_cpu=None):
        # Outputs are summed in expert order, not in the order the cache delivers them: the float sum
        # is then the same whatever the cache holds, and so are the tokens of every cache size.
        rt = self.runtime
        outputs = {}
        if on_cpu:
            used = [e for e in used if e not in on_cpu]
        for expert, weights in (rt.cache.stream(self.layer, used) if used or not on_cpu else ()):
            if decode:
                outputs[expert] = (None, self.expert(hidden_states, weights).mul_(weight_of[expert]))
                continue
            token_idx, k_pos = torch.where(top_k_index == expert)
            y = self.expert(hidden_states[token_idx], weights)
            outputs[expert] = (token_idx, y * top_k_weights[token_idx, k_pos, None])
        if on_cpu:  # after the device's experts were launched: on a GPU the two run at once
            self._on_cpu(hidden_states, top_k_index, top_k_weights, weight_of, on_cpu, outputs)
        out = None if decode else torch.zeros_like(hidden_states)
        for expert in sorted(outputs):
            token_idx, y = outputs[expert]
            if decode:
                out = y if out is None else out.add_(y)
            else:
                out.index_add_(0, token_idx, y.to(out.dtype))
        return out if out is not None else torch.zeros_like(hidden_states)

    def _on_cpu(self, hidden_states, top_k_index, top_k_weights, weight_of, on_cpu: dict, outputs: dict) -> None:
        """The experts of `on_cpu` (expert -> (host slot, views)) computed on the CPU, their outputs moved
        to the device. On the CPU stand-in every move is a no-op and the arithmetic is the device path's."""
        x = hidden_states.cpu()
        for expert, (_, weights) in on_cpu.items():
            if weight_of is not None:
                y = self.expert(x, weights).mul_(weight_of[expert])
                outputs[expert] = (None, y.to(hidden_states.device))
                continue
            token_idx, k_pos = torch.where(top_k_index == expert)
            y = self.expert(x[token_idx.cpu()], weights).to(hidden_states.device)
            outputs[expert] = (token_idx, y * top_k_weights[token_idx, k_pos, None])

    def _addrs(self, slot) -> tuple[int, int]:
        a = self.slot_addrs[slot.index] = _tile_addrs(slot.views)
        return a

    def _rows_call(self, hidden_states, top_k_index, top_k_weights, used: list[int]) -> torch.Tensor:
        """Prefill: each used expert computed for all its token rows by the one-layer kernel. When the
        pool holds every used expert, they are pinned together and computed by one call; otherwise
        one call per expert as the cache delivers them (a load overlapping the last expert's compute),
        each into its own buffer, summed in expert order. Either way the floats are the same."""
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)[:self.num_experts].tolist()
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        rows = order // top_k_index.shape[1]
        weights = top_k_weights.reshape(-1)[order]
        T, H = hidden_states.shape
        cache = self.runtime.cache

        def compute(chunk, got, out):
            lo, hi = starts[chunk[0]], starts[chunk[-1] + 1]  # experts between have no rows
            offsets = [starts[e] - lo for e in chunk] + [hi - lo]
            return kernels_layer.moe_layer_rows(hidden_states, [(w["gate_up"], w["down"]) for _, w in got],
                                                rows[lo:hi], weights[lo:hi], offsets, out=out)

        if len(used) <= len(cache.pool(self.layer).slots):
            stream = cache.stream(self.layer, used, hold=True)
            try:
                got = sorted((next(stream) for _ in used), key=lambda pair: pair[0])
                out = compute(used, got, torch.zeros(T, H))
            finally:
                stream.close()
        else:
            outputs = {e: compute([e], [(e, w)], torch.zeros(T, H)) for e, w in cache.stream(self.layer, used)}
            out = torch.zeros(T, H)
            for e in sorted(outputs):
                out += outputs[e]
        return out.to(hidden_states.dtype)


def _tile_addrs(views: dict) -> tuple[int, int]:
    """The gate_up and down tile addresses of one slot's views (what the layer kernel reads)."""
    return views["gate_up"].tensors["tiles"].data_ptr(), views["down"].tensors["tiles"].data_ptr()


def offloaded_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    return self._offload(hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, offloaded_experts_forward)


def attach(module: torch.nn.Module, layer: int, runtime, expert_params) -> None:
    """Make a stock experts module offloaded: drop its expert tensors (on the meta device, they cost
    nothing, but they must not look like weights the store lacks) and hand its calls to the cache."""
    for name in expert_params:
        del module._parameters[name]
    module._offload = LayerExperts(layer, module, runtime)
    # Called straight from the module's __call__: transformers' experts wrapper only looks up the
    # implementation registered above (config attribute reads: ~10 us a call at decode). A class
    # that wraps the seam in its own forward keeps it (it reaches us through the registry).
    if archs.seam_forward_is_own(module):
        module.forward = module._offload


def is_direct(module: torch.nn.Module) -> bool:
    """Whether calling the offloaded experts module is calling its LayerExperts, nothing around it."""
    return "_offload" in module.__dict__ and module.__dict__.get("forward") is module._offload

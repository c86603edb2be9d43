"""A decode token's attention in two kernel calls instead of ~40 torch operations.

At decode (one token, batch 1, no mask) transformers' attention spends ~0.35 ms a layer on the
quarter shape, mostly in per-operation overhead around four small products: the rotary embedding,
the cache's concatenation, SDPA and a dozen views. Here the q/k/v products, their bias, q/k norm
and rotary embedding run in one numba call (_decode_jit.qkv), the softmax over the cache and the
output product in a second (attend_o); the KV cache stays transformers' own (its update() is
called as the model would), so generate() and everything around it are untouched.

Which modules take this path is read off the modules, not a family table: any attention module
whose children are q/k/v/o projections in the "rowtile" format (plus optional q_norm/k_norm RMSNorms)
and that owns no tensor of its own (gpt-oss's sinks, for one, keep the stock path). Each module
then checks itself on its first decode call: it runs transformers' own forward, recomputes the
same step here from the cache that forward just wrote, and takes the fast path from then on only
if both agree (keys, values and the attention before the output product to float rounding; the
output to the int8 rounding of its activations). Any other call (prefill, batches, a mask, another
cache layout, kernels.use_reference()) goes to transformers' forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import kernels, kernels_grouped, kernels_layer
from .decode_path import close, jit, rms_norm_eps, take_forward

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_NORMS = ("q_norm", "k_norm")
_WHOLE_LAYERS: tuple = ()  # transformers' cache layers _dynamic_layer accepts, imported by install()


@dataclass
class _Plan:
    """What the kernels read of one attention module (numpy views of its tensors)."""

    qms: tuple  # the four QMatrix objects the views come from
    tiles: tuple  # q, k, v, o tiles
    biases: tuple  # q, k, v, o bias or empty
    norms: tuple  # q_norm, k_norm weights or empty
    eps: float
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    tag: np.ndarray  # the kernel variant (kernels_layer.variant()), read when the plan is made
    sources: tuple = ()  # the q_norm/k_norm weight parameters the norms were read from

    def __post_init__(self):
        # The kernels do not check bounds: every buffer they write must hold what the shapes say.
        q, k, v, o = self.qms
        hd = self.head_dim
        if not (q.n == self.heads * hd and k.n == v.n == self.kv_heads * hd and o.k == q.n
                and self.kv_heads and self.heads % self.kv_heads == 0
                and all(n.shape[0] in (0, hd, m.n) for n, m in zip(self.norms, (q, k)))):
            raise ValueError(f"inconsistent attention shapes: q {q.n}, k {k.n}, v {v.n}, o in {o.k}, "
                             f"{self.heads} heads of {hd}, {self.kv_heads} KV heads")

    def current(self, module: nn.Module) -> bool:
        """Whether the module still holds the tensors this plan read (a QuantLinear rebuilds its
        QMatrix when its tensors change; a norm weight may be replaced by assignment)."""
        if module._modules["q_proj"]._qmatrix is not self.qms[0]:
            return False
        q, k = self.sources
        return ((q is None or module._modules["q_norm"]._parameters.get("weight") is q)
                and (k is None or module._modules["k_norm"]._parameters.get("weight") is k))


def _empty() -> np.ndarray:
    return np.zeros(0, np.float32)


def _why_not(module: nn.Module) -> str | None:
    """None if the module has the shape this path computes, else why not."""
    from .model import QuantLinear

    children = dict(module.named_children())
    if not set(_PROJECTIONS) <= children.keys() or not children.keys() <= set(_PROJECTIONS + _NORMS):
        return f"children {sorted(children)}"
    if any(True for _ in module.named_parameters(recurse=False)) or any(True for _ in module.named_buffers(recurse=False)):
        return "tensors of its own"
    projs = [children[n] for n in _PROJECTIONS]
    if not all(isinstance(p, QuantLinear) and p.meta["fmt"] == "rowtile" for p in projs):
        return "projections not in the rowtile format"
    if len({(p.meta["bits"], p.meta["group"]) for p in projs[:3]}) > 1:
        return "q/k/v with different bits or groups"
    if not isinstance(getattr(module, "head_dim", None), int) or not isinstance(getattr(module, "layer_idx", None), int):
        return "no head_dim or layer_idx"
    hd, (q, k, v, o) = module.head_dim, (p.meta for p in projs)
    if q["n"] % hd or k["n"] % hd or k["n"] != v["n"] or o["k"] != q["n"] or (q["n"] // hd) % max(k["n"] // hd, 1):
        return "projection sizes that are not whole heads"
    if getattr(getattr(module, "config", None), "attn_logit_softcapping", None):
        return "logit soft-capping"
    for n in _NORMS:
        if n in children and rms_norm_eps(children[n]) is None:
            return f"{n} is not an RMSNorm with a weight"
    return None


def _plan(module: nn.Module) -> _Plan:
    projs = [getattr(module, n) for n in _PROJECTIONS]
    qms = tuple(p.qmatrix() for p in projs)
    hd = module.head_dim
    norms = tuple(getattr(module, n).weight.detach().float().contiguous().numpy() if hasattr(module, n) else _empty()
                  for n in _NORMS)
    eps = max((rms_norm_eps(getattr(module, n)) for n in _NORMS if hasattr(module, n)), default=0.0)
    return _Plan(qms, tuple(m.tensors["tiles"].numpy() for m in qms),
                 tuple(p.bias.detach().float().contiguous().numpy() if p.bias is not None else _empty() for p in projs),
                 norms, eps, qms[0].n // hd, qms[1].n // hd, hd, float(module.scaling),
                 kernels_layer._tag(kernels_layer.variant()),
                 tuple(getattr(module, n).weight if hasattr(module, n) else None for n in _NORMS))


def _project(plan: _Plan, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, norm: tuple | None = None):
    """q [heads*hd], k and v [kv_heads*hd] of one token's hidden state x [H]. Fresh arrays every call
    (a few hundred ns): two threads may decode with one model, as the experts' kernel allows.
    With norm = (weight, eps), the products are of RMSNorm(x), normed in the same call (layer_decode)."""
    (tq, tk, tv, _), (bq, bk, bv, _), (qn, kn) = plan.tiles, plan.biases, plan.norms
    yq, yk, yv = (np.empty(t.shape[0] * kernels_layer.ROWS, np.float32) for t in (tq, tk, tv))
    m = plan.qms[0]
    if (x.shape[0] != m.k or cos.shape[0] > plan.head_dim or cos.shape != sin.shape
            or (norm is not None and norm[0].shape != x.shape)):  # the kernels check no bounds
        raise ValueError(f"hidden state of {x.shape[0]} (projections take {m.k}), rotary tables {cos.shape}/{sin.shape}"
                         + (f", norm weight {norm[0].shape}" if norm is not None else ""))
    args = (m.bits, m.group, tq, tk, tv, yq, yk, yv, plan.heads, plan.kv_heads, plan.head_dim, bq, bk, bv, qn, kn,
            np.float32(plan.eps), cos, sin)
    if norm is None:
        jit().qkv(plan.tag, x, *args)
    else:  # eps as the norm's own path passes it (a Python float), for the same floats
        jit().norm_qkv(plan.tag, x, norm[0], norm[1], np.empty_like(x), *args)
    return yq[:m.n], yk[:plan.qms[1].n], yv[:plan.qms[2].n]


def _attend(plan: _Plan, q: np.ndarray, keys: torch.Tensor, values: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """softmax(q K^T * scale) V over the cache, then the output product: ([H] fp32, the attention before it)."""
    o = plan.qms[3]
    keys, values = _array(keys), _array(values)
    _check_cache(plan, keys, values, keys.shape[1])
    if q.shape[0] != o.k:
        raise ValueError(f"{q.shape[0]} query values for an output projection of {o.k}")
    y, attention = np.empty(plan.tiles[3].shape[0] * kernels_layer.ROWS, np.float32), np.empty(o.k, np.float32)
    jit().attend_o(plan.tag, q, keys, values, keys.shape[1],
                   np.float32(plan.scale), plan.tiles[3], o.bits, o.group, plan.biases[3], attention, y)
    return y[:o.n], attention


def attend_route(plan: _Plan, q: np.ndarray, keys: np.ndarray, values: np.ndarray, length: int, x: np.ndarray,
                 norm: tuple, router: tuple, renorm: bool, experts: tuple | None = None):
    """A decoder layer's middle in one call (layer_decode): the attention output y as _attend gives
    it over the first `length` positions of keys/values [KV, >= length, hd], the residual x + y, its
    RMSNorm with norm = (weight, eps), and a top-k router = (weight, bias or empty, k) on that.
    Returns (x + y, its norm, router logits [E], top-k weights [k], indices [k]).
    With experts = (table [2, E] int64, layer shape, ...): the tile addresses of every expert of the
    layer (all resident) and their kernels_layer.layer_shape(); the routed experts are then
    computed in the same call (the plan's kernel variant) and added into the returned x + y, with
    the floats of moe.LayerExperts' one kernel call."""
    o, (rw, rb, k) = plan.qms[3], router
    _check_cache(plan, keys, values, length)
    if (q.shape[0] != o.k or x.shape[0] != o.n or norm[0].shape != x.shape or rw.shape[1] != o.n
            or rb.shape[0] not in (0, rw.shape[0]) or not 0 < k <= rw.shape[0]):
        raise ValueError(f"{q.shape[0]} query values for an output projection of {o.k} -> {o.n}, hidden state "
                         f"{x.shape[0]}, norm {norm[0].shape}, router {rw.shape} top-{k}")
    y = np.empty(plan.tiles[3].shape[0] * kernels_layer.ROWS, np.float32)
    x2, h = np.empty_like(x), np.empty_like(x)
    logits, scores, idx = np.empty(rw.shape[0], np.float32), np.empty(k, np.float32), np.empty(k, np.int64)
    args = (plan.tag, q, keys, values, length, np.float32(plan.scale), plan.tiles[3], o.bits, o.group, plan.biases[3],
            np.empty(o.k, np.float32), y, x, x2, norm[0], norm[1], h, rw, rb, k, renorm, logits, scores, idx)
    if experts is None:
        jit().attend_route(*args)
        return x2, h, logits, scores, idx
    table, (H, inter, meta) = experts[0], experts[1]
    if table.shape != (2, rw.shape[0]) or table.dtype != np.int64 or H != x.shape[0]:
        raise ValueError(f"expert table {table.shape} for a router of {rw.shape[0]} experts, experts of hidden {H}")
    nthreads = kernels_layer._threads(None)
    bbuf, fbuf, counters, addrs = kernels_layer._workspace(H, inter, k, meta[1], meta[4], nthreads)
    jit().attend_route_experts(*args, table, np.empty(k, np.float32), meta, inter, bbuf, fbuf, counters, addrs,
                               nthreads)
    return x2, h, logits, scores, idx


def _check_cache(plan: _Plan, keys: np.ndarray, values: np.ndarray, length: int) -> None:
    if (keys.shape != values.shape or keys.ndim != 3 or keys.shape[0] != plan.kv_heads or keys.shape[-1] != plan.head_dim
            or not 0 < length <= keys.shape[1] or not (keys.flags.c_contiguous and values.flags.c_contiguous)):
        raise ValueError(f"cache of shape {tuple(keys.shape)}/{tuple(values.shape)} ({length} used) for {plan.kv_heads} "
                         f"KV heads of {plan.head_dim}")  # the kernels check no bounds


def _array(t: torch.Tensor) -> np.ndarray:
    """[1, KV, S, hd] -> [KV, S, hd] array; the cache's concatenations are contiguous already."""
    return t.numpy()[0] if t.is_contiguous() else t[0].contiguous().numpy()


def attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """The plain version of attend_o's first half: q [heads*hd], keys/values [1, KV, S, hd] -> [heads*hd]."""
    kv, hd = keys.shape[1], keys.shape[-1]
    qh = q.view(1, -1, 1, hd)
    rep = qh.shape[1] // kv
    k, v = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
    return torch.nn.functional.scaled_dot_product_attention(qh, k, v, scale=scale).reshape(-1)


def warm_up() -> None:
    """Load (the first time: compile) every decode kernel (attention, RMSNorm, router, the fused
    layer step's two, the second also with the experts) on tiny inputs with the argument types of
    real calls."""
    p = _tiny_plan()
    x, norm = np.ones(32, np.float32), (np.ones(32, np.float32), 1e-6)
    q, _, _ = _project(p, x, np.ones(32, np.float32), np.zeros(32, np.float32))
    _project(p, x, np.ones(32, np.float32), np.zeros(32, np.float32), norm)
    kv = torch.ones(1, 1, 1, 32)
    _attend(p, q, kv, kv)
    router = (np.ones((4, 32), np.float32), _empty(), 2)
    attend_route(p, q, kv[0].numpy(), kv[0].numpy(), 1, x, norm, router, True)
    gu = kernels_layer.quantize_rowtile(torch.ones(64, 32), 4, 32, optimize=False)
    dn = kernels_layer.quantize_rowtile(torch.ones(32, 32), 4, 32, optimize=False)
    table = np.array([[gu.tensors["tiles"].data_ptr()] * 4, [dn.tensors["tiles"].data_ptr()] * 4], np.int64)
    attend_route(p, q, kv[0].numpy(), kv[0].numpy(), 1, x, norm, router, True,
                 experts=(table, kernels_layer.layer_shape(gu, dn)))
    jit().rms_norm_rows(np.ones((1, 32), np.float32), np.ones(32, np.float32), 1e-6, np.empty((1, 32), np.float32))
    out = np.empty(4, np.float32), np.empty(2, np.float32), np.empty(2, np.int64)
    jit().topk_router(np.ones(32, np.float32), np.ones((4, 32), np.float32), _empty(), 2, True, *out)


def _tiny_plan() -> _Plan:
    """One head of 32 and one KV head, hidden size 32."""
    qms = tuple(kernels_layer.quantize_rowtile(torch.ones(32, 32), 4, 32, optimize=False) for _ in range(4))
    return _Plan(qms, tuple(m.tensors["tiles"].numpy() for m in qms), (_empty(),) * 4, (_empty(),) * 2, 1e-6,
                 1, 1, 32, 32 ** -0.5, kernels_layer._tag(kernels_layer.variant()))


def install(model: nn.Module) -> int:
    """Give every attention module of the shape above the decode path; returns how many."""
    global _WHOLE_LAYERS
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    _WHOLE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)
    n = 0
    for module in model.modules():
        if hasattr(module, "q_proj") and hasattr(module, "o_proj") and _why_not(module) is None:
            _DecodePath(module)
            n += 1
    return n


class _DecodePath:
    """Wraps one attention module's forward (see the module docstring)."""

    def __init__(self, module: nn.Module):
        take_forward(module, self)
        self.layer_idx = module.layer_idx
        self.plan: _Plan | None = None  # made again when the module's tensors change (_Plan.current)
        self.verified: bool | None = None  # None: not checked yet; False: transformers' path for good
        self.why: str | None = None

    def inputs(self, hidden_states, args, kwargs):
        """(plan, cache, cos, sin) if this call is one the kernels take, else None."""
        # Lean on purpose: at decode every attribute read can be a cache miss (the experts' weights
        # stream through the caches between two calls of a layer).
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        pe = kwargs.get("position_embeddings", args[0] if args else None)
        shape = hidden_states.shape
        if (self.verified is False or shape[0] != 1 or shape[1] != 1 or kwargs.get("attention_mask") is not None
                or pe is None or cache is None or hidden_states.dtype != torch.float32 or not hidden_states.is_cpu
                or hidden_states.requires_grad or self.module.training or kernels.reference_mode() or not _dynamic_layer(cache, self.layer_idx)):
            return None
        p = self.plan
        if p is None or not p.current(self.module):
            p = self.plan = _plan(self.module)
        return (p, cache, *_rotary(pe))

    def __call__(self, hidden_states, *args, **kwargs):
        got = self.inputs(hidden_states, args, kwargs)
        if got is None:
            return self.original(hidden_states, *args, **kwargs)
        p, cache, cos, sin = got
        x = hidden_states.numpy().reshape(-1) if hidden_states.is_contiguous() else hidden_states.reshape(-1).contiguous().numpy()
        if self.verified is None:
            return self._check(hidden_states, args, kwargs, cache, x, cos, sin)
        with kernels_grouped.launch_lock:
            q, k, v = _project(p, x, cos, sin)
        keys, values = cache.update(torch.from_numpy(k).view(1, p.kv_heads, 1, p.head_dim),
                                    torch.from_numpy(v).view(1, p.kv_heads, 1, p.head_dim), self.layer_idx)
        with kernels_grouped.launch_lock:
            y, _ = _attend(p, q, keys, values)
        return torch.from_numpy(y).view(1, 1, -1), None

    def _check(self, hidden_states, args, kwargs, cache, x, cos, sin):
        """transformers' forward (it writes the cache), then the same step here from that cache; the
        kernels' output if they agree, so that a step's floats do not depend on which call checked."""
        layer = cache.layers[self.module.layer_idx]
        before = (layer.keys, layer.values) if layer.is_initialized else None  # update() replaces, never writes into them
        out = self.original(hidden_states, *args, **kwargs)
        p = self.plan
        # what that forward attended to: the cache before it and the position it added
        keys, values = (t[..., -1:, :] for t in (layer.keys, layer.values))
        if before is not None:
            keys, values = torch.cat([before[0], keys], -2), torch.cat([before[1], values], -2)
        keys, values = keys.contiguous(), values.contiguous()
        with kernels_grouped.launch_lock:
            q, k, v = _project(p, x, cos, sin)
            y, core = _attend(p, q, keys, values)
        checks = {"keys": (k, keys[0, :, -1].reshape(-1), 1e-5), "values": (v, values[0, :, -1].reshape(-1), 1e-5),
                  "attention": (core, attention_reference(torch.from_numpy(q), keys, values, p.scale), 1e-5),
                  "output": (y, out[0].reshape(-1), 1e-2)}
        bad = [name for name, (a, b, tol) in checks.items() if not close(torch.from_numpy(np.asarray(a)), b, tol)]
        self.verified = not bad
        self.why = f"differs from transformers' forward in {', '.join(bad)}" if bad else None
        if not self.verified:
            return out
        # From here on the cache holds what the kernels write (transformers' q/k norm and rotary
        # round a few last bits differently), and this step attends to it, as every later step will.
        for cached, local, new in ((layer.keys, keys, k), (layer.values, values, v)):
            new = torch.from_numpy(new).view(1, p.kv_heads, p.head_dim)
            cached[:, :, -1] = new
            local[:, :, -1] = new
        with kernels_grouped.launch_lock:
            y, _ = _attend(p, q, keys, values)
        return torch.from_numpy(y).view(1, 1, -1), None


_last_rotary: list = [None]  # (pe, its arrays): every layer of a step gets the same (cos, sin) tuple


def _rotary(pe) -> tuple[np.ndarray, np.ndarray]:
    last = _last_rotary[0]
    if last is None or last[0] is not pe:
        last = _last_rotary[0] = pe, tuple(t.reshape(-1).float().contiguous().numpy() for t in pe)
    return last[1]


def _dynamic_layer(cache, idx: int) -> bool:
    """The cache layer's update() returns exactly the keys and values to attend to when no mask is
    given: transformers' DynamicLayer (every position), DynamicSlidingWindowLayer (the window). A
    static layer returns its whole buffer and relies on the mask; others are not assumed."""
    layers = getattr(cache, "layers", None)
    return layers is not None and idx < len(layers) and type(layers[idx]) in _WHOLE_LAYERS

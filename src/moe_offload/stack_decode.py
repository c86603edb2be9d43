"""A decode token's whole decoder stack in one kernel call.

When every decoder layer takes layer_decode's fused step with all its experts resident (no
prefetcher: the bench's `resident`, or `prefetch=0` with a cache of every expert), what separates a token
from its kernels' time is the Python between and around those steps: module calls, argument
checks, the KV and the cache's bookkeeping (~140 µs a layer on qwen3-quarter, measured). Here the
first layer's call computes every layer (_decode_jit.stack: the same kernels in the same order as
the fused steps, so the same floats), and each later layer's call hands that result on.

It is taken only after one token showed that the model calls these layers one after another, each
on the previous one's output, with one set of position embeddings (checked once, as each layer
checks its own composition), and only for a token where every layer would take the resident fused
step. The new KV positions are made visible and the cache's hits recorded after the call, so a
token it cannot finish (another thread changed the cache meanwhile) is computed again, unseen, by
the layers' own steps.
"""
from __future__ import annotations

import contextlib
import threading
from typing import NamedTuple

import numpy as np
import torch
from transformers.cache_utils import DynamicLayer

from . import kernels_grouped, kernels_layer, kv_buffer
from .decode_path import jit
from .stack_witness import Witness


class _Layer(NamedTuple):
    """What one layer's fused step would read on this token."""
    path: object  # layer_decode._LayerPath
    plan: object  # attention_decode._Plan
    n1w: np.ndarray  # the input norm's weight, and its eps as the norm's path passes it
    n1eps: float
    n2w: np.ndarray  # the MoE norm's
    n2eps: float
    route: tuple  # router weight, bias (or empty), top-k
    renorm: bool
    experts: object  # moe.LayerExperts
    table: tuple  # LayerExperts.resident_table()
    cache_layer: object  # the KV cache's layer
    buf: object  # its kv_buffer


class StackRunner:
    def __init__(self, paths: list):
        self.paths = paths  # the fused layer paths (layer_decode._LayerPath), in the model's order
        self.enabled: bool | None = None  # None until a token's calls were watched
        # per thread (two threads may decode with one model, each with its own cache):
        # watch: during the watched token, (path, position embeddings, output) per call;
        # pending: (the stack's output, index of the next layer to hand it to);
        # kv: (key, the KV buffers of the thread's cache as the kernel takes them, the buffers)
        self.local = threading.local()
        self.static = (None, None, None)  # (key, the per-layer arrays as the kernel takes them, the key's objects)

    def call(self, path, hidden_states, args, kwargs):
        """`path`'s output if the runner gives it (the stack's, or handing it on), else None."""
        local = self.local
        pending = getattr(local, "pending", None)
        if pending is not None:
            out, i = pending
            local.pending = (out, i + 1) if i + 1 < len(self.paths) else None
            if path is not self.paths[i] or hidden_states is not out or args:
                local.pending = None  # not what the watched token showed: nothing can redo the stack's step now
                raise RuntimeError("moe-offload: the decoder layers were not called in the order a decode token "
                                   "called them before; the stacked decode step cannot be handed on")
            return out
        if path is not self.paths[0] or self.enabled is False:
            return None
        local.watch = None
        got = self._inputs(hidden_states, args, kwargs)
        if got is None:
            return None
        if self.enabled is None:
            local.watch = []  # this token's layer calls show whether the stack may be taken
            return None
        out = self._run(hidden_states, *got)
        if out is not None and getattr(local, "seen", 0) is None:  # base_decode's check watches this token
            local.seen = (hidden_states, kwargs, out)
        return out

    def run(self, hidden_states, kwargs):
        """The whole stack on one token when no layer call follows (base_decode takes the base
        model's forward): its output, or None if it does not take this token."""
        if self.enabled is not True or getattr(self.local, "pending", None) is not None:
            return None
        got = self._inputs(hidden_states, (), kwargs)
        return None if got is None else self._run(hidden_states, *got, hand_on=False)

    def watching(self) -> bool:
        return getattr(self.local, "watch", None) is not None

    def saw(self, path, hidden_states, kwargs, out) -> None:
        """A watched token's layer call: the stack is taken from the next token on if the calls were
        the paths in order, each on the previous output, with the same position embeddings."""
        w = self.local.watch
        i = len(w)
        pe = kwargs.get("position_embeddings")
        if (i >= len(self.paths) or path is not self.paths[i] or (i and (hidden_states is not w[-1][2] or pe is not w[0][1]))
                or kwargs.get("attention_mask") is not None or not isinstance(out, torch.Tensor)):
            self.local.watch, self.enabled = None, False
            return
        w.append((path, pe, out))
        if len(w) == len(self.paths):
            self.local.watch, self.enabled = None, True

    def _inputs(self, hidden_states, args, kwargs):
        """(cos, sin, position, per-layer state, cache change count) if every layer would take the
        resident fused step on this token, else None."""
        if args or not hidden_states.is_contiguous():
            return None
        got = self.paths[0].attn._decode_path.inputs(hidden_states, (), kwargs)
        if got is None:
            return None
        _, cache, cos, sin = got
        local = self.local
        w = getattr(local, "witness", None)
        if w is not None and self.paths[0]._ready(hidden_states, kwargs):  # the token's own conditions
            n = w.holds(cache)
            if n is not None:
                return cos, sin, n, w.layers, w.changes
        local.witness = None
        layers, n, runtime = [], None, None
        for path in self.paths:
            a, n1, n2, r = path.attn._decode_path, path.n1, path.n2, path.router
            m = path.module  # hooks on a layer would see the stack's output as every layer's
            if (path.verified is not True or not path.fused or not path._ready(hidden_states, kwargs)
                    or m._forward_hooks or m._forward_pre_hooks or not path._fusable() or n2._forward_pre_hooks):
                return None
            p = a.plan
            w1, w2, route = n1._decode_path.weight(), n2._decode_path.weight(), r._decode_path.current()
            e = path.experts._offload
            table = e.resident_table()
            if (p is None or not p.current(a.module) or w1 is None or w2 is None or route is None or table is None
                    or table[0].shape[1] != route[0].shape[0] or a.layer_idx >= len(cache.layers)):
                return None
            layer = cache.layers[a.layer_idx]
            # (the first token after a prompt takes the prompt's keys and values into a buffer here)
            buf = kv_buffer.ready(layer, p.kv_heads * p.head_dim) if type(layer) is DynamicLayer else None
            if buf is None or (n is not None and buf.length != n):
                return None
            n, runtime = buf.length, e.runtime
            layers.append(_Layer(path, p, w1, n1._decode_path.eps, w2, n2._decode_path.eps, route,
                                 r._decode_path.renorm, e, table, layer, buf))
        changes = runtime.cache.changes
        if any(s.table[2] != changes for s in layers):
            return None
        local.witness = Witness.of(cache, layers, changes)  # the next token checks that this still holds
        return cos, sin, n, layers, changes

    def _arrays(self, layers):
        """(the per-layer arrays and scalars of _decode_jit.stack, rebuilt when any layer's changed,
        or None if the layers differ in what the kernel takes as one: heads, top-k, expert shape...;
        this thread's KV buffers as typed lists, rebuilt when one grew)."""
        key = tuple(id(o) for s in layers for o in (s.plan, s.n1w, s.n2w, s.route, s.table[0]))
        static = self.static
        if key != static[0]:  # (the key's objects are held with it: their ids stay theirs)
            static = self.static = (key, _static(layers), [o for s in layers for o in (s.plan, s.n1w, s.n2w, s.route, s.table[0])])
        ks = tuple(id(s.buf.knp) for s in layers)
        kv = getattr(self.local, "kv", None)
        if kv is None or kv[0] != ks:
            kv = self.local.kv = (ks, (_typed([s.buf.knp for s in layers]), _typed([s.buf.vnp for s in layers])),
                                  [s.buf for s in layers])
        return static[1], kv[1]

    def _run(self, hidden_states, cos, sin, n, layers, changes, hand_on=True):
        static, kv = self._arrays(layers)
        if static is None:
            return None
        lists, scalars, (H, inter, meta), k = static
        x = hidden_states.numpy().reshape(-1).copy()
        idx = np.empty((len(layers), k), np.int64)
        nthreads = kernels_layer._threads(None)
        bbuf, fbuf, counters, addrs = kernels_layer._workspace(H, inter, k, meta[1], meta[4], nthreads)
        p0 = layers[0].plan
        with kernels_grouped.launch_lock:
            jit().stack(p0.tag, x, cos, sin, n, lists[0], scalars[0], *lists[1:9], scalars[1], scalars[2], lists[9],
                        lists[10], np.float32(p0.scale), p0.heads, p0.kv_heads, p0.head_dim, lists[11], scalars[3],
                        lists[12], lists[13], k, scalars[4], lists[14], meta, inter, bbuf, fbuf, counters, addrs,
                        nthreads, *kv, idx)
        cache = layers[0].experts.runtime.cache
        with cache.lock:
            if cache.changes != changes:
                return None  # no position was made visible: the layers' own steps compute this token
            cache.record_steps_hit([s.experts.resident_step(row, s.table) for s, row in zip(layers, idx)])
        for s in layers:
            kv_buffer.advance(s.cache_layer, s.buf)
        out = torch.from_numpy(x).view(hidden_states.shape)
        self.local.pending = (out, 1) if hand_on and len(layers) > 1 else None  # the later layers' calls
        return out


@contextlib.contextmanager
def layer_by_layer(model):
    """Within: the model's tokens run layer by layer (as every token of a cache that misses does)."""
    runners = {r for m in model.modules() if (r := getattr(getattr(m, "_decode_path", None), "runner", None))}
    before = {r: r.enabled for r in runners}
    for r in runners:
        r.enabled = False
    try:
        yield
    finally:
        for r, enabled in before.items():
            r.enabled = enabled


def _typed(arrays):
    from numba.typed import List

    out = List()
    for a in arrays:
        out.append(a)
    return out


def _static(layers):
    """(typed lists, scalars, expert shape, top-k) for _decode_jit.stack; None if the layers differ
    in a size the kernel takes once."""
    p0, (_, _, k0), e0 = layers[0].plan, layers[0].route, layers[0].experts
    for s in layers:
        p, route, renorm, e = s.plan, s.route, s.renorm, s.experts
        if ((p.heads, p.kv_heads, p.head_dim, np.float32(p.scale), p.tag.dtype) != (p0.heads, p0.kv_heads,
                p0.head_dim, np.float32(p0.scale), p0.tag.dtype) or route[2] != k0 or renorm != layers[0].renorm
                or e.shape[:2] != e0.shape[:2] or not np.array_equal(e.shape[2], e0.shape[2])
                or p.tiles[0].shape[0] != p0.tiles[0].shape[0] or p.tiles[1].shape[0] != p0.tiles[1].shape[0]
                or p.tiles[2].shape[0] != p0.tiles[2].shape[0] or p.tiles[3].shape[0] != p0.tiles[3].shape[0]):
            return None
    col = lambda f: _typed([np.ascontiguousarray(f(s)) for s in layers])
    lists = (col(lambda s: s.n1w),  # n1 weight
             col(lambda s: s.plan.tiles[0]), col(lambda s: s.plan.tiles[1]), col(lambda s: s.plan.tiles[2]),
             col(lambda s: s.plan.biases[0]), col(lambda s: s.plan.biases[1]), col(lambda s: s.plan.biases[2]),
             col(lambda s: s.plan.norms[0]), col(lambda s: s.plan.norms[1]),
             col(lambda s: s.plan.tiles[3]), col(lambda s: s.plan.biases[3]),
             col(lambda s: s.n2w),  # n2 weight
             col(lambda s: s.route[0]), col(lambda s: s.route[1]),  # router weight, bias
             col(lambda s: s.table[0]))  # expert tables
    scalars = (np.array([s.n1eps for s in layers], np.float64),  # the norms' eps as their paths pass them
               np.array([(s.plan.qms[0].bits, s.plan.qms[0].group, s.plan.qms[3].bits, s.plan.qms[3].group) for s in layers],
                        np.int64),
               np.array([s.plan.eps for s in layers], np.float32),
               np.array([s.n2eps for s in layers], np.float64),
               bool(layers[0].renorm))
    return lists, (scalars[0], scalars[1], scalars[2], scalars[3], scalars[4]), e0.shape, int(k0)


def warm_up() -> None:
    """Load (the first time: compile) the stack kernel on one tiny layer with the argument types of
    real calls (attention_decode.warm_up's tiny attention, router and expert)."""
    from .attention_decode import _empty, _tiny_plan

    p = _tiny_plan()
    gu = kernels_layer.quantize_rowtile(torch.ones(64, 32), 4, 32, optimize=False)
    dn = kernels_layer.quantize_rowtile(torch.ones(32, 32), 4, 32, optimize=False)
    H, inter, meta = kernels_layer.layer_shape(gu, dn)
    table = np.array([[gu.tensors["tiles"].data_ptr()] * 4, [dn.tensors["tiles"].data_ptr()] * 4], np.int64)
    one = lambda a: _typed([a])
    w, kv = np.ones(32, np.float32), (np.zeros((1, 4, 32), np.float32), np.zeros((1, 4, 32), np.float32))
    nthreads = kernels_layer._threads(None)
    bbuf, fbuf, counters, addrs = kernels_layer._workspace(H, inter, 2, meta[1], meta[4], nthreads)
    jit().stack(p.tag, np.ones(32, np.float32), np.ones(32, np.float32), np.zeros(32, np.float32), 0, one(w),
                np.full(1, 1e-6), one(p.tiles[0]), one(p.tiles[1]), one(p.tiles[2]), one(_empty()), one(_empty()),
                one(_empty()), one(_empty()), one(_empty()), np.array([[4, 32, 4, 32]], np.int64),
                np.full(1, 1e-6, np.float32), one(p.tiles[3]), one(_empty()), np.float32(p.scale), 1, 1, 32, one(w),
                np.full(1, 1e-6), one(np.ones((4, 32), np.float32)), one(_empty()), 2, True, one(table), meta, inter,
                bbuf, fbuf, counters, addrs, nthreads, one(kv[0]), one(kv[1]), np.empty((1, 2), np.int64))

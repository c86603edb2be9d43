"""A decode token's decoder layer without transformers' layer and MoE-block glue.

Once a layer's attention, norms (and router) run in kernels (attention_decode.py, norm_decode.py,
router_decode.py), what is left between those calls is Python: the decoder layer's forward with its
wrappers, the MoE block's forward, a module call per child (~60 µs a layer at decode on the
quarter shapes; measured on a qwen3-quarter decode, 18.7-19.3 -> 16.5-16.6 ms a token without it).
This path calls the same children in the same order, directly:

    x = x + self_attn(input_layernorm(x));  x = x + mlp(post_attention_layernorm(x))

and for an MoE block whose only children are a router and the offloaded experts, mlp(h) is
experts(h, router(h)). Any decoder layer whose children are those four takes the path, after it
checks itself: on one call, transformers' own forward runs with hooks recording what each child got
and gave, and the path is used from then on only if that call was exactly the formula above (the
same tensors, compared bit for bit). The check does not run anything twice, so the cache's
statistics and the KV cache see one forward. Children with hooks of their own are called as
modules, so their hooks still run; the one exception is a pre-hook that only observes its input
(prefetch keeps the residual stream from one on the MoE norm), which the fused step calls itself.
Every call the children's paths would not take (prompts, batches, masks, ...) goes to the layer's
own forward.
"""
from __future__ import annotations

import torch
from torch import nn

from transformers.cache_utils import DynamicLayer

from . import attention_decode, kernels_grouped, kv_buffer, moe
from .attention_decode import _DecodePath
from .decode_path import take_forward
from .norm_decode import _NormPath
from .router_decode import _RouterPath
from .stack_decode import StackRunner

_CHILDREN = {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}


def install(model: nn.Module) -> int:
    paths = []
    for module in model.modules():
        kids = dict(module.named_children())
        if (kids.keys() == _CHILDREN and isinstance(getattr(kids["self_attn"], "_decode_path", None), _DecodePath)
                and all(isinstance(getattr(kids[k], "_decode_path", None), _NormPath)
                        for k in ("input_layernorm", "post_attention_layernorm"))):
            paths.append(_LayerPath(module))
    if paths and all(p.router is not None for p in paths):  # MoE layers only: one call can take them all
        runner = StackRunner(paths)
        for p in paths:
            p.runner = runner
    return len(paths)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _only_observed(module: nn.Module) -> bool:
    """Whether the module's hooks are pre-hooks that only look at its input (`observes_only`, such as
    the prefetcher's residual keeper): the fused step calls those itself."""
    return not module._forward_hooks and all(getattr(h, "observes_only", False)
                                             for h in module._forward_pre_hooks.values())


class _LayerPath:
    def __init__(self, layer: nn.Module):
        m = layer._modules
        self.n1, self.attn, self.n2, self.mlp = (m["input_layernorm"], m["self_attn"], m["post_attention_layernorm"],
                                                 m["mlp"])
        block = dict(self.mlp.named_children())
        gate = block.get("gate", block.get("router"))
        # an MoE block that is nothing but a router and offloaded experts: called as experts(h, router(h))
        self.router = gate if (len(block) == 2 and isinstance(getattr(gate, "_decode_path", None), _RouterPath)
                               and moe.is_direct(block.get("experts"))) else None
        self.experts = block.get("experts") if self.router is not None else None
        self.verified: bool | None = None
        self.plain_block = False  # whether the check saw the block compute experts(h, router(h))
        self.fused = True  # False: never the fused step (tests compare it with the unfused one)
        self.runner = None  # the model's stack_decode.StackRunner, if it has one
        take_forward(layer, self)

    def _ready(self, hidden_states, kwargs) -> bool:
        """The call is one the children's kernels take, and they have all checked themselves."""
        s = hidden_states.shape
        return (len(s) == 3 and s[0] == 1 and s[1] == 1 and kwargs.get("attention_mask") is None and not hidden_states.requires_grad
                and self.attn._decode_path.verified is True and self.n1._decode_path.verified is True
                and self.n2._decode_path.verified is True and not self.module.training
                and not torch.nn.modules.module._global_forward_hooks
                and not torch.nn.modules.module._global_forward_pre_hooks)

    def __call__(self, hidden_states, *args, **kwargs):
        runner = self.runner
        if runner is None:
            return self._call(hidden_states, *args, **kwargs)
        out = runner.call(self, hidden_states, args, kwargs)
        if out is not None:
            return out
        out = self._call(hidden_states, *args, **kwargs)
        if runner.watching():
            runner.saw(self, hidden_states, kwargs, out)
        return out

    def _call(self, hidden_states, *args, **kwargs):
        if self.verified is False or args or not self._ready(hidden_states, kwargs):
            return self.original(hidden_states, *args, **kwargs)
        if self.verified is None:
            return self._check(hidden_states, kwargs)
        if self.fused and self._fusable():
            out = self._fused(hidden_states, kwargs)
            if out is not None:
                return out
        n1, attn, n2 = self.n1, self.attn, self.n2
        h = n1(hidden_states) if _hooked(n1) else n1._decode_path(hidden_states)
        a = (attn(hidden_states=h, **kwargs) if _hooked(attn) else attn._decode_path(h, **kwargs))[0]
        x = hidden_states + a
        h = n2(x) if _hooked(n2) else n2._decode_path(x)
        return x + self._block(h)

    def _fusable(self) -> bool:
        """Whether no child has hooks and the MoE block is experts(h, router(h)) with a checked router."""
        r = self.router
        return (self.plain_block and r._decode_path.verified is True and not _hooked(self.n1) and not _hooked(self.attn)
                and _only_observed(self.n2) and not _hooked(self.mlp) and not _hooked(r) and not _hooked(self.experts))

    def _fused(self, hidden_states, kwargs):
        """The formula above in two kernel calls (attention_decode: norm + q/k/v; attention + residual +
        norm + router) and the experts' one, with the same floats as the children's own paths (the
        kernels run the same steps in the same order; test_decode_kernels compares them bit for bit).
        The new keys and values go into the cache layer through kv_buffer (no copy of the cache a step).
        None, before anything ran, when a child's path would not take this call."""
        attn, n1, n2, router = (self.attn._decode_path, self.n1._decode_path, self.n2._decode_path,
                                self.router._decode_path)
        got = attn.inputs(hidden_states, (), kwargs)
        w1, w2, route = n1.weight(), n2.weight(), router.current()
        if got is None or w1 is None or w2 is None or route is None or not hidden_states.is_contiguous():
            return None
        p, cache, cos, sin = got
        x = hidden_states.numpy().reshape(-1)
        with kernels_grouped.launch_lock:
            q, k, v = attention_decode._project(p, x, cos, sin, (w1, n1.eps))
        layer = cache.layers[attn.layer_idx]
        kv = kv_buffer.append(layer, k, v) if type(layer) is DynamicLayer else None
        if kv is None:  # (a sliding window, an empty cache...): the layer's own update()
            keys, values = cache.update(torch.from_numpy(k).view(1, p.kv_heads, 1, p.head_dim),
                                        torch.from_numpy(v).view(1, p.kv_heads, 1, p.head_dim), attn.layer_idx)
            kv = (attention_decode._array(keys), attention_decode._array(values), keys.shape[-2])
        e = self.experts._offload
        n2_hooks = self.n2._forward_pre_hooks
        # Every expert resident and nothing to guess: the experts in the same call (no Python between).
        table = None if n2_hooks else e.resident_table()
        if table is not None and table[0].shape[1] == route[0].shape[0]:
            with kernels_grouped.launch_lock:
                x2, _, _, _, idx = attention_decode.attend_route(p, q, *kv, x, (w2, n2.eps), route, router.renorm,
                                                                 experts=table)
            if e.record_resident(idx, table):
                return torch.from_numpy(x2).view(hidden_states.shape)
        with kernels_grouped.launch_lock:  # (again, if another thread's step changed the cache meanwhile)
            x2, h, _, scores, idx = attention_decode.attend_route(p, q, *kv, x, (w2, n2.eps), route, router.renorm)
        if n2_hooks:  # observers of the MoE norm's input (the prefetcher's residual keeper)
            stream = (torch.from_numpy(x2).view(hidden_states.shape),)
            for hook in tuple(n2_hooks.values()):
                hook(self.n2, stream)
        y = e.decode_step(h, idx, scores)
        if y is None:  # a layer that is not one kernel call, or a hybrid tier: the experts' own call
            y = e(torch.from_numpy(h).view(1, -1), torch.from_numpy(idx).view(1, -1),
                  torch.from_numpy(scores).view(1, -1)).reshape(-1).numpy()
        x2 += y
        return torch.from_numpy(x2).view(hidden_states.shape)

    def _block(self, h: torch.Tensor) -> torch.Tensor:
        r, e = self.router, self.experts
        if not self.plain_block or _hooked(self.mlp) or _hooked(r) or _hooked(e) or r._decode_path.verified is not True:
            return self.mlp(h)  # (plain_block is only ever set with a router)
        flat = h.view(-1, h.shape[-1])
        _, weights, index = r._decode_path(flat)
        return e._offload(flat, index, weights).view(h.shape)

    def _check(self, hidden_states, kwargs):
        """The layer's own forward, recording each child's input and output; the path is taken from
        the next call on if they compose as the formula in the module docstring, bit for bit."""
        seen: dict[str, tuple] = {}
        watched = {"n1": self.n1, "attn": self.attn, "n2": self.n2, "mlp": self.mlp}
        if self.router is not None:
            watched.update(router=self.router, experts=self.experts)

        def record(name):
            def hook(module, args, kwargs, output):
                if name not in seen:  # the first call in this forward (prefetch may call the norm again)
                    seen[name] = (tuple(args) + tuple(kwargs.values()), output)
            return hook
        handles = [m.register_forward_hook(record(k), with_kwargs=True) for k, m in watched.items()]
        try:
            out = self.original(hidden_states, **kwargs)
        finally:
            for h in handles:
                h.remove()
        self.verified = self._composes(hidden_states, seen, out)
        if self.verified and self.router is not None:
            self.plain_block = self._block_composes(seen)
        return out

    @staticmethod
    def _composes(x, seen, out) -> bool:
        if not {"n1", "attn", "n2", "mlp"} <= seen.keys() or not isinstance(out, torch.Tensor):
            return False
        (n1_in, n1_out), (attn_in, attn_out), (n2_in, n2_out), (mlp_in, mlp_out) = (
            seen[k] for k in ("n1", "attn", "n2", "mlp"))
        if not (isinstance(attn_out, tuple) and isinstance(attn_out[0], torch.Tensor)):
            return False
        same = lambda a, b: isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
        return (same(n1_in[0], x) and any(same(a, n1_out) for a in attn_in) and same(n2_in[0], x + attn_out[0])
                and same(mlp_in[0], n2_out) and same(out, n2_in[0] + mlp_out))

    @staticmethod
    def _block_composes(seen) -> bool:
        if not {"router", "experts"} <= seen.keys():
            return False
        (mlp_in, mlp_out), (r_in, r_out), (e_in, e_out) = seen["mlp"], seen["router"], seen["experts"]
        h = mlp_in[0]
        flat = h.view(-1, h.shape[-1])
        same = lambda a, b: isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
        return (isinstance(r_out, tuple) and len(r_out) == 3 and same(r_in[0], flat) and len(e_in) == 3
                and same(e_in[0], flat) and same(e_in[1], r_out[2]) and same(e_in[2], r_out[1])
                and same(mlp_out, e_out.view(h.shape)))

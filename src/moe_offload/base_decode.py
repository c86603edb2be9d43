"""A decode token's base-model forward without transformers' model glue.

When the stack runs (stack_decode.py), a decode token is one kernel call, and what remains of the
base model's forward is Python: its wrappers (deprecated-argument mapping, output capture, config
defaults), the causal-mask function, the slice of the layer list (a new ModuleList a token), a
module call per layer handing the stack's output on, and the output object (~0.6 ms a token on the
quarter shapes, measured). Here the base model's call is, for such a token,

    h = embed(ids);  pe = rotary(h, position_ids);  x = stack(h, pe);  return norm(x)

with the same modules called the same way, so the same floats. The path checks itself first: on one
token it lets transformers' forward run with hooks on the embedding, the rotary embedding and the
final norm, and takes the formula from the next token on only if that forward was exactly it: the
embedding's output went into the stack, the rotary embedding's output was the layers' position
embeddings (computed from the same position ids), the stack's output went into the final norm, whose
output the forward returned as its only tensor beside the cache. Every other call (prompts, masks,
outputs asked for, a token the stack does not take, hooks on these modules) goes to the model's own
forward.
"""
from __future__ import annotations

from torch import nn

from .decode_path import take_forward
from .layer_decode import _hooked

# Keyword arguments a decode call carries besides these (generate passes `output_router_logits`...)
# are taken only when they ask for nothing: None or False.
_ARGS = {"input_ids", "attention_mask", "position_ids", "cache", "past_key_values", "inputs_embeds", "use_cache"}
_CONFIG_FLAGS = ("output_hidden_states", "output_attentions", "output_router_logits")


def install(model: nn.Module) -> bool:
    """The path on the base model whose layers share one stack runner; False if there is none."""
    layers = [m for m in model.modules() if getattr(getattr(m, "_decode_path", None), "runner", None) is not None]
    if not layers:
        return False
    runner = layers[0]._decode_path.runner
    for base in model.modules():
        kids = dict(base.named_children())
        stack = kids.get("layers")
        if (isinstance(stack, nn.ModuleList) and [id(m) for m in stack] == [id(p.module) for p in runner.paths]
                and isinstance(kids.get("embed_tokens"), nn.Module) and isinstance(kids.get("rotary_emb"), nn.Module)
                and isinstance(kids.get("norm"), nn.Module)):
            _BasePath(base, runner)
            return True
    return False


class _BasePath:
    def __init__(self, base: nn.Module, runner):
        self.embed, self.rotary, self.norm = base.embed_tokens, base.rotary_emb, base.norm
        self.config = getattr(base, "config", None)
        self.runner = runner
        self.verified: bool | None = None
        self.output = None  # after the check: (output class, name of its cache field)
        self.layer_kwargs = None  # after the check: each layer keyword's source (a name in _fast's `made`) or (value,)
        take_forward(base, self)

    def __call__(self, *args, **kwargs):
        if not args and self.verified is not False and self.runner.enabled and self._decode_call(kwargs):
            if self.verified:
                out = self._fast(kwargs)
                if out is not None:
                    return out
            else:
                return self._check(kwargs)
        return self.original(*args, **kwargs)

    def _decode_call(self, kwargs) -> bool:
        """A single-token call with a cache, no mask and nothing extra asked for."""
        ids = kwargs.get("input_ids")
        if (ids is None or ids.shape != (1, 1) or kwargs.get("attention_mask") is not None
                or kwargs.get("inputs_embeds") is not None or kwargs.get("cache", kwargs.get("past_key_values")) is None
                or _hooked(self.embed) or _hooked(self.rotary) or _hooked(self.norm)):
            return False
        if any(k not in _ARGS and v is not None and v is not False for k, v in kwargs.items()):
            return False
        c = self.config
        return c is None or not any(getattr(c, f, False) for f in _CONFIG_FLAGS)

    def _fast(self, kwargs):
        """The formula of the module docstring; None, before anything with effects ran, if the stack
        does not take this token."""
        position_ids = kwargs.get("position_ids")
        if position_ids is None:  # the check saw them given (_composes)
            return None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        h = self.embed(kwargs["input_ids"])
        pe = self.rotary(h, position_ids=position_ids)
        made = {"cache": cache, "position_ids": position_ids, "position_embeddings": pe}
        layer_kwargs = {k: (made[v] if isinstance(v, str) else v[0]) for k, v in self.layer_kwargs.items()}
        x = self.runner.run(h, layer_kwargs)
        if x is None:
            return None
        cls, cache_field = self.output
        return cls(last_hidden_state=self.norm(x), **{cache_field: cache})

    def _check(self, kwargs):
        """The model's own forward, watched: the path is taken from the next call on if it was the
        formula of the module docstring (see there)."""
        seen: dict[str, tuple] = {}

        def record(name):
            def hook(module, args, hook_kwargs, output):
                seen.setdefault(name, []).append((args, hook_kwargs, output))
            return hook
        handles = [m.register_forward_hook(record(k), with_kwargs=True)
                   for k, m in (("embed", self.embed), ("rotary", self.rotary), ("norm", self.norm))]
        runner = self.runner
        runner.local.seen = None
        try:
            out = self.original(**kwargs)
        finally:
            for h in handles:
                h.remove()
        stacked, runner.local.seen = runner.local.seen, None
        if stacked is None:
            return out  # the stack did not take this token: nothing to compare, check the next one
        self.verified = self._composes(kwargs, seen, stacked, out)
        return out

    def _composes(self, kwargs, seen, stacked, out) -> bool:
        if any(len(seen.get(k, ())) != 1 for k in ("embed", "rotary", "norm")):
            return False
        (e_args, e_kwargs, e_out), = seen["embed"]
        (r_args, r_kwargs, r_out), = seen["rotary"]
        (n_args, n_kwargs, n_out), = seen["norm"]
        layer_in, layer_kwargs, stack_out = stacked
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        position_ids = kwargs.get("position_ids")
        if position_ids is None:  # the forward made them: the path would have to as well
            return False
        r_positions = r_kwargs.get("position_ids", r_args[1] if len(r_args) > 1 else None)
        if not (len(e_args) == 1 and not e_kwargs and e_args[0] is kwargs["input_ids"] and layer_in is e_out
                and len(r_args) + len(r_kwargs) == 2 and r_args[0] is e_out and r_positions is position_ids
                and layer_kwargs.get("position_embeddings") is r_out
                and len(n_args) == 1 and not n_kwargs and n_args[0] is stack_out):
            return False
        fields = [k for k, v in out.items() if v is not None]
        cache_field = next((k for k in fields if out[k] is cache), None)
        if sorted(fields) != sorted(["last_hidden_state", cache_field]) or out["last_hidden_state"] is not n_out:
            return False
        made = {"cache": cache, "position_ids": position_ids, "position_embeddings": r_out}
        mapping = {}
        for k, v in layer_kwargs.items():
            source = next((name for name, m in made.items() if v is m), None)
            if source is not None:
                mapping[k] = source
            elif v is None or isinstance(v, bool):
                mapping[k] = (v,)
            else:
                return False
        self.layer_kwargs = mapping
        self.output = (type(out), cache_field)
        return True

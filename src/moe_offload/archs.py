"""What offloading needs to know about a model, read from transformers' own classes.

transformers 5 decorates the experts class of each of its MoE families with
`use_experts_implementation`, which records how the experts' weights are laid out (`is_transposed`,
`is_concatenated`, `has_bias`, `has_gate`, `has_post_expert_norm`) and how they gate (`_apply_gate`),
and routes their forward through `ALL_EXPERTS_FUNCTIONS`. So one walk over a model built on the
meta device finds every MoE layer (dense first layers, `mlp_only_layers`, sparse steps and
interleaving all show up as layers without an experts module), the router next to each experts
module, and the per-expert tensors. Only what cannot be read off the classes sits in FAMILIES.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .errors import MoeOffloadError

# The per-expert tensors the experts seam knows (transformers' generic experts functions use these names).
EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")
EXPERT_BIASES = ("gate_up_proj_bias", "up_proj_bias", "down_proj_bias")
# Norms that a decoder layer applies to the residual stream before its MoE block, by family convention.
MOE_NORMS = ("post_attention_layernorm", "pre_feedforward_layernorm", "ffn_norm", "pre_mlp_layernorm")


@dataclass(frozen=True)
class Family:
    """What a family needs beyond what its classes say (one short entry per family)."""

    moe_norm: str | None = None  # the norm before the MoE block, when none of MOE_NORMS
    refuse: str | None = None  # why it cannot be offloaded (shown to the user)


FAMILIES: dict[str, Family] = {}


@dataclass(frozen=True)
class MoeLayer:
    index: int  # the decoder layer's number
    experts: str  # module path of its experts module
    router: str  # module path of the router next to it
    router_args: tuple[str, ...]  # attributes of the MoE block its router also takes (e.g. a correction bias)
    norm: str | None  # module path of the norm before the MoE block (prefetch replays it); None: unknown


@dataclass(frozen=True)
class MoeSpec:
    """A model's MoE structure: which layers, how many experts, and the math of one expert."""

    model_type: str
    layers: tuple[MoeLayer, ...]
    num_experts: int
    top_k: int
    expert_params: tuple[str, ...]  # the experts module's per-expert tensors, e.g. gate_up_proj, down_proj
    is_transposed: bool
    has_bias: bool
    has_gate: bool
    has_post_expert_norm: bool
    shared: tuple[str, ...] = field(default=())  # shared experts' module paths (resident, part of the dense part)
    num_decoder_layers: int = 0

    @property
    def moe_layers(self) -> list[int]:
        return [layer.index for layer in self.layers]

    def layer(self, index: int) -> MoeLayer:
        return next(layer for layer in self.layers if layer.index == index)

    def summary(self) -> str:
        dense = self.num_decoder_layers - len(self.layers) if self.num_decoder_layers else 0
        parts = [f"family {self.model_type}: {len(self.layers)} MoE layer(s)"
                 + (f" (and {dense} dense)" if dense else ""),
                 f"{self.num_experts} experts per layer, top-{self.top_k}"]
        if self.shared:
            parts.append(f"shared experts ({self.shared[0].rpartition('.')[2]}) resident")
        return ", ".join(parts)


def is_experts_module(module: torch.nn.Module) -> bool:
    """An experts module built by a class that uses transformers' experts seam."""
    return hasattr(type(module), "_apply_gate") and hasattr(module, "is_transposed")


def seam_forward_is_own(module: torch.nn.Module) -> bool:
    """Whether the experts module's forward is the seam's dispatcher itself. A family whose experts
    class overrides it (e.g. ergo: each route's output normed per expert around the seam's call)
    computes more than the seam's implementation; its forward must stay."""
    from transformers.integrations import moe as seam

    code = getattr(type(module).forward, "__code__", None)
    return code is not None and code.co_filename == seam.__file__ and hasattr(type(module).forward, "__wrapped__")


def build_meta_model(config, experts_implementation: str | None = None, dtype: torch.dtype | None = None):
    """The model's skeleton on the meta device (costs no memory)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"experts_implementation": experts_implementation} if experts_implementation else {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, **kwargs)
    except ValueError as e:
        what = ("a multimodal model: moe-offload runs causal language models only"
                if hasattr(config, "text_config") or hasattr(config, "vision_config") else
                "not a causal language model that transformers can build")
        raise MoeOffloadError(f"the model type {config.model_type!r} is {what} "
                              f"({str(e).splitlines()[0][:200]})") from e


def describe(model) -> MoeSpec:
    """Read a model's MoE structure off its modules; raise MoeOffloadError saying what is unsupported."""
    config = model.config
    model_type = getattr(config, "model_type", "?")
    family = FAMILIES.get(model_type, Family())
    if family.refuse:
        raise MoeOffloadError(f"the model family {model_type!r} is not supported: {family.refuse}")
    found = [(name, m) for name, m in model.named_modules() if is_experts_module(m)]
    if not found:
        raise MoeOffloadError(_why_no_experts(model, model_type))
    layers, params, shared = [], None, []
    num_experts = top_k = None
    for name, experts in found:
        match = re.search(r"(.*\.layers)\.(\d+)\.", name)
        if not match:
            raise MoeOffloadError(f"{model_type}: the experts module {name} sits outside the decoder layers; "
                                  "only decoder-layer MoE blocks are supported")
        layer_path = f"{match.group(1)}.{match.group(2)}"
        block_path = name.rpartition(".")[0]
        block = model.get_submodule(block_path)
        n = getattr(experts, "num_experts", None) or next(iter(experts.parameters())).shape[0]
        own = _expert_params(experts, n, model_type, name)
        router = _router(block, experts, n, model_type, block_path)
        norm = _norm(model, layer_path, family)
        layers.append(MoeLayer(int(match.group(2)), name, f"{block_path}.{router}" if block_path else router,
                               _router_args(block, getattr(block, router)), norm))
        shared += [f"{block_path}.{c}" for c, _ in block.named_children() if c.startswith("shared_expert")
                   and not c.endswith("_gate")]
        if params is None:
            params, num_experts = own, n
            top_k = _top_k(model.get_submodule(layers[-1].router), config)
        elif own != params or n != num_experts:
            raise MoeOffloadError(f"{model_type}: MoE layers differ in their experts ({name}); "
                                  "layers of different expert shapes are not supported")
    first = found[0][1]
    decoder_layers = model.get_submodule(re.search(r"(.*\.layers)\.\d+\.", found[0][0]).group(1))
    return MoeSpec(model_type, tuple(layers), num_experts, top_k, params, bool(first.is_transposed),
                   bool(first.has_bias), bool(first.has_gate), bool(first.has_post_expert_norm), tuple(shared),
                   num_decoder_layers=len(decoder_layers))


def _why_no_experts(model, model_type: str) -> str:
    moe_words = ("experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")
    looks_moe = any(getattr(model.config, w, None) for w in moe_words) or any(
        "expert" in name for name, _ in model.named_modules())
    if looks_moe:
        return (f"the model family {model_type!r} keeps its experts in modules that do not use transformers' "
                "experts seam (`use_experts_implementation`), which moe-offload offloads through; "
                "no other layout is supported")
    return (f"{model_type!r} is not a Mixture-of-Experts model (no experts module found); dense models do not "
            "need expert offloading")


def _expert_params(experts, n: int, model_type: str, name: str) -> tuple[str, ...]:
    own = tuple(p for p, t in experts.named_parameters(recurse=False) if t.dim() >= 2 or p in EXPERT_BIASES)
    unknown = [p for p in own if p not in EXPERT_WEIGHTS + EXPERT_BIASES]
    if unknown:
        raise MoeOffloadError(f"{model_type}: the experts of {name} hold tensors moe-offload does not know how to "
                              f"offload ({', '.join(unknown)})")
    if "down_proj" not in own:
        raise MoeOffloadError(f"{model_type}: the experts of {name} have no down_proj")
    bad = [p for p in own if experts.get_parameter(p).shape[0] != n]
    if bad:
        raise MoeOffloadError(f"{model_type}: {name}.{bad[0]} is not stacked by expert")
    return own


def _router(block, experts, n: int, model_type: str, block_path: str) -> str:
    """The child of the MoE block holding the router weight [num_experts, hidden] (its own, or a
    linear layer inside it)."""
    candidates = []
    for child_name, child in block.named_children():
        if child is experts or child_name.startswith("shared_expert"):
            continue
        if any(w.dim() == 2 and w.shape[0] == n for w in child.parameters()):
            candidates.append(child_name)
    preferred = [c for c in candidates if c in ("gate", "router")] or candidates
    if not preferred:
        raise MoeOffloadError(f"{model_type}: no router found next to the experts in {block_path}")
    return preferred[0]


def _router_args(block, router) -> tuple[str, ...] | None:
    """Some routers take more than the hidden states: tensors their MoE block owns and passes along
    (`self.gate(hidden, self.e_score_correction_bias)`). Their names match the block's attributes;
    None when they do not (such a router cannot be replayed for prefetch)."""
    import inspect

    params = list(inspect.signature(router.forward).parameters.values())[1:]
    needed = tuple(p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY,
                                                                                   p.POSITIONAL_OR_KEYWORD))
    if all(hasattr(block, name) for name in needed):
        return needed
    # The same tensor under another name, e.g. the block's `expert_bias` passed as `e_score_correction_bias`.
    tensors = [name for name, _ in list(block.named_parameters(recurse=False)) + list(block.named_buffers(recurse=False))]
    return tuple(tensors) if len(tensors) == len(needed) else None


def _norm(model, layer_path: str, family: Family) -> str | None:
    layer = model.get_submodule(layer_path)
    for name in ((family.moe_norm,) if family.moe_norm else MOE_NORMS):
        if isinstance(getattr(layer, name, None), torch.nn.Module):
            return f"{layer_path}.{name}"
    return None


def _top_k(router, config) -> int:
    for source, attr in ((router, "top_k"), (config, "num_experts_per_tok"), (config, "moe_topk"),
                         (config, "top_k"), (config, "num_experts_per_token")):
        value = getattr(source, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise MoeOffloadError(f"{config.model_type}: cannot tell how many experts the router picks per token")

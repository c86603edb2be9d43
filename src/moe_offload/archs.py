"""Per-architecture facts: where routers and experts live, and how checkpoints name expert weights."""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import MoeOffloadError


@dataclass(frozen=True)
class Arch:
    model_type: str
    # On disk: one regex per expert matrix; groups are (layer, expert).
    expert_key: re.Pattern
    gate: str  # names of the matrices on disk (gate, up, down)
    up: str
    down: str
    # In memory (transformers 5 module tree, relative to each decoder layer).
    moe_block: str = "mlp"
    router: str = "gate"
    experts: str = "experts"
    moe_norm: str = "post_attention_layernorm"  # the norm applied to the MoE block's input
    # Renames from checkpoint keys to the in-memory module tree.
    renames: tuple[tuple[str, str], ...] = ()

    def num_experts(self, config) -> int:
        return config.num_local_experts

    def top_k(self, config) -> int:
        return config.num_experts_per_tok

    def memory_name(self, key: str) -> str:
        for old, new in self.renames:
            key = key.replace(old, new)
        return key

    def match_expert(self, key: str) -> tuple[int, int, str] | None:
        """'model.layers.3.block_sparse_moe.experts.5.w1.weight' -> (3, 5, 'w1')."""
        m = self.expert_key.fullmatch(key)
        return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


MIXTRAL = Arch(
    model_type="mixtral",
    expert_key=re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight"),
    gate="w1", up="w3", down="w2",
    renames=((".block_sparse_moe.", ".mlp."),),
)

ARCHS = {a.model_type: a for a in (MIXTRAL,)}
# Families transformers knows as MoE, but that this version of the project does not run yet.
KNOWN_MOE = {"qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "phimoe", "dbrx", "jamba", "granitemoe"}


def arch_for(config) -> Arch:
    model_type = getattr(config, "model_type", None)
    if model_type in ARCHS:
        return ARCHS[model_type]
    supported = ", ".join(sorted(ARCHS))
    if model_type in KNOWN_MOE:
        raise MoeOffloadError(f"the MoE architecture {model_type!r} is not supported yet (supported: {supported})")
    raise MoeOffloadError(
        f"{model_type!r} is not a supported Mixture-of-Experts architecture (supported: {supported}); "
        "dense models do not need expert offloading")

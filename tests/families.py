"""Tiny random models of every MoE family, and the 16-bit equivalence check shared by the tests."""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import torch

import moe_offload
from moe_offload.errors import MoeOffloadError
from moe_offload.synthetic import build_random_moe, tiny_moe_config

# The families the issue names, with what their tiny configs need beyond synthetic.TINY_MOE.
NAMED = {
    "mixtral": {},
    "qwen3_moe": {"decoder_sparse_step": 1, "mlp_only_layers": [1]},  # a dense layer between MoE layers
    "qwen2_moe": {},
    "olmoe": {},
    "deepseek_v2": {"num_key_value_heads": 6, "topk_method": "group_limited_greedy"},  # MLA: no GQA
    "deepseek_v3": {"num_key_value_heads": 6, "routed_scaling_factor": 2.5},
    "glm4_moe": {"routed_scaling_factor": 1.5},
    "gpt_oss": {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    "phimoe": {},
}
# Other families whose tiny config needs a hand: at least one attention layer among linear ones.
OVERRIDES = {
    "qwen3_next": {"num_hidden_layers": 4},
    "jamba": {"attn_layer_offset": 1, "attn_layer_period": 2, "expert_layer_offset": 0, "expert_layer_period": 1},
}
DECODE_STEPS = 20


def seam_families() -> list[str]:
    """Every model type whose modeling file in the installed transformers uses the experts seam."""
    import transformers

    root = Path(transformers.__file__).parent / "models"
    out = []
    for f in sorted(glob.glob(str(root / "*" / "modeling_*.py"))):
        if "@use_experts_implementation" in Path(f).read_text():
            out.append(Path(f).parent.name)
    return out


@dataclass
class Case:
    family: str
    src: Path
    config: object
    ids: torch.Tensor
    prefill: torch.Tensor
    sequences: torch.Tensor
    logits: tuple


def build_case(family: str, root: Path, seed: int = 3, tokenizer: bool = False, **overrides) -> Case:
    """A tiny random model of `family` saved in root/src, and transformers' own outputs on it."""
    from transformers import AutoModelForCausalLM

    config = tiny_moe_config(family, **{**NAMED.get(family, {}), **OVERRIDES.get(family, {}), **overrides})
    _check_tiny(config)
    src = build_random_moe(root / "src", config, seed=seed, tokenizer=tokenizer)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    torch.manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (1, 11))
    with torch.no_grad():
        prefill = ref(ids).logits
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=DECODE_STEPS, do_sample=False,
                           output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    return Case(family, src, config, ids, prefill, out.sequences, out.logits)


MAX_TINY_PARAMS = 12_000_000


class TooBig(Exception):
    pass


def _check_tiny(config) -> None:
    """Some families keep large parts (vision or audio towers, big vocabularies) in fields the tiny
    config does not shrink: count on the meta device before building anything."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    if n > MAX_TINY_PARAMS:
        raise TooBig(f"its config built from the shared tiny sizes still has {n / 1e6:.0f}M parameters "
                     "(fields this test does not know how to shrink, e.g. a vision or audio tower)")


def max_diff_against(case: Case, store, **load_kwargs) -> tuple[float, dict]:
    """Largest |logit difference| over the prefill and DECODE_STEPS greedy steps; asserts equal tokens."""
    model = moe_offload.load(store, **load_kwargs)
    try:
        with torch.no_grad():
            diff = (model(case.ids).logits - case.prefill).abs().max().item()
        got = model.generate(case.ids, attention_mask=torch.ones_like(case.ids), max_new_tokens=DECODE_STEPS,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                             eos_token_id=None)
        assert torch.equal(got.sequences, case.sequences), (case.family, load_kwargs)
        for a, b in zip(got.logits, case.logits):
            diff = max(diff, (a - b).abs().max().item())
        return diff, model.offload_stats().as_dict()
    finally:
        model.close()


def check_family(family: str, root: Path) -> tuple[str, str]:
    """('pass', max diff) / ('refused', our message) / ('no tiny model', why) for one family."""
    try:
        case = build_case(family, root)
    except Exception as e:  # transformers itself cannot build or run a tiny model of it
        message = str(e).splitlines()[0] if str(e) else ""
        if isinstance(e, TooBig):
            return "no tiny model", message
        if "Unrecognized configuration class" in message:
            return "no tiny model", "transformers has no causal-LM class for it (multimodal, or another task)"
        return "no tiny model", f"transformers fails on its tiny config: {type(e).__name__}: {message[:140]}"
    try:
        store = moe_offload.convert(case.src, root / "store", expert_bits=16, dense_bits=16, progress=False)
        k = moe_offload.store.Store.open(store).top_k
        diff, _ = max_diff_against(case, store, experts_per_layer=k, prefetch=2)
    except MoeOffloadError as e:
        return "refused", str(e)
    return ("pass" if diff <= 1e-4 else "wrong"), f"{diff:.1e}"


os.environ.setdefault("HF_HUB_OFFLINE", "1")


def dequantized_reference(src, store_path, model):
    """transformers' own model with every weight replaced by what our store holds, dequantized."""
    from transformers import AutoModelForCausalLM

    from moe_offload import quant
    from moe_offload.store import Store

    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    store, spec = Store.open(store_path), model.offload_spec
    first = "gate_up_proj" if spec.has_gate else "up_proj"
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module).__name__ == "QuantLinear":
                ref.get_submodule(name).weight.copy_(quant.dequantize(module.qmatrix()))
        with open(store.path / "experts.bin", "rb") as f:
            for layer in spec.layers:
                experts = ref.get_submodule(layer.experts)
                for e in range(store.num_experts):
                    b = store.blob(layer.index, e)
                    f.seek(b["offset"])
                    views = store.layout.views(torch.frombuffer(bytearray(f.read(b["size"])), dtype=torch.uint8))
                    for name, param in (("gate_up", first), ("down", "down_proj")):
                        w = quant.dequantize(views[name])
                        getattr(experts, param)[e].copy_(w.t() if spec.is_transposed else w)
                        if spec.has_bias:
                            getattr(experts, f"{param}_bias")[e].copy_(views[f"{name}_bias"])
    return ref

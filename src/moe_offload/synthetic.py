"""Random Mixtral-architecture checkpoints and offline-trained tokenizers.

No model can be downloaded here, so the demo, the benchmarks and the tests build their own:
transformers' MixtralForCausalLM with random weights, saved with save_pretrained, and a byte-level
BPE tokenizer trained on text that ships with Python itself, with a Mixtral-style chat template.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)

# name -> MixtralConfig fields; "quarter" is Mixtral-8x7B at a quarter of its width.
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=1000),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000),
    "quarter": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=32, num_attention_heads=8,
                    head_dim=128, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                    vocab_size=32000),
}


# Benchmark shapes of other families: (model_type, config fields). "qwen3-quarter" is Qwen3-30B-A3B
# at a quarter of its width: 128 small experts, top-8, ~1.9B parameters (1.8B of them experts).
FAMILY_SHAPES = {
    "qwen3-quarter": ("qwen3_moe", dict(hidden_size=512, moe_intermediate_size=192, intermediate_size=1536,
                                        num_hidden_layers=48, num_attention_heads=8, num_key_value_heads=4,
                                        head_dim=128, num_experts=128, num_experts_per_tok=8, vocab_size=32000,
                                        max_position_embeddings=4096, norm_topk_prob=True)),
}


def build_shape(dst: str | Path, shape: str, *, seed: int = 0) -> Path:
    """A random model of a named benchmark shape (Mixtral SHAPES or FAMILY_SHAPES) with a tokenizer."""
    if shape in SHAPES:
        return build_random_mixtral(dst, shape, seed=seed)
    family, fields = FAMILY_SHAPES[shape]
    config = tiny_moe_config(family, **{**fields, "tie_word_embeddings": False})
    return build_random_moe(dst, config, seed=seed, dtype=torch.bfloat16)


def _corpus(max_bytes: int) -> list[str]:
    """Text every Python installation has: the standard library's own sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for f in sorted(root.glob("*.py")):
        text = f.read_text(encoding="utf-8", errors="ignore")
        out.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return out


def build_tokenizer(dst: str | Path, vocab_size: int = 1000, corpus_bytes: int = 2_000_000):
    """Train a byte-level BPE tokenizer offline and save it (with a chat template) into dst."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(corpus_bytes), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(dst)
    return fast


def mixtral_config(shape: str | dict = "tiny", **overrides):
    from transformers import MixtralConfig

    fields = dict(SHAPES[shape]) if isinstance(shape, str) else dict(shape)
    fields.update(overrides)
    fields.setdefault("max_position_embeddings", 4096)
    fields.setdefault("bos_token_id", 1)
    fields.setdefault("eos_token_id", 2)
    return MixtralConfig(**fields)


def build_random_mixtral(dst: str | Path, shape: str | dict = "tiny", *, seed: int = 0,
                         dtype: torch.dtype | None = None, tokenizer: bool = True, **overrides) -> Path:
    """Save a MixtralForCausalLM with random weights (and a tokenizer) into dst; returns dst."""
    from transformers import MixtralForCausalLM

    dst = Path(dst)
    config = mixtral_config(shape, **overrides)
    if dtype is None:
        dtype = torch.float32 if config.hidden_size < 256 else torch.bfloat16
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).to(dtype)
    model.generation_config.pad_token_id = config.eos_token_id
    model.save_pretrained(dst)
    del model
    if tokenizer:
        build_tokenizer(dst, vocab_size=min(config.vocab_size, 8000))
    return dst


# ---------------------------------------------------------------- any MoE family

# Tiny sizes for any MoE family's config class: odd widths (hidden not a power of two), an expert
# count that is not one either, top-3 routing, GQA, and a dense first layer where the family has one.
# Only the fields a config class takes are passed to it.
TINY_MOE = dict(
    hidden_size=96, intermediate_size=80, moe_intermediate_size=48, shared_expert_intermediate_size=56,
    num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, head_dim=16, vocab_size=211,
    max_position_embeddings=256, num_experts=10, num_local_experts=10, n_routed_experts=10,
    num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
    kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
    sliding_window=8, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
)


def tiny_moe_config(model_type: str, **overrides):
    """A tiny config of any family transformers knows, built from its config class."""
    import inspect

    from transformers import AutoConfig

    cls = type(AutoConfig.for_model(model_type))
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    fields = {k: v for k, v in {**TINY_MOE, **overrides}.items() if k in params or (k in overrides and takes_any)}
    if "kv_lora_rank" in params and "num_key_value_heads" not in overrides:
        fields["num_key_value_heads"] = fields["num_attention_heads"]  # latent attention (MLA): no GQA
    return cls(**fields)


@torch.no_grad()
def randomize_zero_parameters(model, seed: int = 0, scale: float = 0.1) -> None:
    """Give every parameter and persistent buffer that initializes to zero (biases, DeepSeek's
    correction bias, attention sinks) random values, so that tests check the terms they feed."""
    g = torch.Generator().manual_seed(seed)
    persistent = set(model.state_dict())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name in persistent and t.is_floating_point() and t.numel() and not t.any():
            t.copy_((torch.rand(t.shape, generator=g) * scale).to(t.dtype))


def build_random_moe(dst: str | Path, config, *, seed: int = 0, tokenizer: bool = True,
                     dtype: torch.dtype = torch.float32) -> Path:
    """Save a random model of any MoE family (config: a transformers config) into dst."""
    from transformers import AutoModelForCausalLM

    dst = Path(dst)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    randomize_zero_parameters(model, seed)
    model.generation_config.pad_token_id = getattr(config, "pad_token_id", None) or 0
    model.save_pretrained(dst)
    if tokenizer:
        build_tokenizer(dst, vocab_size=min(config.vocab_size, 8000))
    return dst

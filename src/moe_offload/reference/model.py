"""The reference model's shape and tokenizer: a Mixtral small enough to train on two CPU cores."""
from __future__ import annotations

from pathlib import Path

# 8 experts, top-2, 4 layers: ~9.1 M parameters, 18 MB in bf16; ~3 M active per token.
CONFIG = dict(hidden_size=192, intermediate_size=384, num_hidden_layers=4, num_attention_heads=6,
              num_key_value_heads=2, head_dim=32, num_local_experts=8, num_experts_per_tok=2,
              vocab_size=4096, max_position_embeddings=512, rope_theta=10000.0,
              router_aux_loss_coef=0.02, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
SEQ_LEN = 128


def default_dir() -> Path:
    """Where the shipped checkpoint lives (inside the package, so an install carries it)."""
    return Path(__file__).resolve().parent.parent / "data" / "reference"


def available(path: str | Path | None = None) -> bool:
    path = Path(path) if path else default_dir()
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def build_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on the training split, with the project's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..synthetic import CHAT_TEMPLATE

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   chat_template=CHAT_TEMPLATE)


def new_model(seed: int, **overrides):
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(**{**CONFIG, **overrides})
    return MixtralForCausalLM(config)

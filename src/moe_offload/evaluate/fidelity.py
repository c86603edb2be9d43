"""The fidelity table: perplexity of one checkpoint at several expert and dense bit widths.

Two parts. Stores: the checkpoint converted with `convert` at each (expert bits, dense bits),
evaluated through `load` (what users run). Quantizers: the checkpoint's experts replaced in
memory by their quantize-then-dequantize images, dense part untouched, for our HQQ (hqq_codes +
least-squares refit, exactly what a store holds) and for plain round-to-nearest (min-max
scale and offset per group, no optimisation) at equal bits and group size.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..config import DEFAULT_GROUP
from ..quant import dequantize, minmax_codes, quantize
from .perplexity import perplexity, store_perplexity, token_windows


def rtn(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    q, scale, lo = minmax_codes(w, bits, group)
    return (q * scale + lo).reshape(w.shape).to(w.dtype)


def ours(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    return dequantize(quantize(w.float(), bits, group)).to(w.dtype)


@torch.no_grad()
def quantized_experts_perplexity(src, text: str, bits: int, method: str, window: int = 128,
                                 max_tokens: int | None = None) -> dict:
    """Perplexity of the checkpoint with its experts fake-quantized by `method` ("rtn" or "hqq")."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    group = DEFAULT_GROUP[bits]
    fn = rtn if method == "rtn" else ours
    for layer in model.model.layers:
        experts = layer.mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            p = getattr(experts, name)  # [E, out, in]
            p.copy_(torch.stack([fn(p[e], bits, group) for e in range(p.shape[0])]))
    return perplexity(model, token_windows(tokenizer, text, window, max_tokens))


def fidelity_table(src, text: str, *, expert_bits=(16, 8, 4, 3, 2), dense_bits=(16, 4), window: int = 128,
                   max_tokens: int | None = None, workdir: str | Path | None = None, progress: bool = True) -> dict:
    from .. import convert

    rows = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for d in dense_bits:
            for e in expert_bits:
                store = convert(src, Path(tmp) / f"e{e}d{d}", expert_bits=e, dense_bits=d, progress=False)
                rows[f"experts {e}-bit, dense {d}-bit"] = store_perplexity(
                    store, text, window=window, max_tokens=max_tokens, progress=progress)["perplexity"]
    quantizers = {}
    for bits in (b for b in expert_bits if b <= 4):
        for method in ("rtn", "hqq"):
            quantizers[f"{method} {bits}-bit"] = quantized_experts_perplexity(
                src, text, bits, method, window, max_tokens)["perplexity"]
    return {"stores": rows, "quantizers": quantizers}

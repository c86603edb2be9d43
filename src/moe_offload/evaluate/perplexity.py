"""Perplexity of a model on a text: consecutive non-overlapping windows, every token predicted once
(except each window's first, which has no context)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import MoeOffloadError


def read_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise MoeOffloadError(f"no text file at {path}")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise MoeOffloadError(f"{path} is empty")
    return text


def token_windows(tokenizer, text: str, window: int, max_tokens: int | None = None) -> torch.Tensor:
    """[W, window] ids: one line of the text is one document, documents joined by the EOS token."""
    ids: list[int] = []
    for line in text.splitlines():
        if line.strip():
            ids.extend(tokenizer(line.strip(), add_special_tokens=False)["input_ids"])
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
        if max_tokens and len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens] if max_tokens else ids
    n = len(ids) // window
    if n == 0:
        raise MoeOffloadError(f"the text has {len(ids)} tokens, fewer than one window of {window}")
    return torch.tensor(ids[: n * window]).view(n, window)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int = 8, progress=None) -> dict:
    nll, count = 0.0, 0
    for chunk in windows.split(batch):
        logits = model(input_ids=chunk).logits.float()
        logp = logits[:, :-1].log_softmax(-1)
        nll -= logp.gather(-1, chunk[:, 1:, None]).sum().item()
        count += chunk[:, 1:].numel()
        if progress:
            progress(len(chunk))
    return {"perplexity": math.exp(nll / count), "tokens": count}


def store_perplexity(store, text: str, *, window: int = 128, max_tokens: int | None = None,
                     progress: bool = True) -> dict:
    """A store's perplexity with every expert resident (quality only, nothing read twice)."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from ..model import load
    from ..store import Store

    st = Store.open(store)
    tokenizer = AutoTokenizer.from_pretrained(st.path, local_files_only=True)
    windows = token_windows(tokenizer, text, window, max_tokens)
    model = load(st.path, experts_per_layer=st.num_experts, prefetch=0)
    try:
        with tqdm(total=len(windows), desc=f"perplexity {st.path.name}", unit="window", disable=not progress) as bar:
            return perplexity(model, windows, progress=bar.update)
    finally:
        model.close()

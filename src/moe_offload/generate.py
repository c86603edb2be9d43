"""Text generation with an offloaded model: the one function the CLI's generate calls."""
from __future__ import annotations

import os

import torch

from .model import load


def generate_text(store: str | os.PathLike, prompt: str, *, chat: bool = False, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stream: bool = True,
                  **load_kwargs) -> dict:
    """Generate from one prompt; streams to stdout if asked. Returns text, statistics and a summary."""
    from transformers import AutoTokenizer, TextStreamer

    model = load(store, **load_kwargs)  # first: it checks the store and says what is wrong with it
    try:
        tokenizer = AutoTokenizer.from_pretrained(store, local_files_only=True)
        if chat:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
        else:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        if seed is not None:
            torch.manual_seed(seed)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             streamer=streamer, pad_token_id=tokenizer.eos_token_id, **sampling)
        new = out[0, ids.shape[1]:]
        stats = model.offload_stats()
        return {"text": tokenizer.decode(new, skip_special_tokens=True), "prompt_tokens": ids.shape[1],
                "completion_tokens": int(new.numel()), "stats": stats.as_dict(), "summary": stats.summary()}
    finally:
        model.close()

"""`moe-offload generate` and the demo: one prompt through the shared generation engine."""
from __future__ import annotations

import os
import sys

from .engine import SamplingParams, chat_prompt_ids, generate_text
from .model import load
from .options import announce_cache, announce_preload


def generate_once(store: str | os.PathLike, prompt: str, *, chat: bool = False, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stream: bool = True,
                  echo_prompt: bool = False, **load_kwargs) -> dict:
    """Load, generate from one prompt (streaming to stdout if asked, after the prompt itself with
    `echo_prompt`), close. Returns text and statistics."""
    from transformers import AutoTokenizer

    model = load(store, **load_kwargs)  # first: it checks the store and says what is wrong with it
    announce_cache(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(store, local_files_only=True)
        if chat:
            ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
        else:
            ids = tokenizer(prompt).input_ids
        model.offload_warm_up(len(ids))  # the kernels this prompt will use: built before it is timed
        announce_preload(model)  # a cache of every expert: all of them now, not at first use
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        on_text = (lambda delta: print(delta, end="", flush=True)) if stream else None
        if stream and echo_prompt:  # now: what loading printed on stderr comes before it, not inside the line
            print(prompt, end="", flush=True)
        result = generate_text(model, tokenizer, ids, params, on_text=on_text)
        if stream:
            print(file=sys.stdout, flush=True)
        stats = model.offload_stats()
        return {"text": result.text, "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens, "finish_reason": result.finish_reason,
                "stats": stats.as_dict(), "summary": stats.summary()}
    finally:
        model.close()

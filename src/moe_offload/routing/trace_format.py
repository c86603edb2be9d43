"""The routing trace file: what a run routed, token by token, in one compressed .npz.

Arrays (N tokens, L MoE layers, k = top-k, E experts, D = lookahead depth recorded):
  experts     int16 [N, L, k]  experts each MoE layer selected for each token, router order
  weights     float16 [N, L, k] their routing weights (after normalisation)
  step        int32 [N]        the forward call the token was part of (a prefill chunk or a decode step)
  prompt      int32 [N]        index of the prompt in the prompts file
  decode      bool [N]         True for generated tokens, False for prompt (prefill) tokens
  token_ids   int32 [N]        the input token
  spec_rank   int8 [N, L, D, E] guesses: spec_rank[t, i, d-1] ranks every expert of MoE layer i+d by
                               that layer's router applied to the hidden state entering layer i
                               (what the prefetcher computes, for every K at once); -1 where i+d >= L
  first_rank  int8 [N, E]      the first MoE layer's guess, made from the previous step's most
                               likely next token (the prefetcher's guess_first_layer); -1 for prefill
  live_guess  int16 [G, 4+E]   guesses the live prefetcher made: step, target layer index, read
                               (0/1), count, then that many experts padded with -1
  meta        JSON string      version, store, num_experts, top_k, moe_layers, blob_size, the
                               settings of the traced run and its live statistics
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import MoeOffloadError

VERSION = 1
ARRAYS = ("experts", "weights", "step", "prompt", "decode", "token_ids", "spec_rank", "first_rank", "live_guess")


@dataclass
class Trace:
    experts: np.ndarray
    weights: np.ndarray
    step: np.ndarray
    prompt: np.ndarray
    decode: np.ndarray
    token_ids: np.ndarray
    spec_rank: np.ndarray
    first_rank: np.ndarray
    live_guess: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.step)

    @property
    def num_layers(self) -> int:
        return self.experts.shape[1]

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    @property
    def lookahead_depth(self) -> int:
        return self.spec_rank.shape[2]

    def steps(self):
        """(step id, token indices) in order."""
        bounds = np.flatnonzero(np.diff(self.step)) + 1
        for idx in np.split(np.arange(self.num_tokens), bounds):
            if len(idx):
                yield int(self.step[idx[0]]), idx

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        arrays = {name: getattr(self, name) for name in ARRAYS}
        np.savez_compressed(path, meta=np.array(json.dumps(self.meta)), **arrays)
        return path


def load_trace(path: str | Path) -> Trace:
    path = Path(path)
    if not path.is_file():
        raise MoeOffloadError(f"no trace file at {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:
        raise MoeOffloadError(f"{path} is not a routing trace (.npz): {e}") from None
    missing = [k for k in ARRAYS + ("meta",) if k not in data]
    if missing:
        raise MoeOffloadError(f"{path} is not a routing trace: it lacks {', '.join(missing)}")
    meta = json.loads(str(data.pop("meta")))
    if meta.get("version") != VERSION:
        raise MoeOffloadError(f"{path}: trace version {meta.get('version')} (this version reads {VERSION})")
    trace = Trace(**data, meta=meta)
    n = trace.num_tokens
    if any(len(getattr(trace, k)) != n for k in ARRAYS if k != "live_guess"):
        raise MoeOffloadError(f"{path}: its arrays disagree on the number of tokens")
    if n and (trace.experts.max() >= trace.num_experts or trace.experts.min() < 0):
        raise MoeOffloadError(f"{path}: an expert index is outside 0..{trace.num_experts - 1}")
    return trace

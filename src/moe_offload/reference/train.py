"""Train the reference model: seeded, resumable, with a progress bar.

The state (weights, optimizer, step) is saved to OUT/train_state.pt every SAVE_EVERY steps and
picked up again by the next run; each step's batch is drawn from a generator seeded by (seed,
step), so a resumed run sees the batches an uninterrupted run would have seen. At the end the
model is saved in bf16 with save_pretrained, with the tokenizer and `training.json` (loss curve,
held-out perplexity, per-layer expert usage, time).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from . import corpus
from .model import CONFIG, SEQ_LEN, build_tokenizer, new_model

SAVE_EVERY = 50


def balance_loss(router_logits, num_experts: int, top_k: int) -> torch.Tensor:
    """Switch-Transformer load balancing, per layer, averaged. transformers' Mixtral loss pools all
    layers' logits before measuring balance, so it tolerates dead experts in one layer as long as
    the pool is balanced (a first run trained with it left 5 of 32 experts unused)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return sum(load_balancing_loss_func((logits,), num_experts, top_k) for logits in router_logits) / len(router_logits)


def encode(tokenizer, docs: list[str]) -> torch.Tensor:
    """One token stream: each chapter followed by the end-of-sequence token."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def batch(stream: torch.Tensor, size: int, seed: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - SEQ_LEN - 1, (size,), generator=g)
    return torch.stack([stream[s:s + SEQ_LEN + 1] for s in starts.tolist()])


def lr_at(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))  # cosine to 10%


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, max_windows: int = 200) -> dict:
    """Held-out perplexity over consecutive windows, and how often each layer picks each expert."""
    model.eval()
    n_layers, n_exp, k = model.config.num_hidden_layers, model.config.num_local_experts, model.config.num_experts_per_tok
    counts = torch.zeros(n_layers, n_exp)
    nll, tokens = 0.0, 0
    windows = stream[: (len(stream) // (SEQ_LEN + 1)) * (SEQ_LEN + 1)].view(-1, SEQ_LEN + 1)[:max_windows]
    for chunk in windows.split(16):
        out = model(input_ids=chunk[:, :-1], output_router_logits=True)
        logp = out.logits.float().log_softmax(-1)
        nll -= logp.gather(-1, chunk[:, 1:, None]).sum().item()
        tokens += chunk[:, 1:].numel()
        for layer, logits in enumerate(out.router_logits):
            counts[layer] += torch.bincount(logits.topk(k, -1).indices.reshape(-1), minlength=n_exp).float()
    model.train()
    usage = (counts / counts.sum(1, keepdim=True)).tolist()
    return {"held_out_perplexity": math.exp(nll / tokens), "held_out_tokens": tokens,
            "expert_usage": [[round(u, 4) for u in row] for row in usage]}


def train(out: str | Path, *, steps: int = 700, batch_size: int = 24, lr: float = 3e-3, seed: int = 0,
          threads: int | None = None, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    train_docs, held_docs = corpus.load_split()
    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    else:
        tokenizer = build_tokenizer(train_docs, CONFIG["vocab_size"])
        tokenizer.save_pretrained(tok_dir)
    train_stream, held_stream = encode(tokenizer, train_docs), encode(tokenizer, held_docs)

    model = new_model(seed)
    model.generation_config.pad_token_id = CONFIG["eos_token_id"]
    model.router_aux_loss_coef = 0.0  # the loss below replaces transformers' pooled one
    coef, E, k = CONFIG["router_aux_loss_coef"], CONFIG["num_local_experts"], CONFIG["num_experts_per_tok"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    state_file, log, step, seconds = out / "train_state.pt", [], 0, 0.0
    if state_file.is_file():
        state = torch.load(state_file, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, log, seconds = state["step"], state["log"], state["seconds"]
        print(f"resuming from step {step}")
    model.train()
    bar = tqdm(total=steps, initial=step, desc="training", unit="step", disable=not progress)
    started = time.perf_counter() - seconds
    while step < steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        x = batch(train_stream, batch_size, seed, step)
        # transformers shifts the labels by one itself: labels are the inputs
        result = model(input_ids=x, labels=x, output_router_logits=True)
        aux = balance_loss(result.router_logits, E, k)
        loss = result.loss + coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        log.append([step, round(result.loss.item(), 4), round(aux.item(), 4)])
        bar.update(1)
        bar.set_postfix(loss=f"{result.loss.item():.3f}", balance=f"{aux.item():.3f}")
        if step % SAVE_EVERY == 0 or step == steps:
            seconds = time.perf_counter() - started
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "log": log,
                        "seconds": seconds}, state_file.with_suffix(".tmp"))
            state_file.with_suffix(".tmp").replace(state_file)
    bar.close()
    seconds = time.perf_counter() - started
    report = {"steps": steps, "batch_size": batch_size, "seq_len": SEQ_LEN, "seed": seed, "lr": lr,
              "train_seconds": round(seconds, 1), "train_tokens": len(train_stream),
              "tokens_seen": steps * batch_size * SEQ_LEN, "final_train_loss": log[-1][1],
              **evaluate(model, held_stream)}
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps({**report, "loss_curve": log[::10]}, indent=1))
    return report

"""Where a decode token's time goes, on the path `resident` decodes and part by part.

    flock /tmp/cpu.lock .venv/bin/python tools/decode_breakdown.py STORE [TOKENS]

Every expert is made resident first (the `resident` bench mode), so no time is spent on disk.
1. The stacked path (stack_decode.py: every decoder layer of a token in one kernel call), timed by
   wrapping the kernel call and hooking the model and lm_head (hooks on the layers would turn the
   stack off): the kernel, lm_head, the rest of the model's forward, generate() between forwards.
2. The layer-by-layer path (as a token the stack does not take runs), wall time per part of every
   layer from forward hooks. The parts are transformers' own modules; "experts" is the stock experts
   module running our offloaded implementation.
"""
import collections
import statistics
import sys
import time

from transformers import AutoTokenizer

import moe_offload
from moe_offload import _decode_jit
from moe_offload.stack_decode import layer_by_layer
from moe_offload.store import Store


def main(store: str, tokens: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(store, local_files_only=True)
    model = moe_offload.load(store, experts_per_layer=Store.open(store).num_experts, prefetch=0)
    ids = tokenizer("Write the recipe for a chicken curry with coconut milk.", return_tensors="pt").input_ids

    def generate(n):  # exactly n tokens, as the bench generates (no end-of-sequence ends the run)
        return model.generate(ids, max_new_tokens=n, eos_token_id=None, do_sample=False)

    generate(2)
    model.offload_runtime.preload()
    generate(6)  # past the decode paths' self-checks (the first four decode tokens)
    stacked_split(model, generate, tokens)
    spent, started, on = collections.Counter(), {}, [False]

    def watch(name, module):
        def pre(*_):
            if on[0]:
                started[name] = time.perf_counter()

        def post(*_):
            if on[0] and name in started:
                spent[name] += time.perf_counter() - started.pop(name)
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    for layer in model.model.layers:
        watch("input norm", layer.input_layernorm)
        watch("attention (q/k/v/o products, rotary, SDPA, KV cache)", layer.self_attn)
        watch("post-attention norm", layer.post_attention_layernorm)
        watch("MoE block", layer.mlp)
        watch("  router", layer.mlp.gate)
        watch("  experts (ours)", layer.mlp.experts)
        watch("decoder layer", layer)
    watch("lm_head", model.lm_head)
    watch("model forward", model)

    def run(n):
        spent.clear()
        on[0] = True
        t = time.perf_counter()
        generate(n)
        wall = time.perf_counter() - t
        on[0] = False
        return dict(spent), wall

    # The difference of an n+1-token and a 1-token generate leaves n decode steps without the prefill.
    with layer_by_layer(model):
        one, wall_one = run(1)
        many, wall_many = run(tokens + 1)
    per = lambda k: (many[k] - one.get(k, 0)) / tokens * 1e3
    print(f"\nlayer by layer, forward hooks: {(wall_many - wall_one) / tokens * 1e3:.1f} ms/token over {tokens} tokens")
    for k in many:
        print(f"{per(k):8.2f} ms/token  {k}")
    outside = (wall_many - wall_one) / tokens * 1e3 - per("model forward")
    print(f"{outside:8.2f} ms/token  generate() between forwards")
    model.close()


def stacked_split(model, generate, tokens: int) -> None:
    """Medians over the decode tokens of one generate: token (between two logits), forward, kernel, lm_head."""
    marks = {"kernel": [], "forward": [], "lm_head": [], "token": []}
    real_stack, started = _decode_jit.stack, {}

    def timed_stack(*args):
        t = time.perf_counter()
        out = real_stack(*args)
        marks["kernel"].append(time.perf_counter() - t)
        return out

    def start(key):
        return lambda *_: started.__setitem__(key, time.perf_counter())

    def stop(key):
        return lambda *_: marks[key].append(time.perf_counter() - started[key])

    head = model.get_output_embeddings()
    handles = [model.register_forward_pre_hook(start("forward")), model.register_forward_hook(stop("forward")),
               head.register_forward_pre_hook(start("lm_head")), head.register_forward_hook(stop("lm_head")),
               head.register_forward_hook(lambda *_: marks["token"].append(time.perf_counter()))]
    _decode_jit.stack = timed_stack
    try:
        generate(tokens + 1)
    finally:
        _decode_jit.stack = real_stack
        for h in handles:
            h.remove()
    if len(marks["kernel"]) < tokens:
        print(f"the stack took {len(marks['kernel'])} of {tokens} decode tokens: no stacked split")
        return
    med = lambda v: statistics.median(v) * 1e3  # noqa: E731
    token, forward, kernel, head_ms = (med([b - a for a, b in zip(marks["token"][1:], marks["token"][2:])]),
                                       med(marks["forward"][1:]), med(marks["kernel"]), med(marks["lm_head"][1:]))
    print(f"stacked path (medians over {tokens} decode tokens): {token:.2f} ms/token")
    for ms, what in ((kernel, "the stack kernel: every decoder layer, one call"), (head_ms, "lm_head"),
                     (forward - kernel - head_ms, "the rest of the model's forward (Python, embedding, norm)"),
                     (token - forward, "generate() between forwards")):
        print(f"{ms:8.2f} ms/token  {what}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 32)

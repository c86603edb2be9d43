"""Where a decode token's time goes: wall time per part of every layer, from forward hooks.

    flock /tmp/cpu.lock .venv/bin/python tools/decode_breakdown.py STORE [TOKENS]

Every expert is made resident first (the `resident` bench mode), so no time is spent on disk.
The parts are transformers' own modules; "experts" is the stock experts module running our offloaded implementation.
"""
import collections
import sys
import time

from transformers import AutoTokenizer

import moe_offload
from moe_offload.bench.mode import _load_all_experts
from moe_offload.store import Store


def main(store: str, tokens: int) -> None:
    tokenizer = AutoTokenizer.from_pretrained(store, local_files_only=True)
    model = moe_offload.load(store, experts_per_layer=Store.open(store).num_experts, prefetch=0)
    ids = tokenizer("Write the recipe for a chicken curry with coconut milk.", return_tensors="pt").input_ids

    def generate(n):
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    generate(2)
    _load_all_experts(model)
    generate(4)
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
    one, wall_one = run(1)
    many, wall_many = run(tokens + 1)
    per = lambda k: (many[k] - one.get(k, 0)) / tokens * 1e3
    print(f"decode: {(wall_many - wall_one) / tokens * 1e3:.1f} ms/token over {tokens} tokens")
    for k in many:
        print(f"{per(k):8.2f} ms/token  {k}")
    outside = (wall_many - wall_one) / tokens * 1e3 - per("model forward")
    print(f"{outside:8.2f} ms/token  generate() between forwards")
    model.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 32)

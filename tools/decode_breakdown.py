"""Where a decode token's time goes, on the path `resident` decodes and part by part.

    flock /tmp/cpu.lock .venv/bin/python tools/decode_breakdown.py STORE [TOKENS]

Every expert is made resident first (the `resident` bench mode), so no time is spent on disk.
1. The stacked path (stack_decode.py: every decoder layer of a token in one kernel call), timed by
   wrapping the kernel call and hooking the model and lm_head (hooks on the layers would turn the
   stack off): the kernel, lm_head, the rest of the model's forward, generate() between forwards.
   Then the same kernel call repeated back to back, next to a plain read of the weights it reads
   (one 8-byte load per 64-byte line, the bytes split in halves over 2 threads): how close the kernel
   comes to the rate this machine streams those bytes at, whatever its RAM benchmark says.
2. The layer-by-layer path (as a token the stack does not take runs), wall time per part of every
   layer from forward hooks. The parts are transformers' own modules; "experts" is the stock experts
   module running our offloaded implementation.
"""
import collections
import statistics
import sys
import time

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic
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
    real_stack, started, last = _decode_jit.stack, {}, []

    def timed_stack(*args):
        last[:] = [args]
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
    kernel_against_reads(real_stack, last[0])


@intrinsic
def _load8(typingctx, addr):
    """The 8 bytes at an address (the expert slots are reached by address, as the kernel reaches them)."""
    def codegen(context, builder, signature, args):
        return builder.load(builder.inttoptr(args[0], ir.IntType(64).as_pointer()))
    return types.uint64(types.int64), codegen


@njit(parallel=True, nogil=True)
def _read_lines(starts, sizes, nthreads):
    """One load per 64-byte line of every range; thread t reads the t-th part of each range."""
    out = np.zeros(nthreads, np.uint64)
    for t in prange(nthreads):
        s = np.uint64(0)
        for i in range(starts.shape[0]):
            part = sizes[i] // nthreads // 64 * 64
            for off in range(starts[i] + t * part, starts[i] + (t + 1) * part, 64):
                s ^= _load8(off)
        out[t] = s
    return out


def kernel_against_reads(stack, args, rounds: int = 5, calls: int = 8) -> None:
    """The last decode token's stack call again, back to back, against _read_lines over the weights
    that call read: the q/k/v/o tiles of every layer and the gate_up and down tiles of its experts."""
    (tag, x, cos, sin, n, n1w, n1eps, tq, tk, tv, bq, bk, bv, qn, kn, bits_groups, qk_eps, to, bo, scale, heads, kv_heads,
     hd, n2w, n2eps, rw, rb, k, renorm, tables, meta, inter, bbuf, fbuf, counters, addrs, nthreads, knp, vnp, idx) = args
    x0, H = x.copy(), x.shape[0]
    gate_up = (2 * inter // 16) * (H // meta[1]) * meta[2]
    down = ((H + 15) // 16) * (inter // meta[4]) * meta[5]
    ranges = [(t.ctypes.data, t.nbytes) for layer in range(len(tq)) for t in (tq[layer], tk[layer], tv[layer], to[layer])]
    ranges += [(int(tables[layer][m, e]), gate_up if m == 0 else down)  # idx: the experts of the call's input
               for layer in range(len(tq)) for e in idx[layer] for m in (0, 1)]
    starts, sizes = np.array([r[0] for r in ranges], np.int64), np.array([r[1] for r in ranges], np.int64)
    nbytes = int(sizes.sum())

    def kernel():
        x[:] = x0
        stack(*args)

    def median(f):
        f()
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    print(f"\nthe stack kernel back to back against reading its {nbytes / 1e6:.1f} MB of weights once "
          f"(medians of {calls} calls, alternating):")
    for _ in range(rounds):
        tk_, tr = median(kernel), median(lambda: _read_lines(starts, sizes, nthreads))
        print(f"   kernel {tk_ * 1e3:6.2f} ms ({nbytes / tk_ / 1e9:5.1f} GB/s), read {tr * 1e3:6.2f} ms "
              f"({nbytes / tr / 1e9:5.1f} GB/s): the kernel at {tr / tk_:.2f} of the read's rate")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 32)

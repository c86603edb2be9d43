"""Stores in the "rowtile" format compute each decode token's experts of a layer in one kernel call
(kernels_layer.moe_layer_decode) and a prompt's in one call per pool's worth of experts
(moe_layer_rows); it must agree with transformers on our dequantized weights up to
its int8 activations, and the plain reference path must agree exactly."""
import pytest
import torch

import moe_offload
from families import NAMED, dequantized_reference
from moe_offload import kernels, kernels_layer
from moe_offload.quant import effective_group
from moe_offload.store import Store
from moe_offload.synthetic import build_random_moe, tiny_moe_config

STEPS = 8


@pytest.mark.parametrize("family,overrides", [("mixtral", {"hidden_size": 64, "intermediate_size": 96}),
                                              ("qwen3_moe", {"hidden_size": 96, "moe_intermediate_size": 64,
                                                             "num_experts_per_tok": 8, "num_experts": 12})])
def test_one_call_per_layer_matches_transformers(family, overrides, tmp_path, monkeypatch):
    config = tiny_moe_config(family, **{**NAMED[family], **overrides})
    src = build_random_moe(tmp_path / "src", config, seed=2, tokenizer=False)
    store = moe_offload.convert(src, tmp_path / "st", expert_bits=4, dense_bits=16, expert_format="rowtile",
                                progress=False)
    assert Store.open(store).layout.matrices["gate_up"]["fmt"] == "rowtile"
    calls, row_calls = [], []
    real = kernels_layer.moe_layer_decode_at  # every one-call decode goes through it
    monkeypatch.setattr(kernels_layer, "moe_layer_decode_at", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    real_rows = kernels_layer.moe_layer_rows
    monkeypatch.setattr(kernels_layer, "moe_layer_rows",
                        lambda *a, **k: row_calls.append(len(a[1])) or real_rows(*a, **k))
    top_k = Store.open(store).top_k
    model = moe_offload.load(store, experts_per_layer=top_k)  # the smallest cache: every slot pinned at once
    try:
        ref = dequantized_reference(src, store, model)
        ids = torch.randint(3, config.vocab_size, (1, 6))
        kwargs = dict(max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True,
                      pad_token_id=0, eos_token_id=None)
        expected = ref.generate(ids, **kwargs)
        with kernels.use_reference():
            exact = model.generate(ids, **kwargs)
        assert not calls and not row_calls  # the reference path computes expert by expert
        assert torch.equal(exact.sequences, expected.sequences)
        assert max((a - b).abs().max().item() for a, b in zip(exact.logits, expected.logits)) <= 1e-4
        fast = model.generate(expected.sequences[:, :ids.shape[1]], **kwargs)
        n_moe = len(Store.open(store).moe_layers)
        assert len(calls) == (STEPS - 1) * n_moe and set(calls) == {top_k}  # one call per layer and token
        # prefill: the prompt's experts in one call per layer, or one per expert where they outnumber
        # the pool (top-k slots here)
        assert len(row_calls) >= n_moe and set(row_calls) <= {1} | set(range(1, top_k + 1))
        # int8 activations: ~1% per layer; a near-tie in a router may flip one token's expert.
        scale = max(b.abs().max().item() for b in expected.logits)
        diffs = torch.tensor([(a - b).abs().max().item() for a, b in zip(fast.logits, expected.logits)])
        assert diffs.median() <= 3e-2 * scale, diffs
        assert diffs[0] <= 3e-2 * scale, diffs  # the prefill's logits
    finally:
        model.close()


def test_prefill_rows_are_the_same_at_every_cache_size(tmp_path, monkeypatch):
    """A prompt's experts: one call per layer when the pool holds them all, one per expert as the cache
    delivers them when it does not; the logits are the same floats either way."""
    config = tiny_moe_config("qwen3_moe", **{**NAMED["qwen3_moe"], "hidden_size": 96, "moe_intermediate_size": 64,
                                             "num_experts_per_tok": 4, "num_experts": 12})
    src = build_random_moe(tmp_path / "src", config, seed=3, tokenizer=False)
    store = moe_offload.convert(src, tmp_path / "st", expert_bits=4, dense_bits=16, expert_format="rowtile",
                                progress=False)
    ids = torch.randint(3, config.vocab_size, (1, 24))
    real_rows = kernels_layer.moe_layer_rows
    logits, sizes = {}, {}
    for slots in (12, 4):
        calls = []
        monkeypatch.setattr(kernels_layer, "moe_layer_rows", lambda *a, **k: calls.append(len(a[1])) or real_rows(*a, **k))
        model = moe_offload.load(store, experts_per_layer=slots, prefetch=0)
        try:
            logits[slots] = model(ids).logits
        finally:
            model.close()
        sizes[slots] = calls
    n_moe = len(Store.open(store).moe_layers)
    assert len(sizes[12]) == n_moe and min(sizes[12]) > 4  # 24 tokens x top-4 use more than 4 of 12 experts
    assert set(sizes[4]) == {1} and len(sizes[4]) == sum(sizes[12])
    assert torch.equal(logits[12], logits[4])


def test_warm_up_loads_the_rowtile_kernels_and_int4pack_prefill_only_for_long_prompts(tmp_path, tiny_src, monkeypatch):
    from moe_offload import kernels_int4pack

    store = moe_offload.convert(tiny_src, tmp_path / "st", expert_bits=4, dense_bits=4, expert_format="rowtile",
                                progress=False)
    warmed = []
    real = kernels_layer.warm_up
    monkeypatch.setattr(kernels_layer, "warm_up", lambda: warmed.append("rowtile") or real())
    monkeypatch.setattr(kernels_int4pack, "warm_up", lambda shapes: warmed.append(("int4pack", len(shapes))))
    model = moe_offload.load(store, experts_per_layer=2)
    try:
        model.offload_warm_up(3)
        assert warmed == ["rowtile"]
        model.offload_warm_up()
        assert warmed[1] == "rowtile" and warmed[2][0] == "int4pack"  # no prompt size: every kernel
    finally:
        model.close()
    # chat and serve load through engine.load_model, which warms every kernel before the first prompt
    import argparse

    from moe_offload.engine import load_model

    warmed.clear()
    args = argparse.Namespace(store=str(store), expert_cache=None, experts_per_layer=2, prefetch=2, lookahead=1,
                              cache_scope="layer")
    model, _ = load_model(args)
    try:
        assert warmed[0] == "rowtile" and warmed[1][0] == "int4pack"
    finally:
        model.close()


def test_rowtile_is_refused_where_it_cannot_store(tmp_path, tiny_src):
    with pytest.raises(moe_offload.MoeOffloadError, match="rowtile"):
        moe_offload.convert(tiny_src, tmp_path / "x", expert_bits=16, expert_format="rowtile", progress=False)
    with pytest.raises(moe_offload.MoeOffloadError, match="expert_format"):
        moe_offload.convert(tiny_src, tmp_path / "x", expert_format="mxfp4", progress=False)
    assert not (tmp_path / "x").exists()
    with pytest.raises(moe_offload.MoeOffloadError, match="rowtile format reads groups of 32, 64, 128"):
        moe_offload.convert(tiny_src, tmp_path / "x", expert_bits=2, group_size=16, expert_format="rowtile",
                            progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("bits,group", [(2, 32), (8, 128)])
def test_rowtile_at_2_and_8_bits_moves_the_default_group_into_its_range(tmp_path, tiny_src, bits, group):
    """2-bit's default group (16) and 8-bit's per-row scale (group 0) are groups rowtile cannot read:
    an explicit rowtile store takes the nearest it can (first seen failing on the GPU check)."""
    store = moe_offload.convert(tiny_src, tmp_path / "st", expert_bits=bits, dense_bits=4, expert_format="rowtile",
                                progress=False)
    st = Store.open(store)
    assert st.manifest["quant"]["expert_group"] == group
    assert {m["fmt"] for m in st.layout.matrices.values()} == {"rowtile"}
    assert all(m["group"] == effective_group(m["k"], group) for m in st.layout.matrices.values())
    ids = torch.randint(0, 256, (1, 7))
    model = moe_offload.load(store)
    try:
        with torch.no_grad():
            fast = model(ids).logits
            with kernels.use_reference():
                reference = model(ids).logits
    finally:
        model.close()
    assert (fast - reference).abs().max().item() <= 0.05 * reference.abs().max().item()


@pytest.mark.parametrize("family,overrides", [("mixtral", {"hidden_size": 64, "intermediate_size": 96,
                                                           "sliding_window": None}),  # (a window masks each step)
                                              ("qwen3_moe", {"hidden_size": 96, "moe_intermediate_size": 64,
                                                             "num_experts_per_tok": 4, "num_experts": 12}),
                                              ("qwen3_moe", {"hidden_size": 96, "moe_intermediate_size": 64,
                                                             "num_experts_per_tok": 4, "num_experts": 16,
                                                             "mlp_only_layers": []})])  # every layer MoE: stacked
def test_the_fused_layer_step_computes_misses_and_guesses_as_the_module_call(family, overrides, tmp_path,
                                                                            monkeypatch):
    """With one-call experts and quantized dense layers, every decode step after the checks is one fused
    layer step (layer_decode._fused) that computes the experts itself (LayerExperts.decode_step): with
    every expert resident, with misses at a cache of top-k, and with the prefetcher's guesses. It must
    give the module call's floats and, without guesses (whose hits depend on when reads complete), the
    same hits and misses. With every expert loaded first and no prefetcher, the experts are computed
    in the attention call (attend_route_experts) at every fused step, and once a token has shown the
    layers' order, every later token's layers are one call (stack_decode): the same floats and hits."""
    from moe_offload import _decode_jit, attention_decode, layer_decode
    from moe_offload.moe import LayerExperts

    config = tiny_moe_config(family, **{**NAMED[family], **overrides})
    src = build_random_moe(tmp_path / "src", config, seed=5, tokenizer=False)
    store = moe_offload.convert(src, tmp_path / "st", expert_bits=4, dense_bits=4, expert_format="rowtile",
                                progress=False)
    st = Store.open(store)
    # A one-token prompt: every step then waits for all its reads (a longer prompt's experts can
    # outnumber the pool, and which slot its last reads leave loading depends on the disk's timing).
    ids = torch.randint(3, config.vocab_size, (1, 1))
    module_calls, fused_steps = [], []
    real_call, real_fused = LayerExperts.__call__, layer_decode._LayerPath._fused
    monkeypatch.setattr(LayerExperts, "__call__", lambda *a: module_calls.append(1) or real_call(*a))
    monkeypatch.setattr(layer_decode._LayerPath, "_fused", lambda *a: fused_steps.append(1) or real_fused(*a))
    # (counted where Python calls them: a numba function that calls another reads it as a global)
    in_attention, real_attend_route = [], attention_decode.attend_route
    monkeypatch.setattr(attention_decode, "attend_route", lambda *a, **k: (
        k.get("experts") is not None and in_attention.append(1)) or real_attend_route(*a, **k))
    stacked, real_stack = [], _decode_jit.stack
    monkeypatch.setattr(_decode_jit, "stack", lambda *a: stacked.append(1) or real_stack(*a))

    def run(fuse: bool, preload: bool = False, **options):
        module_calls.clear(), fused_steps.clear(), in_attention.clear(), stacked.clear()
        model = moe_offload.load(store, **options)
        try:
            if preload:
                model.offload_runtime.preload()
            for m in model.modules():
                if isinstance(getattr(m, "_decode_path", None), layer_decode._LayerPath):
                    m._decode_path.fused = fuse
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, min_new_tokens=STEPS,
                                 do_sample=False,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
            cache = model.offload_runtime.cache
            books = (dict(cache.uses), {k: list(p.lru) for k, p in cache.pools.items()})  # LFU counts, LRU order
            return (torch.stack(out.logits), model.offload_stats().as_dict(), len(module_calls), len(fused_steps),
                    len(in_attention), len(stacked), books)
        finally:
            model.close()

    n_moe = len(st.moe_layers)
    for options in (dict(experts_per_layer=st.num_experts, prefetch=0), dict(experts_per_layer=st.top_k, prefetch=0),
                    dict(experts_per_layer=st.top_k + 1, prefetch=2),
                    dict(experts_per_layer=st.num_experts, prefetch=0, preload=True)):
        fused, fused_stats, fused_calls, steps, in_attention_steps, stacked_tokens, fused_books = run(True, **options)
        unfused, unfused_stats, unfused_calls, _, unfused_in_attention, unfused_stacked, unfused_books = run(False, **options)
        assert torch.equal(fused, unfused)
        # a layer's first decode step checks its attention, the second the layer; every later one is
        # fused: layer by layer, or all layers in one call (a stacked token)
        assert steps + n_moe * stacked_tokens == n_moe * (STEPS - 2)
        assert fused_calls == unfused_calls - n_moe * (STEPS - 2)  # none of those makes the experts' module call
        assert unfused_in_attention == unfused_stacked == 0
        if options.get("preload") and n_moe < config.num_hidden_layers:  # a dense MLP layer: no stack
            assert in_attention_steps == steps and stacked_tokens == 0
        elif options.get("preload"):  # (without it, a layer may become fully resident mid-way)
            # layer by layer: the first fused token, which shows the layers' order; every later
            # token stacked (the stack moves the prompt's KV cache into kv_buffer's buffers itself)
            assert in_attention_steps == steps == n_moe
            assert stacked_tokens == STEPS - 3
        elif options["experts_per_layer"] < st.num_experts or options["prefetch"]:
            assert in_attention_steps == stacked_tokens == 0
        if not options["prefetch"]:
            assert fused_stats["hits_per_layer"] == unfused_stats["hits_per_layer"]
            assert fused_stats["misses_per_layer"] == unfused_stats["misses_per_layer"]
            assert fused_books == unfused_books
        if options["experts_per_layer"] == st.top_k:
            assert sum(fused_stats["misses_per_layer"]) > 2 * st.top_k * n_moe  # more than the unfused steps made
        if options["prefetch"]:
            assert fused_stats["prefetch_guesses"] > 0


def _mixtral_store(tmp_path, seed: int):
    """A small mixtral without a sliding window (every decode token can be stacked), converted with
    one-call experts and 4-bit dense layers: (config, store)."""
    config = tiny_moe_config("mixtral", **{**NAMED["mixtral"], "hidden_size": 64, "intermediate_size": 96,
                                          "sliding_window": None})
    src = build_random_moe(tmp_path / "src", config, seed=seed, tokenizer=False)
    return config, moe_offload.convert(src, tmp_path / "st", expert_bits=4, dense_bits=4, expert_format="rowtile",
                                       progress=False)


def test_the_stacked_step_gives_way_to_hooks_on_the_layers(tmp_path):
    """A hook on a decoder layer (a user's; transformers' own, installed by a request for hidden
    states) makes every later token run layer by layer (the stack's output would be seen as every
    layer's): what the hooks see is what they see on the unfused steps, bit for bit."""
    from moe_offload import _decode_jit, layer_decode

    config, store = _mixtral_store(tmp_path, seed=7)
    ids = torch.randint(3, config.vocab_size, (1, 3))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
              return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)

    def run(fuse: bool):
        model = moe_offload.load(store, experts_per_layer=Store.open(store).num_experts, prefetch=0)
        try:
            model.offload_runtime.preload()
            for m in model.modules():
                if isinstance(getattr(m, "_decode_path", None), layer_decode._LayerPath):
                    m._decode_path.fused = fuse
            calls = []
            real = _decode_jit.stack
            _decode_jit.stack = lambda *a: calls.append(1) or real(*a)
            seen = []
            try:
                plain = model.generate(ids, **kw)
                stacked = len(calls)
                handle = model.model.layers[1].register_forward_hook(lambda m, a, out: seen.append(out.clone()))
                model.generate(ids, **kw)
                handle.remove()
                hidden = model.generate(ids, output_hidden_states=True, **kw)
                return plain.sequences, stacked, len(calls) - stacked, seen, hidden
            finally:
                _decode_jit.stack = real
        finally:
            model.close()

    seq, stacked, stacked_with_hooks, seen, hidden = run(True)
    ref_seq, ref_stacked, _, ref_seen, ref_hidden = run(False)
    assert stacked > 0 and stacked_with_hooks == 0 and ref_stacked == 0
    assert torch.equal(seq, ref_seq) and torch.equal(hidden.sequences, ref_seq)
    assert len(seen) == len(ref_seen) == STEPS and all(torch.equal(a, b) for a, b in zip(seen, ref_seen))
    for step, ref_step in zip(hidden.hidden_states, ref_hidden.hidden_states):
        assert len(step) == config.num_hidden_layers + 1
        assert all(torch.equal(a, b) for a, b in zip(step, ref_step))


def _all_moe_qwen3_store(tmp_path, seed: int):
    """A qwen3_moe model whose every layer is MoE (so every decode token can be stacked), converted
    with one-call experts and 4-bit dense layers: (config, store)."""
    config = tiny_moe_config("qwen3_moe", **{**NAMED["qwen3_moe"], "hidden_size": 96, "moe_intermediate_size": 64,
                                            "num_experts_per_tok": 4, "num_experts": 16, "mlp_only_layers": []})
    src = build_random_moe(tmp_path / "src", config, seed=seed, tokenizer=False)
    return config, moe_offload.convert(src, tmp_path / "st", expert_bits=4, dense_bits=4, expert_format="rowtile",
                                       progress=False)


def test_two_threads_decode_stacked_with_one_model(tmp_path):
    """The stacked step keeps its hand-on state per thread: two generations running at once, each
    stacked, give what each gives alone."""
    import sys
    import threading

    from moe_offload import _decode_jit

    config, store = _all_moe_qwen3_store(tmp_path, seed=3)
    model = moe_offload.load(store, experts_per_layer=Store.open(store).num_experts, prefetch=0)
    calls, real = [], _decode_jit.stack
    _decode_jit.stack = lambda *a: calls.append(1) or real(*a)
    try:
        model.offload_runtime.preload()
        prompts = [torch.randint(3, config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
        kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None,
                  output_logits=True, return_dict_in_generate=True, attention_mask=torch.ones(1, 5, dtype=torch.long))
        alone = [model.generate(p, **kw) for p in prompts]
        before = len(calls)
        together = [None, None]

        def run(i):
            for _ in range(3):
                together[i] = model.generate(prompts[i], **kw)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # switch threads often: between a token's layers too
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            sys.setswitchinterval(interval)
        assert before > 0 and len(calls) > before
        for a, b in zip(alone, together):
            assert torch.equal(a.sequences, b.sequences)
            assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))
    finally:
        _decode_jit.stack = real
        model.close()


def test_a_later_prompt_stacks_from_its_first_token_and_through_buffer_growth(tmp_path):
    """After a prompt, the stack moves the layers' keys and values into kv_buffer's buffers itself,
    and into larger ones when a buffer is full: every decode token of a later prompt is stacked,
    with the unfused steps' floats."""
    from moe_offload import _decode_jit, kv_buffer, layer_decode

    config, store = _mixtral_store(tmp_path, seed=13)
    first = torch.randint(3, config.vocab_size, (1, 3), generator=torch.Generator().manual_seed(1))
    # room for 64 positions (kv_buffer._MIN_ROOM) after a 30-token prompt: full after 34 new tokens
    later = torch.randint(3, config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2))
    new = kv_buffer._MIN_ROOM - later.shape[1] + 6
    kw = dict(do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)

    def run(fuse: bool):
        model = moe_offload.load(store, experts_per_layer=Store.open(store).num_experts, prefetch=0)
        calls, real = [], _decode_jit.stack
        _decode_jit.stack = lambda *a: calls.append(1) or real(*a)
        try:
            model.offload_runtime.preload()
            for m in model.modules():
                if isinstance(getattr(m, "_decode_path", None), layer_decode._LayerPath):
                    m._decode_path.fused = fuse
            model.generate(first, attention_mask=torch.ones_like(first), max_new_tokens=STEPS, min_new_tokens=STEPS,
                           **kw)
            before = len(calls)
            out = model.generate(later, attention_mask=torch.ones_like(later), max_new_tokens=new,
                                 min_new_tokens=new, **kw)
            return torch.stack(out.logits), len(calls) - before
        finally:
            _decode_jit.stack = real
            model.close()

    fused, stacked = run(True)
    unfused, unfused_stacked = run(False)
    assert stacked == new - 1 and unfused_stacked == 0  # every decode forward, the one past the room too
    assert torch.equal(fused, unfused)


def test_the_stack_gives_the_same_floats_whoever_joins_its_region(tmp_path):
    """The stack kernel runs a token in one parallel region: its first thread drives, the others
    claim units of each phase. One thread, two, or three iterations on numba's pool of two (so one
    iteration can only start after another ended: a helper that arrives when the token is done, or a
    driver whose helper never comes) must give the same output and experts bit for bit."""
    import numpy as np

    from moe_offload import _decode_jit

    config, store = _all_moe_qwen3_store(tmp_path, seed=4)
    model = moe_offload.load(store, experts_per_layer=Store.open(store).num_experts, prefetch=0)
    captured, real = [], _decode_jit.stack
    _decode_jit.stack = lambda *a: captured.append(a) or real(*a)
    try:
        model.offload_runtime.preload()
        ids = torch.randint(3, config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))
        model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None,
                       attention_mask=torch.ones_like(ids))
    finally:
        _decode_jit.stack = real
    try:
        assert captured
        args = list(captured[-1])
        x0 = args[1].copy()
        H, inter, k, meta = x0.shape[0], args[31], args[27], args[30]

        def run(nthreads):
            args[32:36] = kernels_layer._workspace(H, inter, k, meta[1], meta[4], nthreads)
            args[36] = nthreads
            args[1][:] = x0
            args[-1][:] = -1
            real(*args)  # (it writes the same key and value at the same position every time)
            return args[1].copy(), args[-1].copy()

        base_x, base_idx = run(2)
        assert not np.array_equal(base_x, x0) and (base_idx >= 0).all()
        for nthreads in (1, 3, 2, 3):
            x, idx = run(nthreads)
            assert np.array_equal(x, base_x) and np.array_equal(idx, base_idx), nthreads
    finally:
        model.close()


def test_the_stack_sees_changes_between_the_tokens_of_one_generate(tmp_path):
    """Between two tokens of one generate (same KV cache), a hook put on a router and taken off, and
    a norm's weight replaced by assignment: the stacked path notices each on the next token (the
    token with a hook runs layer by layer; the new weight is the one read), so the floats, and what the
    hook saw, are the unfused steps' bit for bit."""
    from transformers import LogitsProcessorList

    from moe_offload import _decode_jit, layer_decode

    config, store = _mixtral_store(tmp_path, seed=8)
    ids = torch.randint(3, config.vocab_size, (1, 3), generator=torch.Generator().manual_seed(2))
    steps = 10

    def run(fuse: bool):
        model = moe_offload.load(store, experts_per_layer=Store.open(store).num_experts, prefetch=0)
        calls, seen, real = [], [], _decode_jit.stack
        _decode_jit.stack = lambda *a: calls.append(ids_now[0]) or real(*a)
        ids_now, handle = [0], []
        layer = model.model.layers[1]

        def at_each_token(input_ids, scores):
            i = input_ids.shape[1] - ids.shape[1]  # tokens generated so far
            ids_now[0] = i
            if i == 4:
                handle.append(layer.mlp.gate.register_forward_hook(lambda m, a, out: seen.append(out[0].clone())))
            elif i == 6:
                handle.pop().remove()
            elif i == 7:
                norm = model.model.layers[0].post_attention_layernorm
                norm.weight = torch.nn.Parameter(norm.weight.detach() * 1.25, requires_grad=False)
            return scores
        try:
            model.offload_runtime.preload()
            for m in model.modules():
                if isinstance(getattr(m, "_decode_path", None), layer_decode._LayerPath):
                    m._decode_path.fused = fuse
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                                 logits_processor=LogitsProcessorList([at_each_token]), output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
            return torch.stack(out.logits), calls, seen
        finally:
            _decode_jit.stack = real
            model.close()

    logits, stacked_at, seen = run(True)
    ref_logits, ref_stacked_at, ref_seen = run(False)
    assert torch.equal(logits, ref_logits) and ref_stacked_at == []
    # (a call is labelled with the tokens generated before its forward) the two forwards after the
    # hook went on ran layer by layer; the stack before them, after it came off, and with the new weight
    assert 4 not in stacked_at and 5 not in stacked_at and {3, 6, 7, 8} <= set(stacked_at)
    assert len(seen) == len(ref_seen) == 2 and all(torch.equal(a, b) for a, b in zip(seen, ref_seen))

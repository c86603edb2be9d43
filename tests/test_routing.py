"""Routing traces and the cache simulator: hand-computed cases, Belady's bound, and exact agreement
of the simulator's LRU with the live ExpertCache on the same trace."""
import json

import numpy as np
import pytest

import moe_offload
from moe_offload.errors import MoeOffloadError
from moe_offload.routing import POLICIES, Setting, Steps, load_trace, simulate
from moe_offload.routing.trace_format import VERSION, Trace
from moe_offload.synthetic import build_random_mixtral

from conftest import run_cli


def make_trace(experts, num_experts, spec_rank=None, blob=100) -> Trace:
    """A trace of decode steps, one token each: experts[t][layer] is that token's expert list."""
    experts = np.asarray(experts, np.int16)
    if experts.ndim == 1:
        experts = experts[:, None, None]
    n, layers, k = experts.shape
    if spec_rank is None:
        spec_rank = np.full((n, layers, 1, num_experts), -1, np.int8)
    return Trace(experts=experts, weights=np.full(experts.shape, 1 / k, np.float16), step=np.arange(n, dtype=np.int32),
                 prompt=np.zeros(n, np.int32), decode=np.ones(n, bool), token_ids=np.zeros(n, np.int32),
                 spec_rank=np.asarray(spec_rank, np.int8), first_rank=np.full((n, num_experts), -1, np.int8),
                 live_guess=np.zeros((0, 4 + num_experts), np.int16),
                 meta={"version": VERSION, "num_experts": num_experts, "top_k": k, "moe_layers": list(range(layers)),
                       "blob_size": blob})


def hits(sequence, policy, slots, num_experts=4):
    return simulate(Steps(make_trace(sequence, num_experts)), Setting(policy, slots)).hits


def test_hand_computed_cyclic_sequence():
    # 0 1 2 0 1 2 with two slots: LRU always evicts what comes next; Belady keeps 0, then 2.
    seq = [0, 1, 2, 0, 1, 2]
    assert hits(seq, "lru", 2) == 0
    assert hits(seq, "belady", 2) == 2
    assert hits(seq, "lfu", 2) == 0


def test_hand_computed_frequency_beats_recency():
    # 0 0 1 2 0: at the miss on 2, LRU evicts 0 (used longest ago), LFU evicts 1 (used once).
    seq = [0, 0, 1, 2, 0]
    assert hits(seq, "lru", 2) == 1
    assert hits(seq, "lfu", 2) == 2
    assert hits(seq, "lfru", 2) == 2
    assert hits(seq, "belady", 2) == 2


def test_bytes_read_counts_every_load():
    r = simulate(Steps(make_trace([0, 1, 2, 0], 4, blob=1000)), Setting("lru", 2))
    assert (r.misses, r.bytes_read) == (4, 4000)


def test_decode_counts_leave_out_the_prefill():
    # step 0 is a prefill of two tokens (experts 0 and 1), then decode steps 2, 0, 3, 0 with two slots
    trace = make_trace([0, 1, 2, 0, 3, 0], 4)
    trace.step[:] = [0, 0, 1, 2, 3, 4]
    trace.decode[:2] = False
    r = simulate(Steps(trace), Setting("lru", 2))
    # prefill: 0, 1 miss | 2 misses (evicts 0), 0 misses (evicts 1), 3 misses (evicts 2), 0 hits
    assert (r.hits, r.misses) == (1, 5)
    assert (r.decode_hits, r.decode_misses) == (1, 3) and r.decode_hit_rate == 0.25
    assert r.decode_miss_groups == {1: 3}  # one layer: each decode step missed one expert or none


def test_decode_miss_groups_count_a_layer_steps_misses_together():
    # two experts per token (top-2): step 0 is a prefill (0, 1), then decode (0, 1) hits both,
    # (2, 3) misses both, (2, 0) misses one
    trace = make_trace([[[0, 1]], [[0, 1]], [[2, 3]], [[2, 0]]], 4)
    trace.decode[0] = False
    r = simulate(Steps(trace), Setting("lru", 2))
    assert r.decode_miss_groups == {2: 1, 1: 1} and r.decode_misses == 3


@pytest.mark.parametrize("seed", range(4))
def test_belady_is_an_upper_bound(seed):
    rng = np.random.default_rng(seed)
    n, layers, E, k = 300, 3, 8, 2
    # Routing with some locality: each token keeps one expert of the previous token half of the time.
    experts = np.zeros((n, layers, k), np.int16)
    for t in range(n):
        for layer in range(layers):
            first = experts[t - 1, layer, 0] if t and rng.random() < 0.5 else rng.integers(E)
            second = rng.choice([e for e in range(E) if e != first])
            experts[t, layer] = (first, second)
    steps = Steps(make_trace(experts, E))
    for scope in ("layer", "global"):
        for slots in (2, 3, 5):
            best = simulate(steps, Setting("belady", slots, scope)).hits
            for policy in POLICIES:
                assert simulate(steps, Setting(policy, slots, scope)).hits <= best, (policy, scope, slots)


def test_prefetch_precision_and_recall_from_rankings():
    # Layer 1 uses expert 3 on even tokens and expert 5 on odd ones; the guess from layer 0 is
    # always "3 first, then 5".
    n, E = 10, 8
    experts = np.zeros((n, 2, 1), np.int16)
    experts[:, 1, 0] = [3 if t % 2 == 0 else 5 for t in range(n)]
    spec = np.full((n, 2, 1, E), -1, np.int8)
    spec[:, 0, 0] = [3, 5, 0, 1, 2, 4, 6, 7]
    steps = Steps(make_trace(experts, E, spec))
    one = simulate(steps, Setting("lru", 4, prefetch=1))
    assert (one.precision, one.recall) == (0.5, 0.5)
    two = simulate(steps, Setting("lru", 4, prefetch=2))
    assert (two.precision, two.recall) == (0.5, 1.0)
    assert two.prefetch_useful == two.prefetch_loads == 2  # both guesses loaded once, then stay resident


def test_bad_settings_and_files_raise(tmp_path):
    steps = Steps(make_trace([0, 1], 4))
    with pytest.raises(MoeOffloadError, match="policy"):
        simulate(steps, Setting("fifo", 2))
    with pytest.raises(MoeOffloadError, match="lookahead"):
        simulate(steps, Setting("lru", 2, prefetch=1, lookahead=2))
    with pytest.raises(MoeOffloadError, match="no trace file"):
        load_trace(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(MoeOffloadError, match="not a routing trace"):
        load_trace(tmp_path / "junk.npz")
    np.savez(tmp_path / "partial.npz", experts=np.zeros((1, 1, 1)))
    with pytest.raises(MoeOffloadError, match="lacks"):
        load_trace(tmp_path / "partial.npz")


@pytest.fixture(scope="module")
def store8(tmp_path_factory):
    """A tiny random Mixtral with 8 experts (so a cache of 3 per layer evicts all the time)."""
    shape = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=600)
    src = build_random_mixtral(tmp_path_factory.mktemp("src") / "m8", shape, seed=3)
    return moe_offload.convert(src, tmp_path_factory.mktemp("st") / "s8", expert_bits=16, dense_bits=16, progress=False)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_live_cache_and_simulator_agree_exactly(store8, policy):
    from transformers import AutoTokenizer

    from moe_offload.engine import SamplingParams, generate_text
    from moe_offload.routing.recorder import TraceRecorder

    model = moe_offload.load(store8, experts_per_layer=3, prefetch=0, policy=policy)
    tokenizer = AutoTokenizer.from_pretrained(store8)
    recorder = TraceRecorder(model)
    try:
        for i, prompt in enumerate(["a", "b"]):  # one-token prompts: a prefill step fits in the pool
            recorder.prompt = i
            generate_text(model, tokenizer, tokenizer(prompt).input_ids,
                          SamplingParams(max_new_tokens=25, temperature=1.0, seed=i))
        stats = model.offload_stats()
        evicted = list(model.offload_runtime.cache.evicted)
    finally:
        recorder.close()
        model.close()
    trace = recorder.trace({})
    result = simulate(Steps(trace), Setting(policy, 3), record_evictions=True)
    assert result.evictions == evicted and len(evicted) > 20
    assert (result.hits, result.misses) == (sum(stats.hits), sum(stats.misses))
    if policy != "lru":  # the trace tells the policies apart, so agreeing means something
        assert simulate(Steps(trace), Setting("lru", 3), record_evictions=True).evictions != evicted


def test_trace_and_simulate_cli(store8, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb c\n")
    out = tmp_path / "trace.npz"
    r = run_cli("trace", store8, "--prompts", prompts, "--out", out, "--max-new-tokens", 8, "--quiet",
                "--experts-per-layer", 4)
    assert r.returncode == 0, r.stderr
    trace = load_trace(out)
    assert trace.num_tokens > 16 and trace.meta["top_k"] == 2 and trace.live_guess.shape[0] > 0
    # The recorded routing is the router's top-k: the weights of a token sum to 1.
    assert np.allclose(trace.weights.astype(np.float32).sum(-1), 1, atol=1e-2)
    r = run_cli("simulate", out, "--slots", "2,4", "--policy", "lru,belady", "--prefetch", "0,2", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 8 and all(0 <= row["hit_rate"] <= 1 for row in rows)
    r = run_cli("simulate", out, "--policy", "mru")
    assert r.returncode == 2 and "unknown policy" in r.stderr


def test_recorded_guesses_match_the_live_prefetcher(store8):
    """The rankings in a trace are what the prefetcher computes: its live guesses for layer i+1
    are the top-K of spec_rank[t, i, 0], and its first-layer guess made at step s is the next
    step's first_rank (guesses of its own and the prefetcher's must not overwrite the record)."""
    from transformers import AutoTokenizer

    from moe_offload.engine import SamplingParams, generate_text
    from moe_offload.routing.recorder import TraceRecorder

    model = moe_offload.load(store8, experts_per_layer=4, prefetch=2)
    tokenizer = AutoTokenizer.from_pretrained(store8)
    recorder = TraceRecorder(model, depth=2)
    try:
        generate_text(model, tokenizer, tokenizer("a").input_ids, SamplingParams(max_new_tokens=20, temperature=1.0, seed=0))
    finally:
        recorder.close()
        model.close()
    trace = recorder.trace({})
    token_of_step = {int(s): t for t, s in enumerate(trace.step)}
    checked = 0
    for step, target, _read, count, *experts in trace.live_guess.tolist():
        t = token_of_step[step]
        if not trace.decode[t]:
            continue
        if target == 0:
            if step + 1 in token_of_step:  # made from this step's logits for the next step
                assert set(experts[:count]) == set(trace.first_rank[token_of_step[step + 1], :2].tolist())
                checked += 1
        else:
            assert set(experts[:count]) == set(trace.spec_rank[t, target - 1, 0, :2].tolist())
            checked += 1
    assert checked > 10

"""Speculative loading changes what is read and when, never what is computed."""
import torch

import moe_offload


def _generate(store, **kwargs):
    model = moe_offload.load(store, **kwargs)
    try:
        torch.manual_seed(0)
        ids = torch.randint(3, 1000, (1, 8))
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        return out, model.offload_stats().as_dict()
    finally:
        model.close()


def test_prefetch_never_changes_outputs(tiny_store16):
    base, stats_off = _generate(tiny_store16, experts_per_layer=2, prefetch=0)
    assert stats_off["prefetch_guesses"] == 0 and stats_off["prefetch_loads"] == 0
    for prefetch, lookahead in ((1, 1), (2, 1), (4, 1), (2, 2)):
        out, stats = _generate(tiny_store16, experts_per_layer=2, prefetch=prefetch, lookahead=lookahead)
        assert torch.equal(out.sequences, base.sequences)
        for a, b in zip(out.logits, base.logits):
            assert torch.equal(a, b)
        assert stats["prefetch_guesses"] > 0


def test_prefetch_recall_is_reported_and_positive(tiny_store16):
    # Three slots for top-2 routing: a guess always has a slot it may take.
    _, stats = _generate(tiny_store16, experts_per_layer=3, prefetch=2)
    # With random weights the residual stream barely changes between layers, so the next layer's
    # router applied to it guesses well: recall must be clearly above chance (2 of 4 experts).
    assert 0.5 < stats["prefetch_recall"] <= 1.0
    assert 0 < stats["prefetch_precision"] <= 1.0
    assert stats["prefetch_loads"] > 0


def test_guessing_every_expert_gives_full_recall(tiny_store16):
    _, stats = _generate(tiny_store16, experts_per_layer=4, prefetch=4)
    assert stats["prefetch_recall"] == 1.0


def test_the_default_guesses_ahead_unless_the_cache_holds_every_expert(tiny_store16):
    """Nothing is left to load into a cache of every expert, and without a prefetcher the decode can
    take the whole stack in one call; a prefetch asked for is kept."""
    from moe_offload.config import DEFAULT_PREFETCH
    from moe_offload.store import Store

    experts = Store.open(tiny_store16).num_experts
    for kwargs, guesses in [(dict(experts_per_layer=experts - 1), DEFAULT_PREFETCH),
                            (dict(experts_per_layer=experts), 0),
                            (dict(experts_per_layer=experts, prefetch=2), 2),
                            (dict(experts_per_layer=experts - 1, prefetch=0), 0),
                            (dict(experts_per_layer=experts - 1, cache_scope="global"), DEFAULT_PREFETCH),
                            (dict(expert_cache="1GiB", cache_scope="global"), 0)]:
        model = moe_offload.load(tiny_store16, **kwargs)
        try:
            pf = model.offload_runtime.prefetcher
            assert (pf.prefetch if pf else 0) == guesses, kwargs
        finally:
            model.close()


def test_a_cache_of_every_expert_is_read_in_full_before_the_first_prompt(tiny_store16):
    """The command line preloads such a cache: no expert waits for its first use, and the
    statistics start afresh."""
    from moe_offload.store import Store

    experts = Store.open(tiny_store16).num_experts
    model = moe_offload.load(tiny_store16, experts_per_layer=experts - 1)
    try:
        assert not model.offload_runtime.preload() and not model.offload_runtime.cache.resident()
    finally:
        model.close()
    model = moe_offload.load(tiny_store16, experts_per_layer=experts)
    try:
        rt = model.offload_runtime
        assert rt.preload()
        assert len(rt.cache.resident()) == experts * len(rt.store.moe_layers)
        assert rt.stats.as_dict()["loads"] == 0  # the preload's reads are not the prompt's
        ids = torch.randint(3, 1000, (1, 8))
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
        s = rt.stats.as_dict()
        assert s["misses"] == 0 and s["hits"] > 0 and s["loads"] == 0
    finally:
        model.close()


def test_statistics_add_up(tiny_store16):
    _, stats = _generate(tiny_store16, experts_per_layer=2, prefetch=2)
    model = moe_offload.load(tiny_store16, experts_per_layer=2)
    blob = model.offload_runtime.store.blob_size
    model.close()
    assert stats["loads"] == stats["misses"] + stats["prefetch_loads"]
    assert stats["bytes_read"]["disk"] == stats["loads"] * blob
    assert stats["hits"] + stats["misses"] == sum(stats["hits_per_layer"]) + sum(stats["misses_per_layer"])
    assert stats["tokens_prefill"] == 8 and stats["tokens_decode"] == 23
    assert stats["decode_tokens_per_s"] > 0 and stats["prefill_tokens_per_s"] > 0
    assert stats["peak_rss_bytes"] > 0


def test_payoff_gate_pauses_and_resumes():
    from moe_offload.prefetch import PayoffGate

    gate = PayoffGate()
    w, probe = gate.WINDOW, gate.PROBE_EVERY
    assert all(gate.allow(0, 0) for _ in range(3 * probe))  # nothing measured yet: allowed
    assert gate.allow(w, w // 2)  # exactly MIN_USEFUL of a window: still paying
    allowed = [gate.allow(2 * w, w // 2 + 1) for _ in range(4 * probe)]  # 1 of 16 paid: paused
    assert sum(allowed) == 4  # one probe in PROBE_EVERY calls
    assert gate.allow(3 * w, w // 2 + 1 + w)  # a window where every read paid: resumes
    assert all(gate.allow(3 * w, 0) for _ in range(probe))  # counters reset: starts afresh


def test_guesses_pause_while_they_cost_more_time_than_they_save():
    from moe_offload.prefetch import PayoffGate, Prefetcher
    from moe_offload.stats import OffloadStats

    stats = OffloadStats(2)
    pf = Prefetcher(None, stats, {0: None, 1: None}, {}, prefetch=2, lookahead=1)
    w, probe = PayoffGate.WINDOW, PayoffGate.PROBE_EVERY
    stats.add(prefetch_loads=2 * w, prefetch_useful=2 * w)  # every speculative read was used
    stats.add(guess_calls=w - 1, guess_seconds=1.0)
    stats.record_read("disk", 1, seconds=0.001)
    assert pf.saves_time()  # fewer than a window of guesses measured: not judged yet
    stats.add(guess_calls=1)
    # 32 right guesses x 1 ms each spared, against 1 s of guessing: pause, one probe in PROBE_EVERY calls
    assert not pf.saves_time()
    assert sum(pf._worth_guessing() for _ in range(4 * probe)) == 4
    stats.add(guess_seconds=-1.0 + 0.03)  # the same reads, guesses of 30 ms in all: they pay
    assert pf.saves_time() and all(pf._worth_guessing() for _ in range(probe))
    stats.record_read("disk", 1, seconds=0.0)  # a second read, instant: the mean read halves
    assert not pf.saves_time()
    stats.reset()  # the counters restart (bench's warm-up): not judged again until a window is measured
    assert pf.saves_time()


def test_the_trial_speculates_on_the_side_that_decodes_faster():
    from types import SimpleNamespace

    from moe_offload.speculation_trial import SpeculationTrial

    stats = SimpleNamespace(tokens_decode=0, seconds_decode=0.0)
    trial = SpeculationTrial(stats)
    W = trial.WINDOW

    def window(seconds_per_token_on, seconds_per_token_off):
        """One window of decode tokens at the given speeds; returns whether it speculated."""
        on = trial.speculating()
        for _ in range(W):
            stats.tokens_decode += 1
            stats.seconds_decode += seconds_per_token_on if on else seconds_per_token_off
            assert trial.speculating() == on or stats.tokens_decode % W == 0  # a window keeps its side
        return on

    # speculating costs time: the first windows alternate, then it runs one window in EXPLORE_EVERY
    sides = [window(2.0, 1.0) for _ in range(8 * trial.EXPLORE_EVERY)]
    assert sides[:2 * trial.MIN_WINDOWS] == [True, False] * trial.MIN_WINDOWS
    assert sum(sides[2 * trial.MIN_WINDOWS:]) == len(sides[2 * trial.MIN_WINDOWS:]) // trial.EXPLORE_EVERY
    assert trial.seconds_per_token(True) == 2.0 and trial.seconds_per_token(False) == 1.0
    # it pays from now on: the explored windows move the means until speculation is the faster side
    sides = [window(0.1, 1.0) for _ in range(16 * trial.EXPLORE_EVERY)]
    assert all(sides[-trial.EXPLORE_EVERY + 1:])
    side, windows = trial.on, dict(trial.windows)
    stats.tokens_decode, stats.seconds_decode = 0, 0.0  # the counters reset: the window opens again
    assert trial.speculating() == side and trial.mark == (0, 0.0) and trial.windows == windows


def test_first_layer_guess_is_the_routers_choice_for_the_likeliest_token(tiny_store16):
    """After a step's logits, layer 0's router applied to the embedding of the argmax token picks
    what is prefetched for layer 0, and those guesses are scored when layer 0 runs."""
    model = moe_offload.load(tiny_store16, experts_per_layer=4, prefetch=2)
    try:
        rt = model.offload_runtime
        pf, started = rt.prefetcher, []
        real_prefetch = rt.cache.prefetch
        rt.cache.prefetch = lambda layer, experts: (started.append((layer, list(experts))), real_prefetch(layer, experts))[1]
        logits = torch.randn(1, 3, model.config.vocab_size)
        pf.guess_first_layer(logits)
        token = logits[0, -1].argmax()
        layer0 = model.model.layers[0].mlp
        h = model.model.layers[0].post_attention_layernorm(model.model.embed_tokens(token[None]))
        router_logits = layer0.gate(h)
        router_logits = router_logits[0] if isinstance(router_logits, tuple) else router_logits
        expected = router_logits.float().topk(2, dim=-1).indices.reshape(-1).tolist()
        assert started == [(0, expected)]
        pf.score(0, {expected[0]})
        assert (pf.first_guessed, pf.first_correct) == (2, 1)

        # A window of wrong guesses: reads stop, but the guesses are still made and scored.
        pf.first_guessed, pf.first_correct = 2 + pf.first_gate.WINDOW, 1
        pf.guess_first_layer(logits)
        assert len(started) == 1 and pf.shadow == {0: set(expected)}
        pf.score(0, set(expected))
        assert pf.first_correct == 3 and not pf.shadow
    finally:
        model.close()


def test_first_layer_guesses_run_during_generation(tiny_store16):
    model = moe_offload.load(tiny_store16, experts_per_layer=4, prefetch=2)
    try:
        ids = torch.randint(3, 1000, (1, 8))
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=0)
        pf = model.offload_runtime.prefetcher
        assert pf.first_guessed >= 2 and 0 <= pf.first_correct <= pf.first_guessed
    finally:
        model.close()

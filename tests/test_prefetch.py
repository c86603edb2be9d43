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

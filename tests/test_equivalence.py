"""16-bit stores must give transformers' own Mixtral logits, for every cache size and mode."""
import pytest
import torch
from transformers import MixtralForCausalLM

import moe_offload
from conftest import CONFIGS
from moe_offload.synthetic import build_random_mixtral

DECODE_STEPS = 20


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    src = build_random_mixtral(root / "src", CONFIGS[request.param], seed=3, tokenizer=False)
    store = moe_offload.convert(src, root / "store", expert_bits=16, dense_bits=16, progress=False)
    ref = MixtralForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, CONFIGS[request.param]["vocab_size"], (1, 11))
    with torch.no_grad():
        prefill = ref(ids).logits
    expected = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=DECODE_STEPS, do_sample=False,
                            output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return CONFIGS[request.param], store, ids, prefill, expected


def _modes(cfg):
    top_k, experts = cfg["num_experts_per_tok"], cfg["num_local_experts"]
    for k in range(top_k, experts + 1):
        for prefetch in (0, 2):
            for scope in ("layer", "global"):
                yield k, prefetch, scope


def test_logits_and_tokens_equal_transformers_for_every_cache_size(case):
    cfg, store, ids, prefill, expected = case
    for k, prefetch, scope in _modes(cfg):
        model = moe_offload.load(store, experts_per_layer=k, prefetch=prefetch, cache_scope=scope)
        try:
            with torch.no_grad():
                ours = model(ids).logits
            assert (ours - prefill).abs().max().item() <= 1e-4, (k, prefetch, scope)
            got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=DECODE_STEPS,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
            assert torch.equal(got.sequences, expected.sequences), (k, prefetch, scope)
            assert len(got.logits) == DECODE_STEPS
            for step, (a, b) in enumerate(zip(got.logits, expected.logits)):
                assert (a - b).abs().max().item() <= 1e-4, (k, prefetch, scope, step)
            stats = model.offload_stats().as_dict()
            assert stats["resident_experts"] <= stats["cache_slots"]
            assert stats["cache_slots"] == k * cfg["num_hidden_layers"]
            if k == cfg["num_local_experts"] and scope == "layer":
                # Everything fits: each expert is read at most once.
                assert stats["misses"] + stats["prefetch_loads"] <= k * cfg["num_hidden_layers"]
        finally:
            model.close()


def test_default_budget_is_a_quarter_of_the_experts(case):
    cfg, store, *_ = case
    model = moe_offload.load(store)
    per_layer = max(cfg["num_experts_per_tok"], -(-cfg["num_local_experts"] // 4))
    assert model.offload_stats().cache_slots == per_layer * cfg["num_hidden_layers"]
    model.close()


def test_expert_weights_exist_only_in_cache_slots(case):
    cfg, store, *_ = case
    k = cfg["num_experts_per_tok"]
    model = moe_offload.load(store, experts_per_layer=k)
    try:
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        assert not [n for n in tensors if ".experts." in n]
        runtime = model.offload_runtime
        assert runtime.cache.buffer.numel() == k * cfg["num_hidden_layers"] * runtime.store.blob_size
    finally:
        model.close()

"""The base model's decode path (base_decode.py): once the stack runs and one watched token showed
the base model's forward to be embed -> rotary -> layers -> norm, later tokens skip transformers'
glue; the logits must be the glue's bit for bit, and a forward that is anything else must never
be replaced."""
import pytest
import torch

import moe_offload
from families import NAMED
from moe_offload import base_decode
from moe_offload.store import Store
from moe_offload.synthetic import build_random_moe, tiny_moe_config

STEPS = 10


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("base")
    config = tiny_moe_config("mixtral", **{**NAMED["mixtral"], "hidden_size": 64, "intermediate_size": 96,
                                          "sliding_window": None})
    src = build_random_moe(tmp / "src", config, seed=11, tokenizer=False)
    return moe_offload.convert(src, tmp / "st", expert_bits=4, dense_bits=4, expert_format="rowtile", progress=False)


def _generate(store, ids, *, path=True, patch=None, embed_hook=False, **extra):
    """(logits of STEPS greedy tokens, tokens the base path computed, its verdict, stacked tokens)."""
    from moe_offload import _decode_jit

    model = moe_offload.load(store, experts_per_layer=Store.open(store).num_experts, prefetch=0)
    stacked, real_stack = [], _decode_jit.stack
    _decode_jit.stack = lambda *a: stacked.append(1) or real_stack(*a)
    try:
        model.offload_runtime.preload()
        base = model.model._decode_path
        assert isinstance(base, base_decode._BasePath)
        if not path:
            base.verified = False
        if patch is not None:
            base.original = patch(base.original)
        if embed_hook:
            model.model.embed_tokens.register_forward_hook(lambda m, a, out: None)
        fast, real_fast = [], base._fast

        def counted(kwargs):
            out = real_fast(kwargs)
            if out is not None:
                fast.append(1)
            return out
        base._fast = counted
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, min_new_tokens=STEPS,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                             eos_token_id=None, **extra)
        return torch.stack(out.logits), len(fast), base.verified, len(stacked)
    finally:
        _decode_jit.stack = real_stack
        model.close()


def test_the_base_path_gives_the_glue_floats(store):
    ids = torch.randint(3, 200, (1, 4), generator=torch.Generator().manual_seed(0))
    fast, n_fast, verdict, stacked = _generate(store, ids)
    plain, n_plain, _, plain_stacked = _generate(store, ids, path=False)
    assert torch.equal(fast, plain)
    # the first stacked token checks the base model's forward: every later one goes through the path
    assert verdict is True and stacked == plain_stacked > 2 and n_fast == stacked - 1 and n_plain == 0


def test_a_forward_that_is_not_the_formula_is_never_replaced(store):
    """A base forward that changes its output after the norm (as a family with another step there
    would) fails the check: every token then runs the model's own forward, with its change."""
    ids = torch.randint(3, 200, (1, 4), generator=torch.Generator().manual_seed(1))

    def scaled(original):
        def forward(*args, **kwargs):
            out = original(*args, **kwargs)
            out["last_hidden_state"] = out["last_hidden_state"] * 0.5
            return out
        return forward

    changed, n_fast, verdict, stacked = _generate(store, ids, patch=scaled)
    unchanged, _, _, _ = _generate(store, ids)
    assert verdict is False and n_fast == 0 and stacked > 2
    assert not torch.equal(changed, unchanged)  # the change reached every token's logits
    reference, _, _, _ = _generate(store, ids, path=False, patch=scaled)
    assert torch.equal(changed, reference)


def test_hooks_and_requested_outputs_go_to_the_models_forward(store):
    ids = torch.randint(3, 200, (1, 4), generator=torch.Generator().manual_seed(2))
    plain, _, _, _ = _generate(store, ids, path=False)
    hooked, n_hooked, _, stacked = _generate(store, ids, embed_hook=True)
    assert n_hooked == 0 and stacked > 2 and torch.equal(hooked, plain)
    model = moe_offload.load(store, experts_per_layer=Store.open(store).num_experts, prefetch=0)
    try:
        model.offload_runtime.preload()
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                  return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
        model.generate(ids, **kw)  # the path checks itself
        assert model.model._decode_path.verified is True
        out = model.generate(ids, output_hidden_states=True, **kw)
        assert len(out.hidden_states) == STEPS and all(len(s) == model.config.num_hidden_layers + 1
                                                       for s in out.hidden_states)
    finally:
        model.close()

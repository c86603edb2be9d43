"""Every named MoE family equals transformers' own model at 16 bits, for the smallest legal cache
with prefetch, a global pool, a cache with room for guesses, and all experts resident; quantized
stores equal transformers running our dequantized weights."""
import pytest
import torch

import moe_offload
from families import NAMED, build_case, dequantized_reference, max_diff_against
from moe_offload import kernels
from moe_offload.store import Store

# What each tiny config makes of the family's structure: MoE layers, and whether shared experts exist.
EXPECTED_MOE_LAYERS = {"deepseek_v2": [1, 2], "deepseek_v3": [1, 2], "glm4_moe": [1, 2], "qwen3_moe": [0, 2]}
SHARED = {"qwen2_moe", "deepseek_v2", "deepseek_v3", "glm4_moe"}


@pytest.fixture(scope="module", params=list(NAMED))
def case(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    c = build_case(request.param, root)
    store = moe_offload.convert(c.src, root / "store16", expert_bits=16, dense_bits=16, progress=False)
    return c, store


def test_family_equals_transformers_at_16_bits(case, family_report):
    c, store = case
    st = Store.open(store)
    k, n = st.top_k, st.num_experts
    assert st.moe_layers == EXPECTED_MOE_LAYERS.get(c.family, [0, 1, 2])
    assert bool(st.manifest["experts"]["shared"]) == (c.family in SHARED)
    worst, guessing = 0.0, None
    for kwargs in (dict(experts_per_layer=k, prefetch=2), dict(experts_per_layer=k, prefetch=2, cache_scope="global"),
                   dict(experts_per_layer=min(n, k + 3), prefetch=2), dict(experts_per_layer=n, prefetch=0)):
        diff, stats = max_diff_against(c, store, **kwargs)
        assert diff <= 1e-4, (c.family, kwargs, diff)
        assert stats["cache_slots"] == kwargs["experts_per_layer"] * len(st.moe_layers)
        assert stats["moe_layers"] == st.moe_layers
        worst = max(worst, diff)
        if kwargs["experts_per_layer"] == min(n, k + 3):
            guessing = stats
    family_report.append(f"{c.family:12s} 16-bit max |logit diff| {worst:.1e}; prefetch on random weights "
                         f"(top-{k} of {n}, {min(n, k + 3)} slots): precision {guessing['prefetch_precision']:.2f}, "
                         f"recall {guessing['prefetch_recall']:.2f}, {guessing['prefetch_guesses']} guesses")


def test_quantized_family_matches_transformers_on_dequantized_weights(case, tmp_path):
    c, _ = case
    store = moe_offload.convert(c.src, tmp_path / "q", expert_bits=4, dense_bits=4, progress=False)
    model = moe_offload.load(store, experts_per_layer=Store.open(store).top_k)
    try:
        ref = dequantized_reference(c.src, store, model)
        with torch.no_grad():
            expected = ref(c.ids).logits
            with kernels.use_reference():
                exact = model(c.ids).logits
            fast = model(c.ids).logits
        assert (exact - expected).abs().max() <= 1e-4, c.family
        # The fast kernels round activations to bf16: close, not bit-equal (a near-tie in a router can
        # flip one token's expert), so the bound holds for the typical position.
        per_position = (fast - expected).abs().amax(-1).flatten()
        assert per_position.median() <= 2e-2 * expected.abs().max(), c.family
    finally:
        model.close()


def test_an_experts_class_that_wraps_the_seam_keeps_its_forward():
    """The experts module's call is handed straight to the cache only when its forward is the seam's
    dispatcher; a subclass that computes around the seam (ergo's per-expert norm) keeps its own."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from moe_offload import archs

    class Wrapped(MixtralExperts):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return 2 * super().forward(hidden_states, top_k_index, top_k_weights)

    config = MixtralConfig(hidden_size=8, intermediate_size=16, num_local_experts=4)
    with torch.device("meta"):
        assert archs.seam_forward_is_own(MixtralExperts(config))
        assert not archs.seam_forward_is_own(Wrapped(config))

"""`moe-offload eval` (perplexity, the quantizers of the fidelity table) and `moe-offload plan`."""
import json

import pytest
import torch

import moe_offload
from moe_offload.errors import MoeOffloadError
from moe_offload.evaluate.fidelity import ours, rtn
from moe_offload.evaluate.perplexity import perplexity, store_perplexity, token_windows
from moe_offload.plan.predict import (RUNTIME_BYTES, Timing, cache_slots, plan, time_decode, trace_misses,
                                      waited_fraction)
from moe_offload.store import DENSE_FILE, Store
from moe_offload.synthetic import build_random_mixtral

from conftest import run_cli

TEXT = "\n".join(f"line {i}: the quick brown fox jumps over the lazy dog, {i * 7} times." for i in range(60))


@pytest.fixture(scope="module")
def src_and_store(tmp_path_factory):
    shape = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=600)
    src = build_random_mixtral(tmp_path_factory.mktemp("src") / "m", shape, seed=5)
    store = moe_offload.convert(src, tmp_path_factory.mktemp("st") / "s16", expert_bits=16, dense_bits=16,
                                progress=False)
    return src, store


def test_store_perplexity_matches_the_checkpoint(src_and_store):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, store = src_and_store
    ours_ppl = store_perplexity(store, TEXT, window=32, progress=False)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    reference = perplexity(model, token_windows(AutoTokenizer.from_pretrained(src), TEXT, 32))
    assert ours_ppl["tokens"] == reference["tokens"] > 100
    assert ours_ppl["perplexity"] == pytest.approx(reference["perplexity"], rel=2e-3)


def test_too_short_text_raises(src_and_store):
    with pytest.raises(MoeOffloadError, match="fewer than one window"):
        store_perplexity(src_and_store[1], "a b", window=128, progress=False)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hqq_beats_round_to_nearest_in_weight_error(bits):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(bits)) * 0.02
    group = 16 if bits == 2 else 64
    err_rtn = (rtn(w, bits, group) - w).pow(2).mean()
    err_ours = (ours(w, bits, group) - w).pow(2).mean()
    assert err_ours < err_rtn
    assert err_rtn < w.pow(2).mean() / 4  # round-to-nearest is a quantizer, not noise


def test_plan_cache_size_follows_the_budget(src_and_store):
    st = Store.open(src_and_store[1])
    dense = (st.path / DENSE_FILE).stat().st_size
    per_slot = st.blob_size * len(st.moe_layers)
    assert cache_slots(st, dense + RUNTIME_BYTES + 3 * per_slot + 10) == (True, 3)
    assert cache_slots(st, dense + RUNTIME_BYTES + 1 * per_slot) == (False, 1)
    assert cache_slots(st, 10 ** 12) == (True, st.num_experts)


def test_plan_prediction_adds_reads_to_compute(src_and_store):
    st = Store.open(src_and_store[1])
    ram = (st.path / DENSE_FILE).stat().st_size + RUNTIME_BYTES + 4 * st.blob_size * len(st.moe_layers)
    p = plan(st.path, ram, disk_read=1e6, measure=False)
    assert p.slots_per_layer == 4 and p.hit_rate == pytest.approx(0.5)
    assert p.misses_per_token == pytest.approx(0.5 * 2 * 2)
    assert p.read_seconds == pytest.approx(p.misses_per_token * st.blob_size / 1e6)
    assert p.decode_tokens_per_s == pytest.approx(1 / (p.compute_seconds + p.read_seconds))


def test_waited_share_counts_the_layer_steps_with_a_miss():
    # four layer steps of top-2 missing 2, 1, 0, 0 experts: 3 misses of 8 uses, 2 steps of 4 wait
    assert waited_fraction(5 / 8, {2: 1, 1: 1}, 2) == pytest.approx(0.5)
    assert waited_fraction(0.0, {2: 1}, 2) == 1.0  # no-cache: every step reads
    assert waited_fraction(1.0, {}, 2) == 0.0
    t = Timing(0.001, 4, ("p",), None, seconds_per_token_layered=0.002, seconds_per_token_waited=0.006)
    assert t.compute(True) == 0.001
    assert t.compute(False, 0.25) == pytest.approx(0.75 * 0.002 + 0.25 * 0.006)


def test_timed_decode_traces_every_turn_in_order(src_and_store):
    """The hit rate comes from all the turns the bench runs, one session: the simulator carries the
    cache from one turn to the next, as the live cache does."""
    st = Store.open(src_and_store[1])
    prompts = ("one two three", "four five six", "seven eight")
    t = time_decode(st, tokens=5, prompts=prompts)
    assert t.prompts == prompts and t.tokens == 5 and t.seconds_per_token > 0
    assert t.seconds_per_token_layered > 0 and t.seconds_per_token_waited > 0
    assert sum(t.steps.decode) == len(prompts) * (5 - 1)  # the first token of a turn comes from its prefill
    assert sorted(set(t.steps.trace.prompt.tolist())) == [0, 1, 2]
    one = time_decode(st, tokens=5, prompts=prompts[:1])
    assert sum(one.steps.decode) == 4
    assert 0 <= trace_misses(t.steps, 2)[0] <= 1


def test_a_kept_timing_model_times_its_turns_again(src_and_store):
    """bench keeps the timed model to time its turns again before each mode: a machine running
    slower now shows as a drift above 1."""
    import time

    t = time_decode(Store.open(src_and_store[1]), tokens=6, prompts=("one two", "three"), keep=True)
    try:
        assert 0.2 < t.drift() < 5
        slow = t.decoder.model.register_forward_pre_hook(lambda *a: time.sleep(0.02))
        assert t.drift() > 2
        slow.remove()
    finally:
        t.close()
    assert t.decoder is None and t.drift() == 1.0


def test_plan_and_eval_cli(src_and_store, tmp_path):
    _, store = src_and_store
    r = run_cli("plan", store, "--ram", "1MiB", "--disk-read", "1GB", "--no-measure")
    assert r.returncode == 2 and "does not fit" in r.stderr
    r = run_cli("plan", store, "--ram", "2GiB", "--disk-read", "1GB", "--no-measure", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["slots_per_layer"] == 8
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    r = run_cli("eval", store, "--text", text, "--window", "32", "--json", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["perplexity"] > 1
    r = run_cli("eval", store, "--text", tmp_path / "missing.txt")
    assert r.returncode == 2 and "no text file" in r.stderr


@pytest.mark.parametrize("command", ["trace", "simulate", "eval", "plan", "reference"])
def test_new_commands_have_help(command):
    from moe_offload.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0

"""`moe-offload bench`: modes side by side on the tiny shape; numbers that must agree with each other."""
import importlib.util
import json

import pytest

from conftest import run_cli
from llama_bench_fake import write_fake_llama_bench
from moe_offload import bench
from moe_offload.cli import main
from moe_offload.errors import MoeOffloadError
from moe_offload.store import Store

HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None
MODES = ["resident", "offload", "lru-only", "no-cache", "transformers"] + (["accelerate"] if HAS_ACCELERATE else [])
PROMPTS, NEW_TOKENS = 2, 4
# The per-mode keys docs/performance.md documents.
MODE_KEYS = {"prefill_tokens", "prefill_tokens_per_s", "decode_tokens", "decode_tokens_per_s",
             "long_prefill_tokens_per_s", "load_seconds", "peak_rss_bytes", "peak_rss_run_bytes", "disk_bytes_read",
             "decode_disk_bytes_per_token", "decode_expert_bytes_per_token", "ram_bytes_per_token",
             "dense_bytes_per_token", "active_expert_bytes_per_token", "hit_rate", "prefetch_precision",
             "prefetch_recall", "expert_bytes_read", "stall_seconds", "roofline_tokens_per_s", "roofline_ratio",
             "decode_disk_bytes_per_s", "ram_bytes_per_s_around", "roofline_ram_bytes_per_s",
             "phases", "tokens", "match_transformers", "match_resident"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One bench run on --shape tiny, every mode in this process (one fresh CLI process in all)."""
    root = tmp_path_factory.mktemp("bench")
    out = root / "bench.json"
    llama_bench, _ = write_fake_llama_bench(root / "llama.cpp")  # --gguf adds its column (test_bench_llamacpp.py)
    (root / "model.gguf").write_bytes(b"GGUF")
    # Three of four experts per layer: with top-2 routing a guess always has a slot it may take.
    proc = run_cli("bench", "--shape", "tiny", "--dir", root / "models", "--modes", ",".join(MODES),
                   "--experts-per-layer", 3, "--prompts", PROMPTS, "--max-new-tokens", NEW_TOKENS, "--in-process", "--json", out,
                   "--gguf", root / "model.gguf", "--llama-bench", llama_bench)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text()), root


def test_json_has_every_mode_and_the_documented_keys(tiny_run):
    _, result, _ = tiny_run
    assert list(result["modes"]) == MODES + ["llamacpp"]
    for mode, r in result["modes"].items():
        if mode == "llamacpp":
            assert r["decode_tokens_per_s"] > 0 and r["llama_bench"]["tests"]["decode"]["n_gen"] == NEW_TOKENS
            continue
        assert r["llamacpp_decode_ratio"] == pytest.approx(r["decode_tokens_per_s"] / result["modes"]["llamacpp"]
                                                           ["decode_tokens_per_s"], rel=1e-2), mode
        assert MODE_KEYS <= set(r), (mode, MODE_KEYS - set(r))
        assert [len(t) for t in r["tokens"]] == [NEW_TOKENS] * PROMPTS, mode  # exactly N tokens per prompt
        assert r["decode_tokens"] == PROMPTS * (NEW_TOKENS - 1), mode  # the first token comes from the prefill
        assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 and r["peak_rss_bytes"] > 0, mode
        assert r["phases"]["long_prefill"]["tokens"] == bench.LONG_PREFILL, mode
    roof = result["roofline"]
    assert roof["ram_bytes_per_s"] > 1e8 and roof["disk_sequential_bytes_per_s"] > 0 and roof["disk_blob_bytes_per_s"] > 0
    assert roof["disk_bytes_per_s"] == max(roof["disk_sequential_bytes_per_s"], roof["disk_blob_bytes_per_s"])
    assert result["settings"]["isolation"] == "in-process"


def test_our_modes_split_their_memory(tiny_run):
    _, result, _ = tiny_run
    split_keys = ("memory_baseline_bytes", "memory_dense_bytes", "memory_cache_bytes", "memory_rest_bytes")
    for mode, r in result["modes"].items():
        if mode in bench.OURS:
            assert all(r[k] >= 0 for k in split_keys) and r["memory_baseline_bytes"] > 0, mode
            assert sum(r[k] for k in split_keys) <= r["peak_rss_bytes"] + 2**20, mode
        else:
            assert not set(split_keys) & set(r), mode
    assert "run peak: dense part MiB" in tiny_run[0].stdout


def test_cache_numbers_are_consistent(tiny_run):
    _, result, _ = tiny_run
    modes = result["modes"]
    store = Store.open(result["store"])
    # resident: warmed, so every access hits and nothing is read while generating
    assert modes["resident"]["hit_rate"] == 1.0
    assert modes["resident"]["expert_bytes_read"] == 0
    assert modes["resident"]["phases"]["decode"]["expert_bytes"] == 0
    # no-cache: every expert read for every use: top-k blobs per layer per decode token
    assert modes["no-cache"]["hit_rate"] == 0.0
    assert modes["no-cache"]["decode_expert_bytes_per_token"] == store.top_k * store.num_layers * store.blob_size
    assert modes["no-cache"]["hit_rate"] < modes["offload"]["hit_rate"]
    assert modes["no-cache"]["expert_bytes_read"] > modes["lru-only"]["expert_bytes_read"]
    # prefetch statistics belong to the one mode that prefetches
    assert 0 < modes["offload"]["prefetch_precision"] <= 1 and 0 < modes["offload"]["prefetch_recall"] <= 1
    assert modes["lru-only"]["prefetch_precision"] is None
    assert modes["transformers"]["hit_rate"] is None
    # the same weights give the same greedy tokens, however the experts are cached
    for mode in ("offload", "lru-only", "no-cache"):
        assert modes[mode]["tokens"] == modes["resident"]["tokens"], mode
        assert modes[mode]["match_resident"] == 1.0
    if HAS_ACCELERATE:  # accelerate runs the very weights transformers runs
        assert modes["accelerate"]["match_transformers"] == 1.0
        assert modes["accelerate"]["disk_bytes_read"] > 0  # its offloaded weights came from disk


def test_roofline_counts_the_bytes_a_token_reads(tiny_run):
    _, result, _ = tiny_run
    modes, roof = result["modes"], result["roofline"]
    store = Store.open(result["store"])
    r = modes["resident"]
    assert r["ram_bytes_per_token"] == r["dense_bytes_per_token"] + r["active_expert_bytes_per_token"]
    # the active experts are top-k of each layer's, a little less than k blobs (blobs are page-padded)
    assert 0 < r["active_expert_bytes_per_token"] <= store.top_k * store.num_layers * store.blob_size
    # the fp source reads more bytes per token than the 4-bit store
    assert modes["transformers"]["ram_bytes_per_token"] > r["ram_bytes_per_token"]
    # each mode's RAM bandwidth: the mean of the measures just before and after it, in a chain from the up-front one
    ours = MODES + ["llamacpp"]
    assert modes[ours[0]]["ram_bytes_per_s_around"][0] == roof["ram_bytes_per_s"]
    for before, after in zip(ours, ours[1:]):
        assert modes[after]["ram_bytes_per_s_around"][0] == modes[before]["ram_bytes_per_s_around"][1] > 1e8
    assert r["roofline_ram_bytes_per_s"] == pytest.approx(sum(r["ram_bytes_per_s_around"]) / 2, abs=1)
    ceiling = 1 / (r["ram_bytes_per_token"] / r["roofline_ram_bytes_per_s"]
                   + r["decode_disk_bytes_per_token"] / roof["disk_bytes_per_s"])
    assert r["roofline_tokens_per_s"] == pytest.approx(ceiling, rel=1e-3)
    assert r["roofline_ratio"] == pytest.approx(r["decode_tokens_per_s"] / ceiling, rel=1e-2, abs=1e-4)
    nc = modes["no-cache"]["phases"]["decode"]
    assert modes["no-cache"]["decode_disk_bytes_per_s"] == round(nc["disk_bytes"] / nc["seconds"])
    names = [t["target"] for t in result["targets"]]
    assert "resident decode / its roofline" in names and "offload / no-cache decode" in names
    conversion = next(t for t in result["targets"] if t["target"].startswith("conversion at 4-bit"))
    assert conversion["value"] == pytest.approx(result["model"]["convert_seconds"] / 60, abs=1e-3)
    assert conversion["met"] == (conversion["value"] <= 10)


def test_plan_is_predicted_for_our_modes_before_they_run(tiny_run):
    _, result, _ = tiny_run
    modes = result["modes"]
    for mode in ("resident", "offload", "lru-only", "no-cache"):
        r = modes[mode]
        plan = r["plan"]
        assert r["plan_decode_tokens_per_s"] == plan["decode_tokens_per_s"] > 0, mode
        assert r["measured_over_plan"] == pytest.approx(r["decode_tokens_per_s"] / plan["decode_tokens_per_s"], rel=1e-2)
        # resident's compute is its timed turns; a mode with misses never takes the stacked step, so
        # its layer steps are timed layer by layer, those that wait for a read after such a wait
        waited = plan["waited_layer_steps"]
        assert 0 <= waited <= 1 and (waited == 0) == (mode == "resident"), mode
        if mode != "resident":
            # less the cache's work around each of that pass's reads, which the read term holds
            store = Store.open(result["store"])
            layered = plan["compute_layered_seconds_per_token"]
            after_wait = max(layered, plan["compute_waited_seconds_per_token"]
                             - plan["read_work_seconds"] * store.top_k * len(store.moe_layers))
            assert 0 <= plan["read_work_seconds"] < store.blob_size / plan["disk_bytes_per_s"]
            assert plan["compute_seconds_per_token"] == pytest.approx(
                plan["compute_drift"] * ((1 - waited) * layered + waited * after_wait), rel=1e-3)
        assert plan["compute_seconds_per_token"] > 0 and plan["compute_drift"] > 0  # timed again before the mode
        store = Store.open(result["store"])
        assert plan["expert_reads_per_token"] == pytest.approx(
            (1 - plan["hit_rate"]) * store.top_k * len(store.moe_layers), rel=1e-3)
    assert modes["resident"]["plan_hit_rate"] == 1.0 and modes["no-cache"]["plan_hit_rate"] == 0.0
    assert modes["no-cache"]["plan"]["waited_layer_steps"] == 1  # it reads at every layer step
    assert modes["lru-only"]["plan"]["waited_layer_steps"] < 1
    # the hit rate and the misses' groups come from a trace of the bench's own turns: every prompt, every token
    store = Store.open(result["store"])
    assert modes["no-cache"]["plan"]["miss_groups"] == {str(store.top_k): 1}
    assert modes["no-cache"]["plan"]["disk_bytes_per_s_after"] > 0  # sampled again once the mode ran
    # the disk sample reads into pools of the mode's own size: top-k for no-cache, the bench's 3 for the others
    assert modes["no-cache"]["plan"]["disk_sample_slots_per_layer"] == store.top_k
    assert modes["lru-only"]["plan"]["disk_sample_slots_per_layer"] == modes["offload"]["plan"]["disk_sample_slots_per_layer"] == 3
    assert "disk_bytes_per_s_after" not in modes["resident"]["plan"]  # it reads nothing
    groups = modes["lru-only"]["plan"]["miss_groups"]
    assert sum(int(m) * n for m, n in groups.items()) / (PROMPTS * (NEW_TOKENS - 1)) == pytest.approx(
        modes["lru-only"]["plan"]["expert_reads_per_token"], rel=1e-3)
    assert modes["offload"]["plan_hit_rate"] == modes["lru-only"]["plan_hit_rate"]  # the plan models prefetch off
    assert 0.0 < modes["lru-only"]["plan_hit_rate"] <= 1.0
    assert "plan" not in modes["transformers"]


def test_blob_read_rate_goes_through_the_loader_a_layer_group_at_a_time(tiny_run, monkeypatch):
    """The plan's disk term: reads made through the cache and the loader a layer at a time, in the
    simulator's group sizes, so that a per-read cost (the hand-off to a loader thread) is in it."""
    import time

    from moe_offload.bench.roofline import blob_read_rate, blob_read_sample
    from moe_offload.cache import ExpertCache
    from moe_offload.loader import DiskLoader

    st = Store.open(tiny_run[1]["store"])
    calls, read = [], DiskLoader._read
    monkeypatch.setattr(ExpertCache, "stream", lambda self, layer, experts, stream=ExpertCache.stream:
                        calls.append((layer, len(experts))) or stream(self, layer, experts))
    assert blob_read_rate(st, {1: 3, 2: 1}, limit=400 * st.blob_size) > 0
    sizes = [n for _, n in calls]
    assert set(sizes) == {1, 2} and 2 < sizes.count(1) / sizes.count(2) < 4.5
    assert [layer for layer, _ in calls[:2 * len(st.moe_layers)]] == list(st.moe_layers) * 2  # layer after layer
    # with the mode's slots per layer, every layer's reads land in its own pool, as the mode's do
    made = []
    monkeypatch.setattr(ExpertCache, "__init__", lambda self, layers, slots, *a, init=ExpertCache.__init__, **kw:
                        made.append((slots, kw.get("scope"))) or init(self, layers, slots, *a, **kw))
    assert blob_read_rate(st, {2: 1}, limit=40 * st.blob_size, slots_per_layer=3) > 0
    assert blob_read_rate(st, {2: 1}, limit=40 * st.blob_size) > 0
    assert made == [(3, "layer"), (2, "global")]
    # a read that costs 5 ms more than its bytes shows in the rate (a bandwidth alone would not)
    monkeypatch.setattr(DiskLoader, "_read", lambda self, *a: time.sleep(0.005) or read(self, *a))
    assert blob_read_rate(st, {1: 1}, limit=20 * st.blob_size) < st.blob_size / 0.005
    # and the sample tells that time spent waiting for the loader from the cache's own work around a read
    assert blob_read_sample(st, {1: 1}, limit=20 * st.blob_size)[1] > 0.7
    monkeypatch.setattr(DiskLoader, "_read", read)
    monkeypatch.setattr(ExpertCache, "forget", lambda self, layer, forget=ExpertCache.forget:
                        time.sleep(0.005) or forget(self, layer))
    assert blob_read_sample(st, {1: 1}, limit=20 * st.blob_size)[1] < 0.3


def test_table_is_printed(tiny_run):
    proc, result, _ = tiny_run
    header = next(line for line in proc.stdout.splitlines() if line.startswith("|") and "resident" in line)
    assert all(mode in header for mode in MODES + ["llamacpp"])
    for label in ("decode / llama.cpp", "decode tok/s", "hit rate", "prefetch precision", "MiB read from disk", "% of roofline",
                  "peak RSS MiB", "stall s", "plan decode tok/s", "measured / plan"):
        assert f"| {label}" in proc.stdout, label
    assert "roofline: RAM read" in proc.stdout and "targets (issue #4; llama.cpp and memory limits: issue #11)" in proc.stdout
    assert "conversion at 4-bit experts" in proc.stdout and "min (goal <= 10 min)" in proc.stdout


def test_one_process_per_mode(tiny_run):
    """The default isolation: each mode in a fresh interpreter, results reported back as JSON lines."""
    _, result, _ = tiny_run
    out = bench.run_bench(result["store"], None, ["no-cache"], prompts=1, max_new_tokens=2, forecast=False)
    assert out["settings"]["isolation"] == "one process per mode"
    assert "plan" not in out["modes"]["no-cache"]
    r = out["modes"]["no-cache"]
    assert r["hit_rate"] == 0.0 and r["disk_bytes_read"] > 0 and r["peak_rss_bytes"] > 0
    assert r["tokens"][0] == result["modes"]["resident"]["tokens"][0][:2]  # greedy: a prefix of the same text


def test_plot(tiny_run, tmp_path):
    pytest.importorskip("matplotlib")
    _, result, _ = tiny_run
    bench.plot(result, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(MoeOffloadError, match="pip install 'matplotlib"):
        bench.plot({"modes": {}}, "x.png")


def test_modes_parse_with_commas_or_spaces():
    assert bench.parse_modes(["resident,offload", "no-cache"]) == ["resident", "offload", "no-cache"]
    assert bench.parse_modes(None) == list(bench.MODES)
    with pytest.raises(MoeOffloadError, match="unknown mode turbo: choose from resident"):
        bench.parse_modes(["resident", "turbo"])


def test_bad_input_gives_a_clear_error(tmp_path, capsys):
    assert main(["bench"]) == 2
    assert "give a STORE" in capsys.readouterr().err
    assert main(["bench", str(tmp_path), "--shape", "tiny"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["bench", "--shape", "tiny", "--prompts", "9"]) == 2
    assert "--prompts must be between 1 and 4" in capsys.readouterr().err


def test_cli_errors_without_traceback(tmp_path):
    proc = run_cli("bench", tmp_path / "nowhere")
    assert proc.returncode == 2 and "no such store" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("bench", "--shape", "tiny", "--modes", "resident,fast")
    assert proc.returncode == 2 and "unknown mode fast" in proc.stderr and "Traceback" not in proc.stderr


def test_hf_modes_need_the_source(tiny_run, tmp_path):
    """A store whose source checkpoint is gone: asked-for HF modes fail clearly."""
    _, result, _ = tiny_run
    st = Store.open(result["store"])
    with pytest.raises(MoeOffloadError, match="need the source checkpoint"):
        bench._check_source(["offload", "transformers"], None, explicit=True)
    assert bench._check_source(["offload", "transformers"], None, explicit=False) == ["offload"]
    assert bench._recorded_source(st) is not None  # --shape records where it built the model


def test_a_store_in_an_older_format_is_converted_again(tiny_run):
    _, _, root = tiny_run
    store = root / "models" / "tiny" / "store-e4-d4"
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**manifest, "format_version": 0}))
    assert bench.cli.prepare_shape("tiny", root / "models")[1] == store
    assert json.loads((store / "manifest.json").read_text())["format_version"] == manifest["format_version"]
    Store.open(store).verify()  # the converted store is whole


def test_a_prompt_generates_its_tokens_past_an_end_of_sequence(tiny_store4):
    """The bench times exactly N new tokens: an end-of-sequence token the model picks ends nothing."""
    import moe_offload
    from transformers import AutoTokenizer

    from moe_offload.bench import mode

    tok = AutoTokenizer.from_pretrained(tiny_store4, local_files_only=True)
    model = moe_offload.load(tiny_store4)
    try:
        first = mode._generate(model, tok, "hello there", 1)[0]
        model.generation_config.eos_token_id = first  # the token greedy decoding picks first now ends a run
        ids = mode._chat_ids(tok, "hello there")
        assert model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0).shape[1] == ids.shape[1] + 1
        assert len(mode._generate(model, tok, "hello there", 5)) == 5
    finally:
        model.close()

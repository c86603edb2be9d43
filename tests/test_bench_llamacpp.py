"""`bench --gguf`: llama.cpp's llama-bench as one more column, tested with a fake llama-bench that prints
llama-bench's real JSON format (tests/llama_bench_fake.py)."""
import json

import pytest

from conftest import run_cli
from llama_bench_fake import write_fake_llama_bench
from moe_offload import bench
from moe_offload.bench.cgroup import KILLED_OOM
from moe_offload.bench.llamacpp import LLAMACPP, add_ratios, find_llama_bench, parse_llama_bench_json, run_llamacpp
from moe_offload.bench.run import failed_result
from moe_offload.cli import main
from moe_offload.errors import MoeOffloadError


def _spec(binary, gguf="model.gguf", **kw):
    return dict(dict(binary=str(binary), gguf=str(gguf), threads=3, n_prompt=bench.LONG_PREFILL, n_gen=32,
                     repetitions=2, extra_args=["--repack", "0"]), **kw)


def test_llama_bench_json_is_parsed_into_the_column(tmp_path):
    binary, calls = write_fake_llama_bench(tmp_path, pp=150.7, tg=24.2)
    r = run_llamacpp(_spec(binary))
    assert r["decode_tokens_per_s"] == pytest.approx(24.2) and r["long_prefill_tokens_per_s"] == pytest.approx(150.7)
    assert r["prefill_tokens_per_s"] is None  # no chat prompts in llama-bench
    assert r["decode_tokens"] == 32 * 2 and r["peak_rss_bytes"] > 0 and r["tokens"] == []
    # one invocation per test: the prefill (pp) then the decode (tg), same threads, extra args last
    args = [json.loads(line) for line in calls.read_text().splitlines()]
    assert args == [["-m", "model.gguf", "-t", "3", "-r", "2", "-o", "json", "-p", str(bench.LONG_PREFILL), "-n", "0",
                     "--repack", "0"],
                    ["-m", "model.gguf", "-t", "3", "-r", "2", "-o", "json", "-p", "0", "-n", "32", "--repack", "0"]]
    raw = r["llama_bench"]
    assert raw["commands"]["decode"].endswith("-p 0 -n 32 --repack 0") and str(binary) in raw["commands"]["prefill"]
    assert raw["tests"]["prefill"]["n_prompt"] == bench.LONG_PREFILL and raw["tests"]["decode"]["n_gen"] == 32
    assert raw["tests"]["decode"]["samples_ts"] == [24.2, 24.2] and raw["tests"]["decode"]["n_threads"] == 3


def test_output_cut_short_keeps_the_complete_tests():
    text = '[\n  {\n    "n_prompt": 128,\n    "n_gen": 0,\n    "avg_ts": 150.5\n  },\n  {\n    "n_prompt": 0,\n'
    assert parse_llama_bench_json(text) == [{"n_prompt": 128, "n_gen": 0, "avg_ts": 150.5}]
    with pytest.raises(MoeOffloadError, match="no JSON"):
        parse_llama_bench_json("error: failed to load model")


def test_a_failing_llama_bench_says_how_and_the_other_test_still_counts(tmp_path):
    binary, _ = write_fake_llama_bench(tmp_path, exit_code=3)
    r = run_llamacpp(_spec(binary))  # llama.cpp runs last: its failure must not lose the other columns
    assert r["failed"] == "failed (exit status 3)" and r["decode_tokens_per_s"] is None
    assert "error loading model" in r["llama_bench"]["failed"]["prefill"]["stderr_tail"]
    binary, _ = write_fake_llama_bench(tmp_path / "crash", crash_prefill=True)  # e.g. a repacked prompt path crash
    r = run_llamacpp(_spec(binary))
    assert "failed" not in r and r["decode_tokens_per_s"] == pytest.approx(24.25) and r["long_prefill_tokens_per_s"] is None
    assert r["cell_notes"] == {"long_prefill_tokens_per_s": "failed (exit status -6)"}
    assert "GGML_ASSERT" in r["llama_bench"]["failed"]["prefill"]["stderr_tail"]
    row = next(line for line in bench.format_table({"modes": {LLAMACPP: r}}).splitlines() if "128 tokens" in line)
    assert "failed (exit status -6)" in row


def test_missing_llama_bench_gives_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    with pytest.raises(MoeOffloadError, match="none is on PATH.*--llama-bench"):
        find_llama_bench(None)
    with pytest.raises(MoeOffloadError, match="no executable llama-bench there"):
        find_llama_bench(str(tmp_path / "llama-bench"))
    binary, _ = write_fake_llama_bench(tmp_path / "bin")
    assert find_llama_bench(str(tmp_path / "bin")) == str(binary)  # a folder holding it works too
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert main(["bench", "--shape", "tiny", "--gguf", str(gguf)]) == 2
    assert "llama-bench, and none is on PATH" in capsys.readouterr().err
    assert main(["bench", "--shape", "tiny", "--gguf", str(tmp_path / "none.gguf")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_the_llamacpp_mode_needs_a_gguf(capsys):
    assert bench.parse_modes(["offload,llamacpp"]) == ["offload", LLAMACPP]
    assert main(["bench", "--shape", "tiny", "--modes", "offload", "llamacpp"]) == 2
    assert "needs a GGUF" in capsys.readouterr().err
    proc = run_cli("bench", "--shape", "tiny", "--llama-bench", "/x/llama-bench")
    assert proc.returncode == 2 and "go with --gguf" in proc.stderr and "Traceback" not in proc.stderr


def _results(modes: dict) -> dict:
    """What run_bench returns, as far as the report reads it."""
    return {"store": "store", "shape": None,
            "model": {"moe_layers": 2, "experts": 8, "top_k": 2, "expert_blob_bytes": 4096,
                      "quant": {"expert_bits": 4, "dense_bits": 4}},
            "settings": {"prompts": 1, "max_new_tokens": 32, "accelerate_tokens": 8, "expert_cache_bytes": 2**20,
                         "memory_limit_bytes": 2**21, "isolation": "one process per mode", "torch_threads": 2,
                         "load_average": [0.5, 0.5],
                         "memory_cgroup": {"limit_bytes": 1_500_000_000, "cgroup_version": 1, "swap_limited": True},
                         "llamacpp": {"gguf": {"path": "/m.gguf", "bytes": 2**30}, "threads": 2, "n_prompt": 128,
                                      "n_gen": 32, "repetitions": 3, "extra_args": []}},
            "roofline": {"ram_bytes_per_s": 2e10, "disk_bytes_per_s": 1e9, "disk_sequential_bytes_per_s": 1e9,
                         "disk_blob_bytes_per_s": 5e8},
            "modes": modes, "targets": []}


def test_ratios_to_llama_cpp_in_the_table():
    modes = {"resident": {"decode_tokens_per_s": 12.1, "long_prefill_tokens_per_s": 75.35, "prefill_tokens_per_s": 50.0},
             "offload": {"decode_tokens_per_s": 6.05, "long_prefill_tokens_per_s": 30.14, "prefill_tokens_per_s": 20.0},
             "no-cache": failed_result(KILLED_OOM),
             LLAMACPP: {"decode_tokens_per_s": 24.2, "long_prefill_tokens_per_s": 150.7, "prefill_tokens_per_s": None}}
    add_ratios(modes)
    assert modes["resident"]["llamacpp_decode_ratio"] == 0.5 and modes["resident"]["llamacpp_prefill_ratio"] == 0.5
    assert modes["offload"]["llamacpp_decode_ratio"] == 0.25 and modes["offload"]["llamacpp_prefill_ratio"] == 0.2
    assert modes["no-cache"]["llamacpp_decode_ratio"] is None and "llamacpp_decode_ratio" not in modes[LLAMACPP]
    report = bench.format_report(_results(modes))
    lines = report.splitlines()
    header = next(line for line in lines if line.startswith("|") and "resident" in line)
    assert [c.strip() for c in header.strip("|").split("|")] == ["", "resident", "offload", "no-cache", LLAMACPP]

    def row(label):
        return [c.strip() for c in next(line for line in lines if line.startswith(f"| {label} ")).strip("|").split("|")][1:]

    assert row("decode tok/s") == ["12.10", "6.05", KILLED_OOM, "24.20"]
    assert row(f"prefill tok/s ({bench.LONG_PREFILL} tokens)") == ["75.3", "30.1", "-", "150.7"]
    assert row("decode / llama.cpp") == ["0.50x", "0.25x", "-", "-"]
    assert row(f"prefill ({bench.LONG_PREFILL}) / llama.cpp") == ["0.50x", "0.20x", "-", "-"]
    assert "memory cgroup (v1) limited to 1.50 GB" in report and "llama-bench on /m.gguf" in report


def test_targets_against_llama_cpp():
    modes = {"resident": {"decode_tokens_per_s": 30.0, "long_prefill_tokens_per_s": 100.0, "roofline_ratio": 0.5},
             "offload": {"decode_tokens_per_s": 10.0, "long_prefill_tokens_per_s": 50.0},
             LLAMACPP: {"decode_tokens_per_s": 20.0, "long_prefill_tokens_per_s": 200.0}}
    names = {t["target"]: (t["value"], t["met"]) for t in bench.targets(modes)}
    assert names["resident decode / llama.cpp decode"] == (1.5, True)
    assert names["resident decode / its roofline, beside llama.cpp"] == (0.5, False)  # issue #11's 70%
    assert names["resident decode / its roofline"] == (0.5, True)  # issue #4's 50%
    assert names[f"resident prefill / llama.cpp prefill ({bench.LONG_PREFILL} tokens)"] == (0.5, False)
    limited = {t["target"]: t["value"] for t in bench.targets(modes, memory_limited=True)}
    assert limited == {"offload decode / llama.cpp decode under the memory limit": 0.5,
                       "resident decode / its roofline": 0.5, f"resident prefill ({bench.LONG_PREFILL} tokens) / decode":
                       pytest.approx(100 / 30, abs=1e-3), f"offload prefill ({bench.LONG_PREFILL} tokens) / decode": 5.0}

"""The command line as a user meets it."""
import json

import pytest

from conftest import run_cli


@pytest.mark.parametrize("command", ["convert", "generate", "verify", "demo", "serve", "chat"])
def test_every_command_has_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0
    assert "usage: moe-offload " + command in result.stdout


def test_the_parser_starts_without_torch():
    """--help and argument errors answer in a fraction of a second: torch and transformers (~3 s
    to import) come with the first name that needs them."""
    import subprocess
    import sys

    code = ("import sys; from moe_offload.cli import build_parser; build_parser(); import moe_offload; "
            "print([m for m in ('torch', 'transformers', 'numba') if m in sys.modules]); "
            "print(moe_offload.convert.__module__, moe_offload.load.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "moe_offload.conversion moe_offload.model"]


def test_generate_json(tiny_store4):
    result = run_cli("generate", tiny_store4, "--prompt", "def main():", "--max-new-tokens", "12", "--json",
                     "--experts-per-layer", "2", fresh=True)  # one command end to end from a bare interpreter
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert 1 <= out["completion_tokens"] <= 12 and isinstance(out["text"], str)
    stats = out["stats"]
    assert stats["tokens_decode"] == out["completion_tokens"] - 1
    assert stats["tokens_prefill"] == out["prompt_tokens"]
    assert 0 <= stats["hit_rate"] <= 1 and stats["cache_slots"] == 4
    assert "every expert read" not in result.stderr  # a cache of some experts fills as they are used


def test_generate_streams_then_prints_statistics(tiny_store4):
    result = run_cli("generate", tiny_store4, "--prompt", "hello", "--chat", "--max-new-tokens", "8",
                     "--temperature", "0.8", "--top-p", "0.9", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert "hit rate" in result.stderr and "decode:" in result.stderr
    # the auto budget holds every expert of this tiny store: read before the prompt, nothing to guess
    assert "prefetch off: the cache holds every expert" in result.stderr
    assert "every expert read into the cache" in result.stderr


def test_convert_and_verify(tiny_src, tmp_path):
    result = run_cli("convert", tiny_src, tmp_path / "st", "--expert-bits", "3", "--dense-bits", "8",
                     "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "converting experts" in result.stderr and "s/expert" in result.stderr  # the progress bar
    manifest = json.loads((tmp_path / "st" / "manifest.json").read_text())
    assert manifest["convert_workers"] == 2
    assert manifest["quant"]["expert_bits"] == 3 and manifest["quant"]["dense_bits"] == 8
    assert (tmp_path / "st" / "tokenizer.json").is_file()
    assert all(b["offset"] % 4096 == 0 and b["size"] % 4096 == 0 for b in manifest["blobs"]["0"])
    result = run_cli("verify", tmp_path / "st")
    assert result.returncode == 0 and "check out" in result.stdout


def test_commands_freeze_the_loaded_heap(tiny_store4, monkeypatch):
    """After loading, the commands move what the process holds into the collector's permanent
    generation, after a collection: full collections then skip the ~500k objects of torch,
    transformers and the model instead of pausing a decode step for ~200 ms."""
    import gc

    from moe_offload.cli import build_parser
    from moe_offload.engine import load_model

    calls = []
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append("collect") or 0)
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    args = build_parser().parse_args(["generate", str(tiny_store4), "--prompt", "hi", "--experts-per-layer", "2"])
    model, _ = load_model(args)
    model.close()
    assert calls[-2:] == ["collect", "freeze"]


def test_generate_once_echoes_the_prompt_right_before_its_text(tiny_store4, capsys):
    """The demo's line: the prompt, then its continuation; what loading says goes to stderr first."""
    from moe_offload.generate import generate_once

    out = generate_once(tiny_store4, "hello", max_new_tokens=4, echo_prompt=True, expert_cache="auto")  # all fit
    printed = capsys.readouterr()
    assert printed.out == "hello" + out["text"] + "\n"
    assert "every expert read into the cache" in printed.err

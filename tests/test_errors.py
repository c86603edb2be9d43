"""Every bad input gets a clear message and a non-zero exit, never a traceback, and loses nothing."""
import json
import shutil

import pytest
import torch

import moe_offload
from conftest import run_cli
from moe_offload import MoeOffloadError, StoreCorruptError


def assert_clean_failure(result, *needles):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_missing_folder(tmp_path):
    assert_clean_failure(run_cli("convert", tmp_path / "nope", tmp_path / "out"), "no such checkpoint folder")
    assert_clean_failure(run_cli("generate", tmp_path / "nope", "--prompt", "hi"), "no such store")
    assert_clean_failure(run_cli("verify", tmp_path / "nope"), "no such store")
    assert not (tmp_path / "out").exists()


def test_folder_that_is_not_a_store(tiny_src):
    assert_clean_failure(run_cli("generate", tiny_src, "--prompt", "hi"), "not a moe-offload store")


def _save_model(config, path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(config).save_pretrained(path)


def test_dense_architecture(tmp_path):
    from transformers import LlamaConfig

    _save_model(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=2, vocab_size=100), tmp_path / "llama")
    assert_clean_failure(run_cli("convert", tmp_path / "llama", tmp_path / "out"),
                         "'llama' is not a Mixture-of-Experts model", "dense models")
    assert not (tmp_path / "out").exists()


def test_unsupported_moe_architecture(tmp_path):
    """JetMoE keeps its experts in modules of its own, outside transformers' experts seam: the user is
    told which part is unsupported."""
    from transformers import JetMoeConfig

    _save_model(JetMoeConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_key_value_heads=2,
                             kv_channels=16, num_local_experts=4, num_experts_per_tok=2, vocab_size=100),
                tmp_path / "jetmoe")
    assert_clean_failure(run_cli("convert", tmp_path / "jetmoe", tmp_path / "out"), "'jetmoe'",
                         "do not use transformers' experts seam")
    assert not (tmp_path / "out").exists()


def test_checkpoint_missing_an_expert(tiny_src, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    shutil.copytree(tiny_src, src)
    tensors = load_file(src / "model.safetensors")
    dropped = [k for k in tensors if ".experts.3." in k and ".layers.1." in k]
    assert dropped
    save_file({k: v for k, v in tensors.items() if k not in dropped}, src / "model.safetensors", metadata={"format": "pt"})
    assert_clean_failure(run_cli("convert", src, tmp_path / "out"), "missing weights of expert 3 in layer 1")
    assert not (tmp_path / "out").exists()


def test_budget_below_minimum(tiny_store16):
    with pytest.raises(MoeOffloadError, match="the minimum is 2"):
        moe_offload.load(tiny_store16, experts_per_layer=1)
    with pytest.raises(MoeOffloadError, match="the minimum is 2"):
        moe_offload.load(tiny_store16, expert_cache=4096)
    result = run_cli("generate", tiny_store16, "--prompt", "hi", "--expert-cache", "10KiB")
    assert_clean_failure(result, "the minimum is 2", "--experts-per-layer 2")
    assert_clean_failure(run_cli("generate", tiny_store16, "--prompt", "hi", "--expert-cache", "lots"),
                         "cannot read the size")


def test_destination_exists_is_not_overwritten(tiny_src, tiny_store16):
    before = (tiny_store16 / "manifest.json").read_text()
    assert_clean_failure(run_cli("convert", tiny_src, tiny_store16), "already exists")
    assert (tiny_store16 / "manifest.json").read_text() == before


@pytest.fixture
def store_copy(tiny_store16, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_store16, dst)
    return dst


def test_truncated_experts_file(store_copy):
    experts = store_copy / "experts.bin"
    with open(experts, "r+b") as f:
        f.truncate(experts.stat().st_size - 4096)
    with pytest.raises(StoreCorruptError, match="truncated"):
        moe_offload.load(store_copy)
    assert_clean_failure(run_cli("generate", store_copy, "--prompt", "hi"), "truncated")
    assert_clean_failure(run_cli("verify", store_copy), "truncated")


def test_flipped_byte_names_the_expert(store_copy):
    manifest = json.loads((store_copy / "manifest.json").read_text())
    blob = manifest["blobs"]["1"][3]  # layer 1, expert 3
    with open(store_copy / "experts.bin", "r+b") as f:
        f.seek(blob["offset"] + 100)
        byte = f.read(1)
        f.seek(blob["offset"] + 100)
        f.write(bytes([byte[0] ^ 0x10]))
    assert_clean_failure(run_cli("verify", store_copy), "expert 3 of layer 1")
    # Loading works; the damage is caught the first time that expert is read.
    model = moe_offload.load(store_copy, experts_per_layer=4, prefetch=0)
    with pytest.raises(StoreCorruptError, match="expert 3 of layer 1"):
        for _ in range(50):
            model(torch.randint(3, 1000, (1, 16)))
    model.close()
    result = run_cli("generate", store_copy, "--prompt", "hello world " * 20, "--experts-per-layer", "4",
                     "--max-new-tokens", "40")
    assert_clean_failure(result, "expert 3 of layer 1")


def test_damaged_manifest(store_copy):
    (store_copy / "manifest.json").write_text("{not json")
    assert_clean_failure(run_cli("generate", store_copy, "--prompt", "hi"), "not readable JSON")


def test_interrupted_convert_leaves_no_store(tiny_src, tmp_path, monkeypatch):
    import importlib

    convert_module = importlib.import_module("moe_offload.conversion")

    calls = {"n": 0}
    real = convert_module._quantize_expert

    def crash_midway(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "_quantize_expert", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        moe_offload.convert(tiny_src, tmp_path / "store", expert_bits=4, progress=False)
    assert not (tmp_path / "store").exists()
    assert not list(tmp_path.iterdir())  # the temporary folder is gone too
    with pytest.raises(MoeOffloadError, match="no such store"):
        moe_offload.load(tmp_path / "store")


@pytest.fixture(scope="module")
def slow_src(tmp_path_factory):
    """256 experts (~2 s to convert): a signal sent once experts are being written lands while they
    still are, however fast the machine (the tiny model's 8 could all be done before it arrives)."""
    from moe_offload.synthetic import SHAPES, build_random_mixtral

    return build_random_mixtral(tmp_path_factory.mktemp("slow") / "src",
                                dict(SHAPES["tiny"], num_local_experts=64, num_hidden_layers=4, intermediate_size=512),
                                seed=1, tokenizer=False)


def test_killed_convert_leaves_no_store(slow_src, tmp_path):
    """A conversion killed from outside (no cleanup runs) leaves only a hidden partial folder."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "moe_offload", "convert", str(slow_src), str(tmp_path / "store"),
                             "--expert-bits", "2"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".store.partial-*/experts.bin")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "store").exists()
    assert_clean_failure(run_cli("generate", tmp_path / "store", "--prompt", "hi"), "no such store")


def test_ctrl_c_during_parallel_convert(slow_src, tmp_path):
    """Ctrl-C in the CLI while worker threads quantize: exit 130 at once, no folder left behind."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "moe_offload", "convert", str(slow_src), str(tmp_path / "store"),
                             "--expert-bits", "2", "--workers", "2"], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".store.partial-*/experts.bin")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())

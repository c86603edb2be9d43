"""Every test builds its own tiny models: nothing is downloaded."""
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

import cli_process  # noqa: E402
import moe_offload  # noqa: E402
from moe_offload.synthetic import SHAPES, build_random_mixtral  # noqa: E402

# Tiny Mixtral configurations: GQA and MQA, sizes that are not powers of two, odd vocabularies.
CONFIGS = {
    "gqa": SHAPES["tiny"],  # 4 query heads sharing 2 KV heads
    "odd": dict(hidden_size=96, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                num_key_value_heads=3, num_local_experts=6, num_experts_per_tok=2, vocab_size=1003),
    "mqa_top3": dict(hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=1, num_local_experts=8, num_experts_per_tok=3, vocab_size=517),
}


@pytest.fixture(scope="session")
def tiny_src(tmp_path_factory):
    """A tiny random Mixtral with a tokenizer (the checkpoint most tests convert)."""
    return build_random_mixtral(tmp_path_factory.mktemp("src") / "tiny", CONFIGS["gqa"], seed=1)


@pytest.fixture(scope="session")
def tiny_store16(tiny_src, tmp_path_factory):
    return moe_offload.convert(tiny_src, tmp_path_factory.mktemp("st") / "store16", expert_bits=16, dense_bits=16,
                               progress=False)


@pytest.fixture(scope="session")
def tiny_store4(tiny_src, tmp_path_factory):
    return moe_offload.convert(tiny_src, tmp_path_factory.mktemp("st") / "store4", expert_bits=4, dense_bits=4,
                               progress=False)


def run_cli(*args, timeout=300, fresh=False):
    """Run the CLI in a process of its own, as a user would: forked from a server that has imported
    it (cli_process.py), or with `fresh` started from nothing (`python -m moe_offload`)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if not fresh:
        return cli_process.run(list(map(str, args)), env, timeout)
    return subprocess.run([sys.executable, "-m", "moe_offload", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


_FAMILY_LINES: list[str] = []


@pytest.fixture
def family_report():
    """Lines printed at the end of the run: per-family numbers the issue asks to see, not asserted."""
    return _FAMILY_LINES


def pytest_terminal_summary(terminalreporter):
    if _FAMILY_LINES:
        terminalreporter.section("MoE families")
        for line in sorted(_FAMILY_LINES):
            terminalreporter.write_line(line)

"""Reading FP8 and MXFP4 checkpoints: every logical tensor equals what transformers itself loads."""
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moe_offload import sources
from moe_offload.errors import MoeOffloadError
from moe_offload.sources import SourceTensors, open_sources

FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _index(d: Path) -> dict:
    f = d / "model.safetensors"
    with safe_open(f, "pt") as sf:
        return {k: f for k in sf.keys()}


def _save_random(d: Path, config) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(d)
    return load_file(d / "model.safetensors")


def _set_quant(d: Path, quantization_config: dict) -> None:
    c = json.loads((d / "config.json").read_text())
    c["quantization_config"] = quantization_config
    (d / "config.json").write_text(json.dumps(c))


# ---------------------------------------------------------------- FP8

def _fp8_quantize(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's scheme: one fp32 scale per block of block x block, the last blocks partial."""
    rows, cols = w.shape
    grid = math.ceil(rows / block), math.ceil(cols / block)
    padded = torch.zeros(grid[0] * block, grid[1] * block)
    padded[:rows, :cols] = w.float()
    tiles = padded.reshape(grid[0], block, grid[1], block)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
    codes = (tiles / scale[:, None, :, None]).reshape(padded.shape)[:rows, :cols]
    return codes.to(torch.float8_e4m3fn), scale


def _deepseek(d: Path, block: int, **dims) -> Path:
    """A tiny random DeepSeek-V3 whose linear weights are FP8 in block x block scales."""
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(vocab_size=256, num_hidden_layers=2, first_k_dense_replace=1, n_routed_experts=4,
                              num_experts_per_tok=2, n_shared_experts=1, num_attention_heads=2,
                              num_key_value_heads=2, n_group=1, topk_group=1, **dims)
    plain = _save_random(d, config)
    stored = {}
    for key, w in plain.items():
        if w.ndim == 2 and not re.search(r"embed_tokens|lm_head|mlp\.gate\.", key):  # routers stay bf16
            stored[key], stored[key + "_scale_inv"] = _fp8_quantize(w, block)
        else:
            stored[key] = w
    save_file(stored, d / "model.safetensors", metadata={"format": "pt"})
    _set_quant(d, {**FP8_CONFIG, "weight_block_size": [block, block]})
    return d


@pytest.fixture(scope="module")
def fp8_aligned(tmp_path_factory):
    """Every dimension a multiple of the 32 block, several blocks per matrix."""
    return _deepseek(tmp_path_factory.mktemp("fp8") / "aligned", 32, hidden_size=64, intermediate_size=96,
                     moe_intermediate_size=32, q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=32,
                     qk_nope_head_dim=32, v_head_dim=32)


@pytest.fixture(scope="module")
def fp8_odd(tmp_path_factory):
    """Hidden 160 and intermediate 200 in 128 blocks: the last block of each is partial."""
    return _deepseek(tmp_path_factory.mktemp("fp8") / "odd", 128, hidden_size=160, intermediate_size=200,
                     moe_intermediate_size=72, q_lora_rank=96, kv_lora_rank=64, qk_rope_head_dim=16,
                     qk_nope_head_dim=32, v_head_dim=32)


def _open(d: Path) -> SourceTensors:
    from transformers import AutoConfig

    return open_sources(d, _index(d), AutoConfig.from_pretrained(d))


def _oracle_fp8(d: Path) -> dict:
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    model = AutoModelForCausalLM.from_pretrained(d, quantization_config=FineGrainedFP8Config(dequantize=True))
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}  # e_score_correction_bias: a buffer


EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")


def test_fp8_equals_transformers_dequantized_model(fp8_aligned):
    src, oracle = _open(fp8_aligned), _oracle_fp8(fp8_aligned)
    assert src.source_format == "fp8"
    assert not [k for k in src.keys() if k.endswith("_scale_inv")]
    seen = set()
    for key in src.keys():
        got = src.get(key)
        assert got.shape == src.shape(key)
        m = EXPERT.fullmatch(key)
        if m:  # the oracle fuses the experts: gate_up_proj [E, 2 * ffn, hidden] and down_proj [E, hidden, ffn]
            prefix, e, proj = m.group(1), int(m.group(2)), m.group(3)
            if proj == "down":
                want = oracle[prefix + ".down_proj"][e]
            else:
                fused = oracle[prefix + ".gate_up_proj"][e]
                half = fused.shape[0] // 2
                want = fused[:half] if proj == "gate" else fused[half:]
            seen.add(prefix + (".down_proj" if proj == "down" else ".gate_up_proj"))
        else:
            want = oracle[key]
            seen.add(key)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got.float(), want.float()), key  # routers are fp32 there, bf16 here: same values
    assert seen == {k for k in oracle if "rotary_emb" not in k}


def test_fp8_partial_blocks_match_transformers_fp8_linear_dequantizer(fp8_odd):
    """The oracle is the dequantizer of transformers' FP8Linear (its loader's dequantize=True path
    splits the grid evenly, which misreads partial blocks)."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    src, stored = _open(fp8_odd), load_file(fp8_odd / "model.safetensors")
    fp8_keys = [k for k in src.keys() if k + "_scale_inv" in stored]
    assert "model.layers.0.mlp.down_proj.weight" in fp8_keys and len(fp8_keys) > 10
    for key in fp8_keys:
        want = _dequantize_fp8_weight(stored[key], stored[key + "_scale_inv"], [128, 128], torch.float32)
        assert torch.equal(src.get(key), want.to(torch.bfloat16)), key
    # The comparison can fail: read as an even split of the grid (80 x 100 blocks), the same codes differ.
    key = "model.layers.0.mlp.down_proj.weight"  # [160, 200]: scales [2, 2]
    wrong = _dequantize_fp8_weight(stored[key], stored[key + "_scale_inv"], [80, 100], torch.float32)
    wrong = wrong.to(torch.bfloat16)
    assert not torch.equal(src.get(key), wrong)


def test_fp8_get_slice_reads_one_row(fp8_odd):
    src = _open(fp8_odd)
    key = "model.layers.0.mlp.gate_proj.weight"  # [200, 160]: row 150 is in the partial second block row
    for row in (0, 127, 128, 150, 199):
        assert torch.equal(src.get_slice(key, row), src.get(key)[row])


def test_fp8_wrong_block_size_in_config_is_an_error(fp8_odd, tmp_path):
    stored = load_file(fp8_odd / "model.safetensors")
    save_file(stored, tmp_path / "model.safetensors")
    with pytest.raises(MoeOffloadError, match=r"scales \[2, 2\].*weight_block_size \[64, 64\]"):
        SourceTensors(_index(tmp_path), {**FP8_CONFIG, "weight_block_size": [64, 64]})


def test_fp8_fused_experts_and_per_tensor_scales(tmp_path):
    """A stacked [E, out, in] FP8 tensor slices its codes and its scales; one scale may cover a tensor."""
    w = torch.randn(3, 40, 70)
    codes, scales = zip(*(_fp8_quantize(x, 32) for x in w))
    codes, scales = torch.stack(codes), torch.stack(scales)
    per_tensor = (torch.randn(8, 16) * 10).to(torch.float8_e4m3fn)
    save_file({"experts.gate_up_proj": codes, "experts.gate_up_proj_scale_inv": scales,
               "o.weight": per_tensor, "o.weight_scale_inv": torch.tensor(0.25),
               "o.input_scale": torch.tensor(1.0)}, tmp_path / "model.safetensors")
    src = SourceTensors(_index(tmp_path), {**FP8_CONFIG, "weight_block_size": [32, 32]})
    assert sorted(src.keys()) == ["experts.gate_up_proj", "o.weight"]
    full = src.get("experts.gate_up_proj")
    assert full.shape == (3, 40, 70)
    assert (full.float() - w).norm() / w.norm() < 0.05
    for e in range(3):
        assert torch.equal(src.get_slice("experts.gate_up_proj", e), full[e])
    assert torch.equal(src.get("o.weight"), (per_tensor.float() * 0.25).to(torch.bfloat16))


def test_fp8_missing_scale_names_the_tensor(tmp_path):
    save_file({"x.weight": torch.zeros(4, 4).to(torch.float8_e4m3fn), "n.weight": torch.ones(4)},
              tmp_path / "model.safetensors")
    with pytest.raises(MoeOffloadError, match=r"x\.weight has no scales: x\.weight_scale_inv is missing"):
        SourceTensors(_index(tmp_path), FP8_CONFIG)


# ---------------------------------------------------------------- MXFP4

def _mxfp4_encode(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., n] -> blocks [..., n/32, 16] uint8 (element 2i in the low nibble) and e8m0 scales [..., n/32]."""
    groups = w.float().reshape(*w.shape[:-1], -1, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    exponent = torch.ceil(torch.log2(amax / 6)).clamp(-127, 127)  # largest |value| fits in e2m1's 6
    magnitude = (groups / exponent.exp2()).abs()
    codes = (magnitude.unsqueeze(-1) - FP4_VALUES).abs().argmin(-1) + 8 * (groups < 0)
    blocks = (codes[..., 0::2] | codes[..., 1::2] << 4).to(torch.uint8)
    return blocks, (exponent.squeeze(-1) + 127).to(torch.uint8)


@pytest.fixture(scope="module")
def mxfp4_src(tmp_path_factory):
    """A tiny random gpt-oss whose experts are MXFP4, written as the released checkpoints are."""
    from transformers import GptOssConfig

    d = tmp_path_factory.mktemp("mxfp4") / "gpt-oss"
    config = GptOssConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_local_experts=4,
                          num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"])
    stored = {}
    for key, w in _save_random(d, config).items():
        if key.endswith(("gate_up_proj", "down_proj")):  # in memory [E, in, out]; on disk [E, out, in/32, 16]
            stored[key + "_blocks"], stored[key + "_scales"] = _mxfp4_encode(w.transpose(1, 2))
        else:
            stored[key] = w
    save_file(stored, d / "model.safetensors", metadata={"format": "pt"})
    _set_quant(d, {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})
    return d


def test_mxfp4_equals_transformers_dequantized_model(mxfp4_src):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    oracle = dict(AutoModelForCausalLM.from_pretrained(
        mxfp4_src, quantization_config=Mxfp4Config(dequantize=True)).named_parameters())
    src = _open(mxfp4_src)
    assert src.source_format == "mxfp4"
    assert sorted(src.keys()) == sorted(oracle)
    key = "model.layers.1.mlp.experts.gate_up_proj"
    assert src.shape(key) == (4, 64, 192) and src.shape(key.replace("gate_up", "down")) == (4, 96, 64)
    for key in src.keys():
        got = src.get(key)
        assert got.shape == oracle[key].shape == src.shape(key), key
        assert torch.equal(got, oracle[key].to(got.dtype)), key
        if key.endswith(("gate_up_proj", "down_proj")):
            assert got.dtype == torch.bfloat16
            for e in range(got.shape[0]):
                assert torch.equal(src.get_slice(key, e), oracle[key][e]), (key, e)


def test_mxfp4_decoding_can_fail(mxfp4_src):
    """The comparison is sensitive: swapping the nibble order or leaving out the transposition differs."""
    src, stored = _open(mxfp4_src), load_file(mxfp4_src / "model.safetensors")
    key = "model.layers.0.mlp.experts.down_proj"
    blocks, scales = stored[key + "_blocks"], stored[key + "_scales"]
    swapped = (blocks >> 4) | (blocks << 4)
    assert not torch.equal(src.get(key), sources.dequantize_mxfp4(swapped, scales))
    assert src.get(key).shape != sources.dequantize_mxfp4(blocks, scales).transpose(1, 2).shape


def test_mxfp4_missing_scales_names_the_tensor(tmp_path):
    save_file({"experts.down_proj_blocks": torch.zeros(2, 4, 1, 16, dtype=torch.uint8)}, tmp_path / "m.safetensors")
    with pytest.raises(MoeOffloadError, match=r"experts\.down_proj has no scales: experts\.down_proj_scales"):
        SourceTensors({"experts.down_proj_blocks": tmp_path / "m.safetensors"}, {"quant_method": "mxfp4"})


# ---------------------------------------------------------------- plain, shapes, errors, threads

def test_plain_passthrough_and_shapes_without_loading(fp8_odd, monkeypatch):
    stored = load_file(fp8_odd / "model.safetensors")
    src = SourceTensors(_index(fp8_odd), None)
    assert src.source_format == "plain" and sorted(src.keys()) == sorted(stored)
    key = "model.layers.0.mlp.down_proj.weight"
    assert src.get(key).dtype == torch.float8_e4m3fn and torch.equal(src.get(key).float(), stored[key].float())
    fp8 = _open(fp8_odd)

    def no_reads(*a, **k):
        raise AssertionError("shape() and keys() must not open the checkpoint")

    monkeypatch.setattr(sources, "safe_open", no_reads)
    assert fp8.shape(key) == (160, 200) and key in fp8.keys()
    assert fp8.shape("model.layers.1.mlp.experts.3.up_proj.weight") == (72, 160)


def test_unsupported_quant_method_is_named(fp8_odd):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(fp8_odd)
    config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(MoeOffloadError, match=r"'gptq'.*supported: fp8 .*mxfp4"):
        open_sources(fp8_odd, _index(fp8_odd), config)


def test_quantization_config_object(mxfp4_src):
    from transformers import Mxfp4Config

    assert SourceTensors(_index(mxfp4_src), Mxfp4Config()).source_format == "mxfp4"


def test_threads_read_the_same_tensors(mxfp4_src):
    src = _open(mxfp4_src)
    keys = src.keys() * 3
    serial = [src.get(k) for k in keys]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(src.get, keys))
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel))


@pytest.mark.parametrize("fixture,config_class", [("fp8_aligned", "FineGrainedFP8Config"), ("mxfp4_src", "Mxfp4Config")])
def test_convert_reads_the_source_format_end_to_end(fixture, config_class, request, tmp_path):
    """convert streams FP8 / MXFP4 checkpoints into a store whose model equals transformers' own model
    on its own dequantization (the experts of a 16-bit store compute in the source's bf16, hence the
    tolerance; a wrong layout or scale would be off by the logits' own size)."""
    import transformers

    import moe_offload

    src = request.getfixturevalue(fixture)
    oracle = transformers.AutoModelForCausalLM.from_pretrained(
        src, quantization_config=getattr(transformers, config_class)(dequantize=True)).float().eval()
    store = moe_offload.convert(src, tmp_path / "store", expert_bits=16, dense_bits=16, progress=False)
    assert json.loads((store / "manifest.json").read_text())["source"]["format"] == fixture.split("_")[0]
    assert "quantization_config" not in json.loads((store / "config.json").read_text())
    model = moe_offload.load(store, experts_per_layer=2)
    try:
        ids = torch.randint(0, 256, (1, 9))
        with torch.no_grad():
            expected, got = oracle(ids).logits, model(ids).logits
        assert expected.abs().max() > 0.1
        assert (got - expected).abs().max() <= 2e-2 * expected.abs().max(), (got - expected).abs().max()
    finally:
        model.close()

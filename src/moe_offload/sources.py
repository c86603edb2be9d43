"""The tensors of a source checkpoint by name, with the quantized formats users download read as bf16.

- "plain":  tensors as stored.
- "fp8":    block-scaled FP8 (DeepSeek-V3/R1, Kimi-K2, Qwen3-FP8): `X` float8 with a companion
            `X_scale_inv` float32 (or e8m0) grid; W = fp8 * scale of its block. Blocks are
            `weight_block_size` wide, the last ones along each dim partial (DeepSeek's convention);
            also one scale per tensor, or, with no block size configured, per channel.
- "mxfp4":  gpt-oss experts: `X_blocks` uint8 [E, out, in/32, 16] (two e2m1 values a byte) and
            `X_scales` e8m0 [E, out, in/32]; read as `X` [E, in, out], the layout of transformers'
            in-memory parameter (gate_up_proj: [E, hidden, 2*intermediate], gate/up interleaved).

MXFP4 is read as bf16 and requantized like any weight, which costs accuracy: gpt-oss ships only in
MXFP4, so its dequantized values are the model. Measured on a 1024x1024 Gaussian matrix put through
MXFP4 (4.25 bits a weight, lossless if kept), relative Frobenius error of requantizing it with HQQ:
4-bit group 64, 4.5 bits: 8.0%; group 32, 5 bits: 6.8%; 8-bit per channel, 8 bits: 0.5%
(Student-t, nu=3: 9.3%, 6.2%, 2.7%). A stored MXFP4 format (with its own kernel) would be both
smaller and exact; until there is one, 8-bit experts are the faithful choice for gpt-oss.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import MoeOffloadError

SUPPORTED_QUANT_METHODS = {"fp8": "block-scaled FP8, e.g. DeepSeek-V3, Kimi-K2, Qwen3-FP8",
                           "mxfp4": "MXFP4 experts, e.g. gpt-oss"}
FP8_SCALE_SUFFIX = "_scale_inv"
# Static activation scales of FP8 checkpoints: nothing to do with weights, dropped.
FP8_ACTIVATION_SUFFIXES = (".input_scale", ".activation_scale")
MXFP4_BLOCKS, MXFP4_SCALES = "_blocks", "_scales"


@dataclass(frozen=True)
class _Logical:
    kind: str  # "plain", "fp8" or "mxfp4"
    stored: str  # the key of the stored values (fp8 codes, mxfp4 blocks or the plain tensor)
    shape: tuple[int, ...]  # logical, dequantized
    scale: str | None = None  # the key of the scale companion
    scale_shape: tuple[int, ...] = ()
    block: tuple[int, int] = (0, 0)  # fp8: rows and columns one scale covers


def quant_method(quantization_config) -> str:
    """The source format, "plain", "fp8" or "mxfp4", of config.quantization_config (dict, object or None)."""
    qc = _as_dict(quantization_config)
    method = qc.get("quant_method")
    if method is None:
        return "plain"
    method = str(getattr(method, "value", method))  # transformers' QuantizationMethod enum
    if method not in SUPPORTED_QUANT_METHODS:
        supported = "; ".join(f"{m} ({what})" for m, what in SUPPORTED_QUANT_METHODS.items())
        raise MoeOffloadError(
            f"the checkpoint is quantized with {method!r}, which moe-offload cannot read (supported: {supported}); "
            "convert the model's unquantized (bf16) checkpoint instead")
    return method


def _as_dict(quantization_config) -> dict:
    if quantization_config is None:
        return {}
    if isinstance(quantization_config, dict):
        return quantization_config
    if hasattr(quantization_config, "to_dict"):
        return quantization_config.to_dict()
    return dict(vars(quantization_config))


class SourceTensors:
    """Logical tensors of a checkpoint (scale companions folded away), dequantized to bf16 on read.

    Every read opens its file (~2 ms): safetensors maps the whole file, and the pages a tensor
    touched stay resident (RSS) for as long as the mapping lives, which over a whole checkpoint
    adds up to its size. Nothing is shared between calls, so the converter's threads can read at once.
    """

    def __init__(self, index: dict[str, Path], quantization_config: dict | None):
        self.index = index
        self._format = quant_method(quantization_config)
        self._block = tuple(_as_dict(quantization_config).get("weight_block_size") or ()) or None
        stored = _read_headers(index)
        build = {"plain": _plain, "fp8": self._fp8_tensors, "mxfp4": _mxfp4_tensors}[self._format]
        self._tensors: dict[str, _Logical] = build(stored)

    @property
    def source_format(self) -> str:
        return self._format

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._tensors[key].shape

    def get(self, key: str) -> torch.Tensor:
        t = self._tensors[key]
        if t.kind == "plain":
            return self._read(t.stored)
        if t.kind == "fp8":
            return dequantize_fp8(self._read(t.stored), self._read(t.scale), t.block)
        return dequantize_mxfp4(self._read(t.stored), self._read(t.scale))

    def get_slice(self, key: str, index: int) -> torch.Tensor:
        """The logical tensor's [index] along dim 0, reading only its rows (and their scales)."""
        t = self._tensors[key]
        if not 0 <= index < t.shape[0]:
            raise IndexError(f"{key}: index {index} out of range for {t.shape[0]}")
        one = slice(index, index + 1)
        if t.kind == "plain":
            return self._read(t.stored, one)[0]
        if t.kind == "mxfp4":
            return dequantize_mxfp4(self._read(t.stored, one), self._read(t.scale, one))[0]
        if math.prod(t.scale_shape) == 1:
            scale = self._read(t.scale)
        elif len(t.shape) >= 3:  # one expert of a fused tensor: its own grid of scales
            scale = self._read(t.scale, one)
        else:  # one row of a matrix: the scales of its row of blocks
            row = index // t.block[0]
            scale = self._read(t.scale, slice(row, row + 1))
        return dequantize_fp8(self._read(t.stored, one), scale, t.block)[0]

    def _read(self, key: str, part: slice | None = None) -> torch.Tensor:
        # A fresh handle per read: see the class docstring.
        with safe_open(self.index[key], "pt") as f:
            return f.get_tensor(key) if part is None else f.get_slice(key)[part]

    def _fp8_tensors(self, stored: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, _Logical]:
        out = {}
        for key, (dtype, shape) in stored.items():
            if key.endswith(FP8_SCALE_SUFFIX) or key.endswith(FP8_ACTIVATION_SUFFIXES):
                continue
            scale = key + FP8_SCALE_SUFFIX
            if not dtype.startswith("F8_"):
                if scale in stored:  # e.g. FP4 packed in int8: read as plain it would be garbage
                    raise MoeOffloadError(f"the tensor {key} has scales but is stored as {dtype}, not FP8; "
                                          "moe-offload cannot read it")
                out[key] = _Logical("plain", key, shape)
                continue
            if scale not in stored:
                raise MoeOffloadError(f"the FP8 tensor {key} has no scales: {scale} is missing from the checkpoint")
            scale_shape = stored[scale][1]
            out[key] = _Logical("fp8", key, shape, scale, scale_shape, _fp8_block(key, shape, scale_shape, self._block))
        return out


def _read_headers(index: dict[str, Path]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key -> (safetensors dtype, shape), from the headers: nothing is loaded."""
    by_file: dict[Path, list[str]] = {}
    for key, path in index.items():
        by_file.setdefault(Path(path), []).append(key)
    stored = {}
    for path, keys in by_file.items():
        with safe_open(path, "pt") as f:
            for key in keys:
                s = f.get_slice(key)
                stored[key] = (s.get_dtype(), tuple(s.get_shape()))
    return stored


def _plain(stored) -> dict[str, _Logical]:
    return {key: _Logical("plain", key, shape) for key, (_, shape) in stored.items()}


def _mxfp4_tensors(stored) -> dict[str, _Logical]:
    out = {}
    for key, (_, shape) in stored.items():
        if key.endswith(MXFP4_SCALES):
            if key.removesuffix(MXFP4_SCALES) + MXFP4_BLOCKS not in stored:
                raise MoeOffloadError(f"the MXFP4 scales {key} have no blocks: "
                                      f"{key.removesuffix(MXFP4_SCALES) + MXFP4_BLOCKS} is missing from the checkpoint")
            continue
        if not key.endswith(MXFP4_BLOCKS):
            out[key] = _Logical("plain", key, shape)
            continue
        name = key.removesuffix(MXFP4_BLOCKS)
        scale = name + MXFP4_SCALES
        if scale not in stored:
            raise MoeOffloadError(f"the MXFP4 tensor {name} has no scales: {scale} is missing from the checkpoint")
        if len(shape) != 4 or stored[scale][1] != shape[:3]:
            raise MoeOffloadError(f"the MXFP4 tensor {name} has blocks {list(shape)} and scales "
                                  f"{list(stored[scale][1])}; expected [experts, out, in/32, 16] and [experts, out, in/32]")
        experts, rows, groups, group_bytes = shape
        out[name] = _Logical("mxfp4", key, (experts, groups * group_bytes * 2, rows), scale, stored[scale][1])
    return out


def _fp8_block(key: str, shape, scale_shape, configured) -> tuple[int, int]:
    """Rows and columns each scale covers: the whole tensor for one scale, else the configured block
    (the grid must be the shape ceil-divided by it: the last blocks may be partial), else, with no
    block configured, what divides the shape evenly (per channel). transformers' dequantizing loader
    always takes the even split, which misreads partial blocks (DeepSeek-V3's kv_a_proj_with_mqa,
    [576, 7168] in [5, 56] blocks, it refuses)."""
    if len(shape) < 2:
        raise MoeOffloadError(f"the FP8 tensor {key} has shape {list(shape)}; moe-offload reads FP8 matrices only")
    rows, cols = shape[-2:]
    if math.prod(scale_shape) == 1:
        return rows, cols
    if len(scale_shape) == len(shape) and tuple(scale_shape[:-2]) == tuple(shape[:-2]):
        grid = tuple(scale_shape[-2:])
        if configured:
            if grid == (math.ceil(rows / configured[0]), math.ceil(cols / configured[1])):
                return tuple(configured)
        elif rows % grid[0] == 0 and cols % grid[1] == 0:
            return rows // grid[0], cols // grid[1]
    fits = f"its weight_block_size {list(configured)}" if configured else "an even split of the shape"
    raise MoeOffloadError(f"the FP8 tensor {key} {list(shape)} has scales {list(scale_shape)}, "
                          f"which do not fit {fits}")


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """codes [..., rows, cols] fp8, scale [..., ceil(rows/bm), ceil(cols/bn)] (or one number) -> bf16.
    Multiplied in fp32 and rounded once, as DeepSeek's reference dequantizer does."""
    rows, cols = codes.shape[-2:]
    scale = (scale.float() - 127).exp2() if scale.dtype == torch.uint8 else scale.float()  # e8m0 bytes: 2^(b-127)
    if scale.numel() == 1:
        return (codes.float() * scale.reshape(())).to(torch.bfloat16)
    full = scale.repeat_interleave(block[0], -2)[..., :rows, :].repeat_interleave(block[1], -1)[..., :cols]
    return (codes.float() * full).to(torch.bfloat16)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """blocks [E, out, in/32, 16], scales [E, out, in/32] -> bf16 [E, in, out], with transformers' own decoder
    (the FP4 table, nibble order and transposition its gpt-oss loader uses)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)


def open_sources(src_dir: Path, index: dict[str, Path], config) -> SourceTensors:
    """The checkpoint in src_dir read through its config's quantization_config (dict or object)."""
    try:
        return SourceTensors(index, getattr(config, "quantization_config", None))
    except MoeOffloadError as e:
        raise MoeOffloadError(f"{src_dir}: {e}") from None

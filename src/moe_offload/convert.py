"""Hugging Face checkpoint -> store, streaming tensor by tensor (peak memory: the dense part and
one expert). Writes into a hidden temporary folder and renames it at the end, so an interrupted
conversion never leaves a folder that looks like a store."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
import uuid
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .archs import Arch, arch_for
from .config import QuantConfig
from .errors import MoeOffloadError
from .quant import QMatrix, int4pack_layout_id, quantize
from .store import DENSE_FILE, EXPERTS_FILE, FORMAT, FORMAT_VERSION, MANIFEST, BlobLayout, crc32_file

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def _load_config(src: Path):
    from transformers import AutoConfig

    if not src.is_dir():
        raise MoeOffloadError(f"no such checkpoint folder: {src}")
    if not (src / "config.json").is_file():
        raise MoeOffloadError(f"{src} has no config.json: give the folder of a Hugging Face checkpoint")
    try:
        return AutoConfig.from_pretrained(src, local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise MoeOffloadError(f"cannot read {src / 'config.json'}: {e}") from e


def _shard_index(src: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (sharded index, or every *.safetensors)."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: src / v for k, v in weight_map.items()}
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise MoeOffloadError(f"{src} holds no .safetensors weights (only safetensors checkpoints are supported)")
    out = {}
    for f in files:
        with safe_open(f, "pt") as sf:
            out.update({k: f for k in sf.keys()})
    return out


def _fingerprint(src: Path, shards) -> str:
    """Cheap identity of the source: its config and every shard's name, size and header."""
    h = hashlib.sha256((src / "config.json").read_bytes())
    for f in sorted(set(shards)):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            h.update(f.name.encode() + str(f.stat().st_size).encode() + fh.read(min(n, 1 << 24)))
    return h.hexdigest()


class _Shards:
    """Open safetensors files lazily and keep them open (they are memory-mapped, so this is cheap)."""

    def __init__(self, index: dict[str, Path]):
        self.index, self.open = index, {}

    def get(self, key: str) -> torch.Tensor:
        f = self.index[key]
        if f not in self.open:
            self.open[f] = safe_open(f, "pt")
        return self.open[f].get_tensor(key)


def _dense_linears(config, arch: Arch) -> set[str]:
    """In-memory names of the nn.Linear weights of the dense part (routers excluded)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = getattr(config, "tie_word_embeddings", False)
    out = set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if f".{arch.moe_block}.{arch.router}" in name or (tied and name == "lm_head"):
            continue
        out.add(name + ".weight")
    return out


def _expert_keys(index, arch: Arch, config) -> dict[int, dict[int, dict[str, str]]]:
    """layer -> expert -> {'gate'|'up'|'down': checkpoint key}, checked complete."""
    names = {arch.gate: "gate", arch.up: "up", arch.down: "down"}
    found: dict[int, dict[int, dict[str, str]]] = {}
    for key in index:
        m = arch.match_expert(key)
        if m:
            layer, expert, which = m
            found.setdefault(layer, {}).setdefault(expert, {})[names[which]] = key
    if not found:
        raise MoeOffloadError("the checkpoint holds no expert weights under the names this architecture uses")
    num_experts = arch.num_experts(config)
    for layer, experts in found.items():
        for e in range(num_experts):
            if len(experts.get(e, {})) != 3:
                raise MoeOffloadError(f"the checkpoint is missing weights of expert {e} in layer {layer}")
    return dict(sorted(found.items()))


def _quantize_expert(shards: _Shards, keys: dict[str, str], quant: QuantConfig) -> dict[str, QMatrix]:
    gate_up = torch.cat([shards.get(keys["gate"]), shards.get(keys["up"])])  # [2I, H], like transformers
    bits, group = quant.expert_bits, quant.group_for(quant.expert_bits)
    return {"gate_up": quantize(gate_up, bits, group), "down": quantize(shards.get(keys["down"]), bits, group)}


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, expert_bits: int = 4, dense_bits: int = 4,
            group_size: int | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Convert a Hugging Face MoE checkpoint folder into a store folder; returns the store's path."""
    quant = QuantConfig(expert_bits, dense_bits, group_size)
    src, dst = Path(src), Path(dst)
    config = _load_config(src)
    arch = arch_for(config)
    if dst.exists() and not overwrite:
        raise MoeOffloadError(f"{dst} already exists; choose another destination or pass overwrite (--force)")
    index = _shard_index(src)
    experts = _expert_keys(index, arch, config)
    dense_linears = _dense_linears(config, arch)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        started = time.perf_counter()
        shards = _Shards(index)
        dense_meta = _write_dense(shards, index, arch, dense_linears, quant, tmp / DENSE_FILE)
        layout, blobs, experts_size = _write_experts(shards, experts, quant, tmp / EXPERTS_FILE, progress)
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name != "model.safetensors.index.json":
                shutil.copy2(f, tmp / f.name)
        num_experts = arch.num_experts(config)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "created_by": f"moe-offload {__version__}",
            "architecture": arch.model_type,
            "source": {"path": str(src.resolve()), "fingerprint": _fingerprint(src, index.values())},
            "quant": {"expert_bits": quant.expert_bits, "dense_bits": quant.dense_bits,
                      "expert_group": quant.group_for(quant.expert_bits) if quant.expert_bits < 16 else None,
                      "dense_group": quant.group_for(quant.dense_bits) if quant.dense_bits < 16 else None},
            "int4pack_layout": int4pack_layout_id(),
            "num_moe_layers": len(experts), "moe_layers": list(experts), "num_experts": num_experts,
            "top_k": arch.top_k(config),
            "expert_layout": {"matrices": layout.matrices, "size": layout.size},
            "experts_file_size": experts_size,
            "blobs": {str(layer): blobs[layer] for layer in experts},
            "dense_file_size": (tmp / DENSE_FILE).stat().st_size,
            "dense_crc32": crc32_file(tmp / DENSE_FILE),
            "dense_linears": dense_meta,
            "convert_seconds": round(time.perf_counter() - started, 2),
        }
        # The manifest is written last: a folder without it is never taken for a store.
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync_dir(tmp)
        if dst.exists():
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _write_dense(shards, index, arch, dense_linears, quant: QuantConfig, path: Path) -> dict:
    tensors, meta = {}, {}
    for key in index:
        if arch.match_expert(key):
            continue
        name = arch.memory_name(key)
        t = shards.get(key)
        if name in dense_linears and quant.dense_bits < 16:
            m = quantize(t, quant.dense_bits, quant.group_for(quant.dense_bits))
            module = name.removesuffix(".weight")
            meta[module] = m.meta()
            tensors.update({f"{module}.{k}": v for k, v in m.tensors.items()})
        else:
            tensors[name] = t.contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return meta


def _write_experts(shards, experts, quant, path: Path, progress: bool):
    from tqdm.auto import tqdm

    total = sum(len(v) for v in experts.values())
    layout, blobs, offset = None, {}, 0
    with open(path, "wb") as f, tqdm(total=total, unit="expert", desc="converting experts",
                                     disable=not progress, dynamic_ncols=True) as bar:
        for layer, by_expert in experts.items():
            blobs[layer] = []
            for e in sorted(by_expert):
                matrices = _quantize_expert(shards, by_expert[e], quant)
                layout = layout or BlobLayout.for_matrices(matrices)
                data = layout.pack(matrices)
                f.write(data)
                blobs[layer].append({"offset": offset, "size": len(data), "crc32": zlib.crc32(data)})
                offset += len(data)
                bar.update(1)
        f.flush()
        os.fsync(f.fileno())
    return layout, blobs, offset


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())

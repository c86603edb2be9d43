"""Hugging Face checkpoint -> store, streaming tensor by tensor (peak memory: the dense part and a
few experts). Writes into a hidden temporary folder and renames it at the end, so an interrupted
conversion never leaves a folder that looks like a store.

Quantizing is the slow part (HQQ's optimizer). With `workers` > 1 (default: one per usable core,
as many as fit in half the free memory) that many threads of this process each quantize one expert
(or dense matrix) at a time, torch running on the remaining cores' share each; the main thread
writes the results in checkpoint order, so the files are byte for byte a serial run's."""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import sys
import time
import uuid
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .archs import MoeSpec, build_meta_model, describe
from .checkpoint import CheckpointMap
from .config import QuantConfig
from .errors import MoeOffloadError
from .quant import int4pack_layout_id, quantize
from .sources import open_sources
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


def _usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# Peak memory of quantizing one matrix, per parameter: HQQ's buffers (16 B) and then refit's
# temporaries (measured ~30 B on Mixtral's gate_up [28672, 4096] at 4 bits), rounded up.
QUANTIZE_BYTES_PER_PARAM = 32


def plan_workers(largest_params: int, requested: int | None = None) -> tuple[int, int]:
    """(workers, torch threads per worker). Default: one worker per usable core, as many as fit in
    half the available memory (each holds ~32 bytes per parameter of the matrix it quantizes)."""
    cores = _usable_cores()
    if requested is not None:
        if int(requested) < 1:
            raise MoeOffloadError(f"workers must be at least 1, got {requested}")
        workers = int(requested)
    else:
        import psutil

        fit = psutil.virtual_memory().available // 2 // max(1, QUANTIZE_BYTES_PER_PARAM * largest_params)
        workers = max(1, min(cores, fit))
    return workers, max(1, cores // workers)


def _ordered_map(fn, items, workers: int, threads: int = 1):
    """Yield fn(item) for every item, in order. With workers > 1, that many threads compute up to
    2 * workers items ahead of the consumer (bounded memory), each running torch on `threads`
    threads: HQQ's optimizer is a chain of elementwise passes, which two matrices at once share
    between two cores better than two threads splitting every pass (~15% faster here). On an
    exception the items not started are cancelled; the running ones finish in the background
    (at most one item per worker)."""
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    threads_before = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="moe-offload-convert",
                              initializer=torch.set_num_threads, initargs=(threads,))
    pending, items, ok = deque(), iter(items), False
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                break
        while pending:
            result = pending.popleft().result()
            for item in items:
                pending.append(pool.submit(fn, item))
                break
            yield result
        ok = True
    finally:
        pool.shutdown(wait=ok, cancel_futures=True)
        torch.set_num_threads(threads_before)  # what new threads inherit; this thread's own is unchanged


def _largest_quantized(model, spec: MoeSpec, dense_linears, quant: QuantConfig) -> int:
    """Parameters of the largest matrix convert quantizes (from the meta model: nothing loaded)."""
    largest = 0
    if quant.expert_bits < 16:
        experts = model.get_submodule(spec.layers[0].experts)
        largest = max(math.prod(experts.get_parameter(p).shape[1:]) for p in spec.expert_params
                      if not p.endswith("_bias"))
    if quant.dense_bits < 16:
        largest = max([largest] + [math.prod(model.get_parameter(n).shape) for n in dense_linears])
    return largest


def _dense_linears(model, spec: MoeSpec) -> set[str]:
    """In-memory names of the nn.Linear weights of the dense part that get quantized: not the routers,
    not gates with a handful of outputs (a shared expert's sigmoid gate), not a tied lm_head."""
    routers = {layer.router for layer in spec.layers}
    tied = getattr(model.config, "tie_word_embeddings", False)
    out = set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name in routers or module.out_features < 16:
            continue
        if tied and name == "lm_head":
            continue
        out.add(name + ".weight")
    return out


def _quantize_expert(cmap: CheckpointMap, sources, spec: MoeSpec, job: tuple[int, int],
                     quant: QuantConfig) -> dict:
    """One expert as the blob holds it: "gate_up" [2I, H] (or "up" alone when the family has no gate)
    in the row order of transformers' fused tensor, so the family's own gating applies to its output;
    "down" [H, I]; biases as float32 vectors."""
    layer, expert = job
    first = "gate_up_proj" if spec.has_gate else "up_proj"
    bits, group = quant.expert_bits, quant.expert_group()
    out = {}
    for name, param in (("gate_up", first), ("down", "down_proj")):
        w = cmap.expert_tensor(sources, layer, param, expert)
        w = w.t() if spec.is_transposed else w  # stored [in, out]: the kernels read [out, in]
        out[name] = quantize(w.contiguous(), bits, group, fmt="rowtile" if quant.expert_format == "rowtile" else None,
                             rowtile=quant.expert_format != "int4pack")
        if spec.has_bias:
            out[f"{name}_bias"] = cmap.expert_tensor(sources, layer, f"{param}_bias", expert).float().contiguous()
    return out


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, expert_bits: int = 4, dense_bits: int = 4,
            group_size: int | None = None, overwrite: bool = False, progress: bool = True,
            workers: int | None = None, expert_format: str = "auto") -> Path:
    """Convert a Hugging Face MoE checkpoint folder into a store folder; returns the store's path.

    workers: matrices quantized at once, one thread each (default: one per usable core, as many as
    fit in half the available memory); the store is byte for byte the same whatever the number."""
    quant = QuantConfig(expert_bits, dense_bits, group_size, expert_format)
    if workers is not None and int(workers) < 1:
        raise MoeOffloadError(f"workers must be at least 1, got {workers}")
    src, dst = Path(src), Path(dst)
    config = _load_config(src)
    model = build_meta_model(config)
    spec = describe(model)
    if dst.exists() and not overwrite:
        raise MoeOffloadError(f"{dst} already exists; choose another destination or pass overwrite (--force)")
    index = _shard_index(src)
    sources = open_sources(src, index, config)
    cmap = CheckpointMap(model, spec, sources.keys())
    dense_linears = _dense_linears(model, spec)
    if progress:
        print(f"{src}: {spec.summary()}; {sources.source_format} weights -> {quant.expert_bits}-bit experts, "
              f"{quant.dense_bits}-bit dense", file=sys.stderr)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        started = time.perf_counter()
        plan = plan_workers(_largest_quantized(model, spec, dense_linears, quant), workers)
        del model
        # Only HQQ (2-4 bits) gains from workers; 8-bit and copies are faster on torch's own threads.
        dense_plan = plan if quant.dense_bits <= 4 else (1, 1)
        expert_plan = plan if quant.expert_bits <= 4 else (1, 1)
        dense_meta = _write_dense(sources, cmap, dense_linears, quant, tmp / DENSE_FILE, progress, dense_plan)
        experts_started = time.perf_counter()
        layout, blobs, experts_size = _write_experts(cmap, sources, spec, quant, tmp / EXPERTS_FILE, progress,
                                                     expert_plan)
        experts_seconds = time.perf_counter() - experts_started
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name != "model.safetensors.index.json":
                shutil.copy2(f, tmp / f.name)
        _drop_source_quantization(tmp / "config.json")
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "created_by": f"moe-offload {__version__}",
            "architecture": spec.model_type,
            "source": {"path": str(src.resolve()), "fingerprint": _fingerprint(src, index.values()),
                       "format": sources.source_format, "skipped_tensors": len(cmap.skipped)},
            "quant": {"expert_bits": quant.expert_bits, "dense_bits": quant.dense_bits,
                      "expert_format": quant.expert_format,
                      "expert_group": quant.expert_group() if quant.expert_bits < 16 else None,
                      "dense_group": quant.group_for(quant.dense_bits) if quant.dense_bits < 16 else None},
            "int4pack_layout": int4pack_layout_id(),
            "num_moe_layers": len(spec.layers), "moe_layers": spec.moe_layers, "num_experts": spec.num_experts,
            "top_k": spec.top_k,
            "experts": {"params": list(spec.expert_params), "is_transposed": spec.is_transposed,
                        "has_bias": spec.has_bias, "has_gate": spec.has_gate,
                        "has_post_expert_norm": spec.has_post_expert_norm, "shared": list(spec.shared)},
            "expert_layout": {"matrices": layout.matrices, "size": layout.size},
            "experts_file_size": experts_size,
            "blobs": {str(layer): blobs[layer] for layer in spec.moe_layers},
            "dense_file_size": (tmp / DENSE_FILE).stat().st_size,
            "dense_crc32": crc32_file(tmp / DENSE_FILE),
            "dense_linears": dense_meta,
            "convert_seconds": round(time.perf_counter() - started, 2),
            "convert_seconds_per_expert": round(experts_seconds / max(1, len(spec.layers) * spec.num_experts), 3),
            "convert_workers": expert_plan[0],
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


def _write_dense(sources, cmap: CheckpointMap, dense_linears, quant: QuantConfig, path: Path,
                 progress: bool = False, plan: tuple[int, int] = (1, 1)) -> dict:
    """Every non-expert tensor under its in-memory name; linear layers quantized."""
    from tqdm.auto import tqdm

    names = cmap.dense_names()
    quantized = [n for n in names if n in dense_linears and quant.dense_bits < 16]

    def one(name):
        t = cmap.dense_tensor(sources, name)
        if name in dense_linears and quant.dense_bits < 16:
            return name, quantize(t, quant.dense_bits, quant.group_for(quant.dense_bits),
                                  rowtile=quant.expert_format != "int4pack")
        return name, t.contiguous()

    tensors, meta = {}, {}
    with tqdm(total=len(quantized), unit="matrix", desc="quantizing dense weights", dynamic_ncols=True,
              disable=not progress or not quantized, leave=False) as bar, closing(_ordered_map(one, names, *plan)) as results:
        for name, m in results:
            if isinstance(m, torch.Tensor):
                tensors[name] = m
                continue
            module = name.removesuffix(".weight")
            meta[module] = m.meta()
            tensors.update({f"{module}.{k}": v for k, v in m.tensors.items()})
            bar.update(1)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return meta


def _write_experts(cmap: CheckpointMap, sources, spec: MoeSpec, quant, path: Path, progress: bool,
                   plan: tuple[int, int] = (1, 1)):
    from tqdm.auto import tqdm

    jobs = [(layer, e) for layer in spec.moe_layers for e in range(spec.num_experts)]
    total = len(jobs)
    layout, blobs, offset, done = None, {}, 0, 0
    # Rate and ETA from the mean over the whole run (smoothing=0): parallel workers finish experts in
    # bursts, which a moving average turns into a jumpy ETA. Shown as seconds per expert, always.
    started = time.perf_counter()
    with open(path, "wb") as f, tqdm(total=total, unit="expert", desc="converting experts", smoothing=0,
                                     bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
                                     disable=not progress, dynamic_ncols=True) as bar, \
            closing(_ordered_map(lambda job: _quantize_expert(cmap, sources, spec, job, quant), jobs,
                                 *plan)) as results:
        for layer, _ in jobs:
            matrices = next(results)
            layout = layout or BlobLayout.for_matrices(matrices)
            data = layout.pack(matrices)
            f.write(data)
            blobs.setdefault(layer, []).append({"offset": offset, "size": len(data), "crc32": zlib.crc32(data)})
            offset += len(data)
            done += 1
            bar.set_postfix_str(f"{(time.perf_counter() - started) / done:.2f} s/expert", refresh=False)
            bar.update(1)
        f.flush()
        os.fsync(f.fileno())
    return layout, blobs, offset


def _drop_source_quantization(config_json: Path) -> None:
    """The store's weights are ours (see the manifest), not the FP8/MXFP4 the source shipped."""
    config = json.loads(config_json.read_text())
    if config.pop("quantization_config", None) is not None:
        config_json.write_text(json.dumps(config, indent=2))


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())

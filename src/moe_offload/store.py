"""The store on disk: manifest, the expert blob table, integrity checks, and views into blobs.

STORE/manifest.json      format version, source fingerprint, architecture, quant settings,
                         expert blob layout and table (layer, expert) -> offset, size, crc32
STORE/dense.safetensors  non-expert weights (quantized linears as their format's tensors)
STORE/experts.bin        one 4 KiB-aligned blob per expert, in the layout the kernels read
STORE/config.json, tokenizer files ...   copied from the source checkpoint
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MoeOffloadError, StoreCorruptError
from .quant import QMatrix

FORMAT = "moe-offload-store"
FORMAT_VERSION = 3  # 3: any MoE family (expert biases, the family's expert math in the manifest)
MANIFEST = "manifest.json"
DENSE_FILE = "dense.safetensors"
EXPERTS_FILE = "experts.bin"
ALIGN = 4096  # blobs start and end on page boundaries: O_DIRECT reads, one read per expert
TENSOR_ALIGN = 64

DTYPES = {"uint8": torch.uint8, "int8": torch.int8, "int32": torch.int32, "float16": torch.float16,
          "bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def crc32_file(path: Path, start: int = 0, size: int | None = None, chunk: int = 1 << 24) -> int:
    crc = 0
    with open(path, "rb") as f:
        f.seek(start)
        left = size if size is not None else os.path.getsize(path) - start
        while left > 0:
            data = f.read(min(chunk, left))
            if not data:
                break
            crc = zlib.crc32(data, crc)
            left -= len(data)
    return crc


@dataclass(frozen=True)
class BlobLayout:
    """Where each tensor of an expert sits inside its blob (the same for every expert)."""

    matrices: dict  # name -> {"fmt", "n", "k", "bits", "group", "tensors": [{name, dtype, shape, offset}]}
    size: int  # bytes, a multiple of ALIGN

    @classmethod
    def for_matrices(cls, matrices: dict[str, QMatrix | torch.Tensor]) -> "BlobLayout":
        """Matrices are QMatrix; plain tensors (expert biases) are stored as they are (fmt "tensor")."""
        offset, out = 0, {}
        for name, m in matrices.items():
            specs = []
            m = _as_qmatrix(m)
            for tname, t in m.tensors.items():
                offset = align_up(offset, TENSOR_ALIGN)
                specs.append({"name": tname, "dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "offset": offset})
                offset += t.numel() * t.element_size()
            out[name] = {**m.meta(), "tensors": specs}
        return cls(out, align_up(max(offset, 1), ALIGN))

    def pack(self, matrices: dict[str, QMatrix]) -> bytes:
        """Serialize one expert's matrices into its blob bytes."""
        buf = bytearray(self.size)
        for name, spec in self.matrices.items():
            for t in spec["tensors"]:
                data = _as_qmatrix(matrices[name]).tensors[t["name"]].contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
                buf[t["offset"]:t["offset"] + len(data)] = data
        return bytes(buf)

    def views(self, blob: torch.Tensor) -> dict[str, QMatrix]:
        """Zero-copy QMatrix views over a uint8 tensor holding one blob (a cache slot)."""
        out = {}
        for name, spec in self.matrices.items():
            tensors = {}
            for t in spec["tensors"]:
                dtype = DTYPES[t["dtype"]]
                count = 1
                for d in t["shape"]:
                    count *= d
                nbytes = count * dtype.itemsize
                tensors[t["name"]] = blob[t["offset"]:t["offset"] + nbytes].view(dtype).view(t["shape"])
            if spec["fmt"] == "tensor":
                out[name] = tensors["data"]
            else:
                out[name] = QMatrix(spec["fmt"], spec["n"], spec["k"], spec["bits"], spec["group"], tensors)
        return out


def _as_qmatrix(m: QMatrix | torch.Tensor) -> QMatrix:
    if isinstance(m, QMatrix):
        return m
    return QMatrix("tensor", m.shape[0], 0, 32, 0, {"data": m})


@dataclass
class Store:
    path: Path
    manifest: dict

    @property
    def layout(self) -> BlobLayout:
        return BlobLayout(self.manifest["expert_layout"]["matrices"], self.manifest["expert_layout"]["size"])

    @property
    def blob_size(self) -> int:
        return self.manifest["expert_layout"]["size"]

    @property
    def num_layers(self) -> int:
        return self.manifest["num_moe_layers"]

    @property
    def moe_layers(self) -> list[int]:
        return self.manifest["moe_layers"]

    @property
    def num_experts(self) -> int:
        return self.manifest["num_experts"]

    @property
    def top_k(self) -> int:
        return self.manifest["top_k"]

    @property
    def architecture(self) -> str:
        return self.manifest["architecture"]

    def blob(self, layer: int, expert: int) -> dict:
        """{'offset', 'size', 'crc32'} of one expert's blob."""
        return self.manifest["blobs"][str(layer)][expert]

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Store":
        """Open a store and check what can be checked cheaply: manifest, version, file sizes."""
        path = Path(path)
        if not path.exists():
            raise MoeOffloadError(f"no such store: {path} (create one with `moe-offload convert SRC {path}`)")
        mf = path / MANIFEST
        if not mf.is_file():
            raise MoeOffloadError(f"{path} is not a moe-offload store (no {MANIFEST}); "
                                  f"create one with `moe-offload convert SRC DST`")
        try:
            manifest = json.loads(mf.read_text())
        except (ValueError, OSError) as e:
            raise StoreCorruptError(f"{mf} is not readable JSON ({e}); convert the checkpoint again") from e
        if manifest.get("format") != FORMAT:
            raise MoeOffloadError(f"{path} is not a moe-offload store")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise MoeOffloadError(f"{path} has store format version {manifest.get('format_version')}, this version "
                                  f"of moe-offload reads version {FORMAT_VERSION}: convert the checkpoint again")
        store = cls(path, manifest)
        for name, expected in ((EXPERTS_FILE, manifest["experts_file_size"]), (DENSE_FILE, manifest["dense_file_size"])):
            f = path / name
            actual = f.stat().st_size if f.exists() else None
            if actual != expected:
                raise StoreCorruptError(f"{f} is {'missing' if actual is None else f'{actual} bytes'}, the manifest "
                                        f"says {expected} bytes: the store is truncated or damaged; convert again")
        return store

    def check_blob(self, layer: int, expert: int, data) -> None:
        if zlib.crc32(data) != self.blob(layer, expert)["crc32"]:
            raise StoreCorruptError(f"expert {expert} of layer {layer} in {self.path / EXPERTS_FILE} fails its "
                                    f"checksum: the store is damaged; run `moe-offload verify` and convert again")

    def verify(self, progress=None) -> None:
        """Check every checksum; raise StoreCorruptError naming the first damaged part."""
        if crc32_file(self.path / DENSE_FILE) != self.manifest["dense_crc32"]:
            raise StoreCorruptError(f"{self.path / DENSE_FILE} fails its checksum: convert again")
        with open(self.path / EXPERTS_FILE, "rb") as f:
            for layer in self.moe_layers:
                for expert in range(self.num_experts):
                    b = self.blob(layer, expert)
                    f.seek(b["offset"])
                    self.check_blob(layer, expert, f.read(b["size"]))
                    if progress:
                        progress(1)

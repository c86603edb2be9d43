"""Memory: how much this process may still use, where its memory goes, and how big `--expert-cache
auto` makes the expert cache.

The available memory is the tighter of the memory cgroup's room (its limit minus what the group
uses, not counting page cache the kernel can drop) and the system's MemAvailable. "auto" gives the
cache what is left of it once the rest of the process is accounted for: the dense part when it is
not loaded yet, a reserve for the runtime (activations, KV cache, the prefill kernels built on first
use, allocator slack) and a safety margin; at most every expert, at least the router's top-k per pool.
"""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .config import format_size
from .errors import MoeOffloadError
from .stats import status_bytes

MiB = 2**20
# What the process adds beyond the dense part and the cache while it runs. Measured on the quarter
# store (32k vocabulary, 32 layers): ~23 MiB over a short generate; a first prompt of 32 tokens or
# more loads numba's int4 unpacker (54 MiB) and builds oneDNN's bf16 matmuls (~12 MiB), and its
# unpacked weights and activations come on top: 196 MiB at the peak of a 238-token prompt, which
# this reserve and the margin together cover. The fp32 KV cache takes 64 KiB a token there.
RUNTIME_RESERVE = 160 * MiB
# numba and LLVM, which the first "rowtile" or "grouped" product loads (measured: importing numba
# 65 MiB, loading the first cached kernel 50 MiB); counted apart while they are not loaded yet.
NUMBA_RESERVE = 120 * MiB
NUMBA_FORMATS = {"rowtile", "grouped"}
SAFETY_FRACTION = 0.05  # of the available memory, kept free on top of the reserve
# On a GPU each product dequantizes its matrix first (kernels_device.py): the temporaries of the
# largest matrix. Measured on the CPU, where the same ops run: 23 bytes per weight for rowtile,
# 53 for int4pack (with its cached gather index).
DEVICE_DEQUANTIZE_BYTES_PER_WEIGHT = 56
MADV_PAGEOUT = 21  # <linux/mman.h>
NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


def numba_still_to_load(formats: set[str]) -> int:
    """Bytes numba will add to this process: NUMBA_RESERVE if a stored format needs it and it is not
    imported yet, else 0."""
    return NUMBA_RESERVE if formats & NUMBA_FORMATS and "numba" not in sys.modules else 0


@dataclass(frozen=True)
class Available:
    """Bytes this process may still add, and where that number comes from."""

    bytes: int
    source: str


def available_device_memory(device: str) -> Available:
    """Free memory on a CUDA device now (torch.cuda.mem_get_info): what `auto` sizes VRAM slots from."""
    import torch

    free, total = torch.cuda.mem_get_info(torch.device(device))
    return Available(free, f"free of {format_size(total)} on {device} (torch.cuda.mem_get_info)")


@functools.lru_cache(maxsize=1)
def _libc():
    """libc through ctypes with the signatures used here (madvise, mincore); None where it has none."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    return libc


def page_out_mappings(path_part: str) -> int:
    """Give back the resident pages of this process's file mappings whose path contains `path_part`
    (madvise MADV_PAGEOUT, Linux 5.4+); returns the bytes of the ranges advised, 0 where that is not
    possible. For libraries used only while loading: numba's LLVM (libllvmlite, ~70 MiB touched to
    load the cached kernels, not touched again while they run). A page needed again is read back."""
    libc = _libc()
    try:
        maps = Path("/proc/self/maps").read_text().splitlines() if libc is not None else []
    except OSError:
        return 0
    advised = 0
    for line in maps:
        fields = line.split()
        if len(fields) >= 6 and path_part in fields[5]:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if libc.madvise(lo, hi - lo, MADV_PAGEOUT) == 0:
                advised += hi - lo
    return advised


def resident_bytes(t) -> int | None:
    """Bytes of a host tensor's pages that are in RAM now (mincore): of the cache buffer, the slots a
    read has touched. The tensor must start on a page boundary (aligned_buffer's do). None where
    the system cannot tell."""
    import ctypes
    import mmap

    pages = -(-t.numel() * t.element_size() // mmap.PAGESIZE)
    if not pages:
        return 0
    vec = (ctypes.c_ubyte * pages)()
    libc = _libc()
    if libc is None or libc.mincore(t.data_ptr(), pages * mmap.PAGESIZE, vec) != 0:
        return None
    return bytes(vec).count(1) * mmap.PAGESIZE  # 1: resident (the other bits are reserved, 0)


def rss_bytes() -> int:
    """The current resident set size of this process (VmRSS)."""
    return status_bytes("VmRSS")


def room_in(limit: int, usage: int, reclaimable: int = 0) -> int:
    """What a cgroup still lets its members add: the limit minus what the group uses, page cache
    the kernel can drop (inactive files) not counted as used."""
    return max(0, limit - max(0, usage - reclaimable))


def available_memory(proc: str | os.PathLike = "/proc", cgroup_root: str | os.PathLike = "/sys/fs/cgroup") -> Available:
    """The memory this process may still use: the tighter of its memory cgroup's room (v1 or v2,
    ancestors included) and MemAvailable. The roots are parameters for tests."""
    mem_available = _meminfo(Path(proc) / "meminfo")
    cg = _cgroup_room(Path(proc) / "self" / "cgroup", Path(cgroup_root))
    if cg is not None and (mem_available is None or cg[0] < mem_available):
        return Available(cg[0], cg[1])
    if mem_available is None:
        raise MoeOffloadError("cannot tell how much memory is available (no /proc/meminfo, no memory cgroup "
                              "limit): give the cache a size, e.g. --expert-cache 4GiB")
    return Available(mem_available, "MemAvailable in /proc/meminfo")


def _meminfo(path: Path) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _stat(path: Path) -> dict[str, int]:
    out = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                out[key] = int(value)
    except OSError:
        pass
    return out


def _cgroup_room(self_cgroup: Path, root: Path) -> tuple[int, str] | None:
    """(bytes, description) of the tightest memory cgroup limit over this process, or None."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    v1 = v2 = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if "memory" in parts[1].split(","):
            v1 = parts[2]
        elif parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
    if v1 is not None:
        return _v1_room(root / "memory", v1)
    if v2 is not None and (root / "cgroup.controllers").exists():
        return _v2_room(root, v2)
    return None


def _own_dir(mount: Path, path: str) -> Path:
    """The cgroup's folder; inside a cgroup namespace the mount's root is the process's own group."""
    d = mount / path.lstrip("/")
    return d if d.is_dir() else mount


def _v1_room(mount: Path, path: str) -> tuple[int, str] | None:
    d = _own_dir(mount, path)
    stat = _stat(d / "memory.stat")
    # hierarchical_memory_limit: the tightest limit of this group and its ancestors
    limit = stat.get("hierarchical_memory_limit") or _read_int(d / "memory.limit_in_bytes")
    usage = _read_int(d / "memory.usage_in_bytes")
    if limit is None or limit >= NO_LIMIT or usage is None:
        return None
    room = room_in(limit, usage, stat.get("total_inactive_file", stat.get("inactive_file", 0)))
    return room, f"memory cgroup (v1) limit {format_size(limit)}, {format_size(usage)} in use"


def _v2_room(root: Path, path: str) -> tuple[int, str] | None:
    best = None
    d = _own_dir(root, path)
    while True:
        limit = _read_int(d / "memory.max")
        usage = _read_int(d / "memory.current")
        if limit is not None and usage is not None:
            room = room_in(limit, usage, _stat(d / "memory.stat").get("inactive_file", 0))
            if best is None or room < best[0]:
                best = (room, f"memory cgroup (v2) limit {format_size(limit)}, {format_size(usage)} in use")
        if d == root or root not in d.parents:
            return best
        d = d.parent


def auto_cache_slots(available: int, still_needed: int, blob_size: int, *, experts: int, top_k: int,
                     pools: int, layers: int, source: str = "") -> tuple[int, str]:
    """Slots per pool for `--expert-cache auto`, and a sentence saying what was chosen.

    `available`: bytes the process may still add; `still_needed`: what the rest of the process will
    add besides the cache (the dense part if not loaded yet, plus the runtime reserve); a safety
    margin of SAFETY_FRACTION of `available` stays free. Capped at every expert (`experts` per layer;
    pools is the number of MoE layers for per-layer pools, 1 for a global pool)."""
    margin = int(available * SAFETY_FRACTION)
    budget = available - still_needed - margin
    per_pool = max(0, budget) // blob_size // pools
    cap = experts if pools > 1 else experts * layers
    if per_pool < top_k:
        need = top_k * pools * blob_size + still_needed + margin
        raise MoeOffloadError(
            f"--expert-cache auto: {format_size(available)} of memory is available ({source or 'measured'}); the "
            f"smallest cache ({top_k} experts {'per layer' if pools > 1 else 'in all'}, "
            f"{format_size(top_k * pools * blob_size)}) with the rest of the process ({format_size(still_needed)}) "
            f"and a {format_size(margin)} margin needs {format_size(need)}. Free some memory, raise the memory "
            f"limit, or force a size with --experts-per-layer {top_k}")
    chosen = min(per_pool, cap)
    total = chosen * pools
    what = "every expert" if chosen == cap else f"{chosen} of {experts} experts per layer" if pools > 1 else \
        f"{total} of {experts * layers} experts"
    return chosen, (f"expert cache auto: {total} slots, {format_size(total * blob_size)} ({what}); "
                    f"{format_size(available)} available ({source or 'measured'}), "
                    f"{format_size(still_needed)} kept for the rest of the process, {format_size(margin)} margin")


def module_bytes(model) -> tuple[int, int]:
    """(bytes held in memory, bytes mapped from the store) by the model's parameters and buffers,
    each storage counted once: the dense part (expert tensors live in the cache, not here)."""
    from .model import StoredEmbedding

    mapped_ids = {id(m.weight) for m in model.modules() if isinstance(m, StoredEmbedding) and m.mapped}
    seen, held, mapped = set(), 0, 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.is_meta:
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        if id(t) in mapped_ids:
            mapped += t.untyped_storage().nbytes()
        else:
            held += t.untyped_storage().nbytes()
    return held, mapped

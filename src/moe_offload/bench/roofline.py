"""Bytes a decode token reads, the measured RAM and disk bandwidth, and the tokens/s they allow."""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

from .system import drop_page_cache


def bytes_per_token_offloaded(model) -> dict:
    """Weights one decode token reads from RAM: every dense tensor except the embedding table (one
    row of it), plus top-k experts in every MoE layer."""
    rt = model.offload_runtime
    embed = model.get_input_embeddings().weight
    dense = sum(t.nbytes for t in [*model.parameters(), *model.buffers()] if t is not embed)
    spec_bytes = 0
    for matrix in rt.store.layout.matrices.values():
        for t in matrix["tensors"]:
            spec_bytes += math.prod(t["shape"]) * _itemsize(t["dtype"])
    active = rt.store.top_k * rt.store.num_layers * spec_bytes
    return dict(dense_bytes_per_token=dense, active_expert_bytes_per_token=active, ram_bytes_per_token=dense + active)


def _itemsize(dtype_name: str) -> int:
    from ..store import DTYPES

    return DTYPES[dtype_name].itemsize


def bytes_per_token_hf(model) -> dict:
    """The same count for a stock transformers model (offloaded parameters sit on the meta device,
    whose sizes still count: a token needs them)."""
    cfg = model.config
    embed = model.get_input_embeddings().weight
    experts = dense = 0
    for name, p in model.named_parameters():
        if p is embed:
            continue
        if ".experts." in name:
            experts += p.nbytes
        else:
            dense += p.nbytes
    num_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    active = experts * cfg.num_experts_per_tok // num_experts
    return dict(dense_bytes_per_token=dense, active_expert_bytes_per_token=active, ram_bytes_per_token=dense + active)


def ram_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of a torch sum over a 1 GiB tensor on 2 threads (best of a few: the machine is shared)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        x = torch.ones(nbytes // 4, dtype=torch.float32)
        x.sum()  # first touch
        best = math.inf
        for _ in range(repeats):
            t = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t)
        del x
    finally:
        torch.set_num_threads(threads)
    return round(nbytes / best)


def disk_bandwidth(path: Path, limit: int = 1 << 30, chunk: int = 16 << 20) -> float:
    """Bytes/s of a cold sequential read of (up to 1 GiB of) the experts file."""
    drop_page_cache(path)
    buf = bytearray(chunk)
    done = 0
    with open(path, "rb", buffering=0) as f:
        t = time.perf_counter()
        while done < limit:
            n = f.readinto(buf)
            if not n:
                break
            done += n
        seconds = time.perf_counter() - t
    drop_page_cache(path)
    return round(done / seconds) if seconds > 0 else 0


def blob_bandwidth(store, limit: int = 1 << 30, seconds: float = 2.0) -> float:
    """Bytes/s of cold reads of whole expert blobs the way decoding misses them and the loader reads
    them (its threads, O_DIRECT where allowed): what a mode that misses the cache can hope for.
    The order is a decode's: layer after layer through the file, top-k random experts of each
    (random order over the whole file measured about the same here, within the disk's drift).
    Reads stop at `limit` bytes or soon after `seconds` (small blobs: 1 GiB is 65,536 reads of
    16 KiB, ~10 s of thread hand-offs on a tiny store)."""
    import threading

    from ..loader import DiskLoader, aligned_buffer
    from ..stats import OffloadStats
    from ..store import EXPERTS_FILE

    keys = decode_order(store, max(1, limit // store.blob_size))
    drop_page_cache(store.path / EXPERTS_FILE)
    loader = DiskLoader(store, OffloadStats(store.num_layers))
    local = threading.local()

    def read(key) -> int:
        if not hasattr(local, "buf"):
            local.buf = memoryview(aligned_buffer(store.blob_size).numpy())
        blob = store.blob(*key)
        n = os.preadv(loader.fd, [local.buf[:blob["size"]]], blob["offset"])
        if not loader.direct:
            os.posix_fadvise(loader.fd, blob["offset"], blob["size"], os.POSIX_FADV_DONTNEED)
        return n

    done, batch = 0, 256
    try:
        t = time.perf_counter()
        for i in range(0, len(keys), batch):
            done += sum(loader.pool.map(read, keys[i:i + batch]))
            if time.perf_counter() - t > seconds:
                break
        took = time.perf_counter() - t
    finally:
        loader.close()
        drop_page_cache(store.path / EXPERTS_FILE)
    return round(done / took) if took > 0 else 0


def blob_read_rate(store, groups: dict[int, int] | None = None, limit: int = 1 << 30, seconds: float = 1.0,
                   seed: int = 0, slots_per_layer: int | None = None) -> float:
    """Blob bytes/s of expert reads made the way the cache makes a decode's misses (blob_read_sample)."""
    return blob_read_sample(store, groups, limit, seconds, seed, slots_per_layer)[0]


def blob_read_sample(store, groups: dict[int, int] | None = None, limit: int = 1 << 30, seconds: float = 1.0,
                     seed: int = 0, slots_per_layer: int | None = None) -> tuple[float, float]:
    """(bytes/s, waited share). Bytes/s: of expert reads made the way the cache makes a decode's
    misses, through the cache's own stream and the loader's threads, a layer's misses submitted
    together and consumed before the next layer's, layer after layer, random experts, each pool
    emptied after its layer (as in the no-cache mode). `groups`: misses in one layer's step -> how
    often (the simulator's decode_miss_groups; default: top-k, every expert missed), drawn in those
    proportions. The
    per-read cost this includes (the cache's bookkeeping, the hand-off to a loader thread and back,
    a lone miss getting one thread of two) is what bandwidth alone misses on small blobs: 124 KiB
    blobs cost 0.29 ms each live against 0.11 ms at blob_bandwidth's rate (README, "Planning").
    Reads stop at `limit` bytes or after `seconds`, whichever comes first; a small file is read
    again (O_DIRECT reads do not stay in the page cache). With `slots_per_layer`, the reads land in
    a cache of the mode's own shape, a pool of that many slots per MoE layer, as its reads do:
    where they land matters (quarter: 2.8 GB/s into 2 slots used again and again, 1.7-2.2 GB/s
    spread over the 64 slots, 396 MB, of its no-cache mode, which decoded at ~1.8).
    The waited share is the part of that time spent waiting for the loader (the cache's stall); the
    rest is the cache's own work around a read, which a decode counts as compute."""
    import random

    from ..cache import ExpertCache
    from ..loader import DiskLoader
    from ..stats import OffloadStats
    from ..store import EXPERTS_FILE

    groups = {int(m): int(n) for m, n in (groups or {store.top_k: 1}).items() if n > 0 and m > 0}
    if not groups:
        return 0, 0.0
    rng = random.Random(seed)
    sizes = [m for m, n in groups.items() for _ in range(n)]
    widest = min(max(sizes), store.num_experts)
    stats = OffloadStats(store.num_layers)
    drop_page_cache(store.path / EXPERTS_FILE)
    loader = DiskLoader(store, stats, verify=False)
    if slots_per_layer:
        cache = ExpertCache(list(store.moe_layers), max(slots_per_layer, widest), store.blob_size, loader, stats,
                            scope="layer")
    else:  # widest slots in all
        cache = ExpertCache(list(store.moe_layers), widest, store.blob_size, loader, stats, scope="global")
    cache.buffer.fill_(0)  # its pages faulted in before the clock starts, as a mode's are once warmed up
    reads = 0
    try:
        started = time.perf_counter()
        while True:
            for layer in store.moe_layers:
                m = min(rng.choice(sizes), widest)
                for _ in cache.stream(layer, rng.sample(range(store.num_experts), m)):
                    pass
                cache.forget(layer)
                reads += m
                elapsed = time.perf_counter() - started
                if reads * store.blob_size >= limit or elapsed >= seconds:
                    if elapsed <= 0:
                        return 0, 0.0
                    return round(reads * store.blob_size / elapsed), min(1.0, stats.stall_seconds / elapsed)
    finally:
        loader.close()
        drop_page_cache(store.path / EXPERTS_FILE)


def decode_order(store, count: int, seed: int = 0) -> list[tuple[int, int]]:
    """`count` (layer, expert) keys as decode tokens ask for them: each token sweeps the MoE layers in
    order, top-k distinct random experts in each (a cache that misses everything)."""
    import random

    rng, keys = random.Random(seed), []
    while len(keys) < count:
        for layer in store.moe_layers:
            keys += [(layer, e) for e in sorted(rng.sample(range(store.num_experts), store.top_k))]
    return keys[:count]


def roofline_for(r: dict, roofline: dict) -> dict:
    """Tokens/s if a decode token cost nothing but its reads: its weights from RAM at the measured
    RAM bandwidth, plus what this mode actually read from disk per token at the disk bandwidth.
    Also the disk throughput the mode reached while decoding: the disk of a shared machine varies,
    and a mode that read faster than the bandwidth measured up front exceeds 100% of its roofline."""
    decode = r["phases"].get("decode", {})
    achieved = decode.get("disk_bytes", 0) / decode["seconds"] if decode.get("seconds") else 0.0
    seconds = r["ram_bytes_per_token"] / roofline["ram_bytes_per_s"]
    if r["decode_disk_bytes_per_token"] and roofline["disk_bytes_per_s"]:
        seconds += r["decode_disk_bytes_per_token"] / roofline["disk_bytes_per_s"]
    ceiling = 1 / seconds if seconds > 0 else 0.0
    ratio = r["decode_tokens_per_s"] / ceiling if ceiling else 0.0
    return {"roofline_tokens_per_s": round(ceiling, 3), "roofline_ratio": round(ratio, 4),
            "decode_disk_bytes_per_s": round(achieved)}


def roofline_around(r: dict, roofline: dict) -> dict:
    """roofline_for() at the RAM bandwidth measured around the mode: the mean of the measures just
    before and just after it (r["ram_bytes_per_s_around"]), the estimate of what the machine gave
    while it ran; the up-front measure where there are none."""
    around = r.get("ram_bytes_per_s_around") or [roofline["ram_bytes_per_s"]]
    ram = round(sum(around) / len(around))
    return {"roofline_ram_bytes_per_s": ram, **roofline_for(r, dict(roofline, ram_bytes_per_s=ram))}

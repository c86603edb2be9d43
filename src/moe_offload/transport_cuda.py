"""The GPU tier's transport: pinned host slots -> VRAM slots on a copy stream, and its measurements.

Run once on an H200 (README, "GPU tier": 81 GB/s host -> device, 29 µs per copy); the CUDA tests
(`pytest -m cuda`, tests/test_cuda.py) exercise it where a GPU is available. Imported only by
`model.load`, and only when a CUDA device is asked for: nothing imports CUDA otherwise. It has the
interface of tiers.HostCopy, the CPU stand-in the CPU tests run.
"""
from __future__ import annotations

import time

import torch


class CudaTransport:
    def __init__(self, device: str):
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.copy_stream = torch.cuda.Stream(self.device)

    def allocate_host(self, nbytes: int) -> torch.Tensor:
        """Page-locked host memory (page-aligned, so O_DIRECT reads can land in it)."""
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def allocate_device(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy(self, src: torch.Tensor, dest: torch.Tensor) -> None:
        """Copy a pinned host blob into a device slot on the copy stream; returns once the slot holds
        it (called from a loader thread, so compute on the default stream goes on meanwhile)."""
        # The slot may have held an evicted expert whose kernels, launched before its eviction, still
        # run on the compute stream: the copy waits for everything launched there so far.
        self.copy_stream.wait_stream(torch.cuda.default_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            dest.copy_(src[:dest.numel()], non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        done.synchronize()

    def measure(self, nbytes: int, reps: int = 5) -> tuple[float, float]:
        """(bytes per second, seconds of fixed cost) of host -> device copies of `nbytes` from pinned
        memory, the best of `reps`: the numbers the hybrid decision uses."""
        src, dest = self.allocate_host(nbytes), self.allocate_device(nbytes)
        small_src, small_dest = self.allocate_host(64), self.allocate_device(64)
        self.copy(src, dest)  # warm-up
        big = small = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            self.copy(src, dest)
            big = min(big, time.perf_counter() - t)
            t = time.perf_counter()
            self.copy(small_src, small_dest)
            small = min(small, time.perf_counter() - t)
        return nbytes / max(big - small, 1e-9), small

"""The GPU tier's transport: disk -> pinned staging buffer -> GPU slot on a copy stream.

Imported only when a CUDA device is asked for; nothing here runs on machines without one. It keeps
the DiskLoader's interface (`submit(layer, expert, dest) -> Future`), so the cache does not know
which tier it reads from. Untested here: the machines this project is developed on have no GPU.
"""
from __future__ import annotations

import queue

import torch

from .loader import DiskLoader
from .stats import OffloadStats
from .store import Store


class CudaLoader(DiskLoader):
    tier = "disk"

    def __init__(self, store: Store, stats: OffloadStats, device: str, threads: int = 2):
        super().__init__(store, stats, threads=threads)
        self.device = torch.device(device)
        self.copy_stream = torch.cuda.Stream(self.device)
        # One pinned staging buffer per loader thread: reads land in page-locked memory so the
        # host-to-device copy is a true asynchronous DMA.
        self.staging: queue.Queue = queue.Queue()
        for _ in range(threads):
            self.staging.put(torch.empty(store.blob_size, dtype=torch.uint8, pin_memory=True))

    def _read(self, layer: int, expert: int, dest: torch.Tensor) -> None:
        staging = self.staging.get()
        try:
            super()._read(layer, expert, staging)  # disk -> pinned, checksum on first load
            with torch.cuda.stream(self.copy_stream):
                dest.copy_(staging[: dest.numel()], non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.copy_stream)
            done.synchronize()  # the future completes only when the slot holds the blob
        finally:
            self.staging.put(staging)

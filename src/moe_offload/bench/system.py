"""What the kernel knows about this process and its files: the page cache, disk reads, peak RSS."""
from __future__ import annotations

import os
from pathlib import Path


def drop_page_cache(*paths) -> None:
    """Ask the kernel to forget the cached pages of every file under the given paths."""
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else [f for f in root.rglob("*") if f.is_file()] if root.is_dir() else []
        for f in files:
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)  # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
            finally:
                os.close(fd)


def disk_read_bytes() -> int:
    """Bytes this process (all its threads) made the block layer read: page-cache hits excluded."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _peak_rss() -> int:
    from ..stats import peak_rss_bytes

    return peak_rss_bytes()


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass

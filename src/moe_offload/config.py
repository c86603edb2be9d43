"""The typed settings of the public API: how to quantize, and how to offload."""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import MoeOffloadError

EXPERT_BITS = (2, 3, 4, 8, 16)
DENSE_BITS = (4, 8, 16)
# The paper's settings: 4-bit and 3-bit in groups of 64, 2-bit in groups of 16. 8-bit defaults to
# one scale per output channel (group 0), the layout torch's fused int8 GEMV reads; an explicit
# group size keeps 8-bit per-group.
DEFAULT_GROUP = {2: 16, 3: 64, 4: 64, 8: 0}
EXPERT_FORMATS = ("auto", "rowtile", "int4pack")
ROWTILE_GROUPS = (32, 64, 128)  # the groups the rowtile kernels read (kernels_layer.py)
POLICIES = ("lru", "lfu")  # eviction: least recently / least frequently used (README, "Cache policies")
SCOPES = ("layer", "global")


@dataclass(frozen=True)
class QuantConfig:
    """Bits per weight for experts and for the dense part (16 keeps the source dtype)."""

    expert_bits: int = 4
    dense_bits: int = 4
    group_size: int | None = None  # None: the paper's default for each bit width
    # "auto": the fastest format each shape allows on this CPU (quant.choose_format: "rowtile" for 3/4-bit
    # where the CPU has VNNI); "rowtile": the int8-activation kernels (kernels_layer.py) for the experts
    # whatever the CPU; "int4pack": no "rowtile" anywhere (torch's int4 op, bf16 activations, for
    # experts and dense part alike), what "auto" chose before rowtile.
    expert_format: str = "auto"

    def __post_init__(self) -> None:
        if self.expert_format not in EXPERT_FORMATS:
            raise MoeOffloadError(f"expert_format must be one of {EXPERT_FORMATS}, got {self.expert_format!r}")
        if self.expert_format == "rowtile" and self.expert_bits == 16:
            raise MoeOffloadError("the rowtile format stores 2, 3, 4 or 8 bits, not 16")
        if self.expert_bits not in EXPERT_BITS:
            raise MoeOffloadError(f"expert_bits must be one of {EXPERT_BITS}, got {self.expert_bits}")
        if self.dense_bits not in DENSE_BITS:
            raise MoeOffloadError(f"dense_bits must be one of {DENSE_BITS}, got {self.dense_bits}")
        if self.group_size is not None and (self.group_size < 8 or self.group_size & (self.group_size - 1)):
            raise MoeOffloadError(f"group_size must be a power of two >= 8, got {self.group_size}")
        if self.expert_format == "rowtile" and self.group_size is not None and self.group_size not in ROWTILE_GROUPS:
            raise MoeOffloadError(f"the rowtile format reads groups of {', '.join(map(str, ROWTILE_GROUPS))} weights, "
                                  f"not {self.group_size}")

    def group_for(self, bits: int) -> int:
        return self.group_size if self.group_size is not None else DEFAULT_GROUP.get(bits, 64)

    def expert_group(self) -> int:
        """The experts' group size. An explicit "rowtile" keeps the bit width's default within the
        groups its kernels read (2-bit's 16 becomes 32; 8-bit's per-row scale, group 0, becomes 128)."""
        group = self.group_for(self.expert_bits)
        if self.expert_format == "rowtile" and self.group_size is None:
            return min(max(group, ROWTILE_GROUPS[0]), ROWTILE_GROUPS[-1]) if group else ROWTILE_GROUPS[-1]
        return group


DEFAULT_PREFETCH = 2


@dataclass(frozen=True)
class OffloadConfig:
    """Where experts are computed and how many of them the cache holds."""

    device: str = "cpu"
    expert_cache: int | str | None = None  # bytes, a size such as "2GiB", or "auto" (model.load)
    experts_per_layer: int | None = None  # the other way to give the budget
    # experts guessed per upcoming layer; 0 turns speculation off; None: DEFAULT_PREFETCH, or 0 when
    # the cache holds every expert (nothing is left to load ahead: model.load)
    prefetch: int | None = None
    lookahead: int = 1  # how many layers ahead to guess
    policy: str = "lru"
    cache_scope: str = "layer"  # one pool per layer (the paper), or one global pool

    def __post_init__(self) -> None:
        if self.expert_cache is not None and self.experts_per_layer is not None:
            raise MoeOffloadError("give either expert_cache or experts_per_layer, not both")
        if self.policy not in POLICIES:
            raise MoeOffloadError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.cache_scope not in SCOPES:
            raise MoeOffloadError(f"cache_scope must be one of {SCOPES}, got {self.cache_scope!r}")
        if (self.prefetch is not None and self.prefetch < 0) or self.lookahead < 1:
            raise MoeOffloadError("prefetch must be >= 0 and lookahead >= 1")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise MoeOffloadError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")

    def auto_budget(self) -> bool:
        return isinstance(self.expert_cache, str) and self.expert_cache.strip().lower() == "auto"

    def budget_bytes(self) -> int | None:
        """The explicit byte budget; None when none is given or it is "auto"."""
        return None if self.expert_cache is None or self.auto_budget() else parse_size(self.expert_cache)


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_size(size: int | str) -> int:
    """'2GiB', '512MB', '1.5G' or an int number of bytes -> bytes."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
        unit = match.group(2).lower() if match else None
        if not match or unit not in _UNITS:
            raise MoeOffloadError(f"cannot read the size {size!r}: use bytes or a unit such as 512MiB or 2GiB")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise MoeOffloadError(f"a size must be positive, got {size!r}")
    return value


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"

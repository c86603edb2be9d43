"""moe-offload: run Mixture-of-Experts models on machines whose fast memory cannot hold them.

    import moe_offload
    moe_offload.convert("Mixtral-8x7B-Instruct-v0.1", "mixtral-store", expert_bits=4)
    model = moe_offload.load("mixtral-store", expert_cache="4GiB")
    model.generate(...); print(model.offload_stats().as_dict())
"""
__version__ = "0.1.0"

from .config import OffloadConfig, QuantConfig  # noqa: E402
from .errors import MoeOffloadError, StoreCorruptError  # noqa: E402
from .stats import OffloadStats  # noqa: E402

# convert and load bring torch and transformers (~3 s): imported on first use (PEP 562), so that
# `moe-offload --help`, argument errors and the commands that need neither start at once.
from ._lazy import lazy_exports  # noqa: E402

__getattr__ = lazy_exports(__name__, {"convert": ".conversion", "load": ".model"})


__all__ = ["convert", "load", "QuantConfig", "OffloadConfig", "OffloadStats", "MoeOffloadError",
           "StoreCorruptError", "__version__"]

"""moe-offload: run Mixture-of-Experts models on machines whose fast memory cannot hold them.

    import moe_offload
    moe_offload.convert("Mixtral-8x7B-Instruct-v0.1", "mixtral-store", expert_bits=4)
    model = moe_offload.load("mixtral-store", expert_cache="4GiB")
    model.generate(...); print(model.offload_stats().as_dict())
"""
__version__ = "0.1.0"

from .config import OffloadConfig, QuantConfig  # noqa: E402
from .convert import convert  # noqa: E402
from .errors import MoeOffloadError, StoreCorruptError  # noqa: E402
from .model import load  # noqa: E402
from .stats import OffloadStats  # noqa: E402

__all__ = ["convert", "load", "QuantConfig", "OffloadConfig", "OffloadStats", "MoeOffloadError",
           "StoreCorruptError", "__version__"]

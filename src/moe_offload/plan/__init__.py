"""`moe-offload plan`: predictions from byte counts and measured bandwidths (predict.py), the command (cli.py)."""
from .._lazy import lazy_exports
from .cli import add_parser

# predict.py reads stores, hence torch: on first use, so that the CLI's parser starts without it.
__getattr__ = lazy_exports(__name__, {"Plan": ".predict", "plan": ".predict"})

__all__ = ["add_parser", "Plan", "plan"]

"""Quality: perplexity of stores, and the fidelity table across bit widths and quantizers.

  perplexity.py  windows of a text, perplexity of a model or a store
  fidelity.py    stores at several bit widths; our HQQ against round-to-nearest
  cli.py         `moe-offload eval`
"""
from .cli import add_parser

__all__ = ["add_parser"]  # perplexity.py needs torch: imported by the command, not the parser

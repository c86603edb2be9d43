"""The reference MoE: a small Mixtral trained here, so routing numbers come from a trained model.

  corpus.py  the King James Bible text (Debian bible-kjv-text), chapters, the held-out split
  model.py   the shape, the tokenizer, where the shipped checkpoint lives
  train.py   the seeded, resumable training loop and the held-out evaluation
  cli.py     `moe-offload reference`
"""
from .cli import add_parser
from .model import available, default_dir

__all__ = ["add_parser", "available", "default_dir"]

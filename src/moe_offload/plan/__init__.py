"""`moe-offload plan`: predictions from byte counts and measured bandwidths (predict.py), the command (cli.py)."""
from .cli import add_parser
from .predict import Plan, plan

__all__ = ["add_parser", "Plan", "plan"]

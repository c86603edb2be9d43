"""Routing traces and the expert-cache simulator.

  trace_format.py  the .npz trace: arrays, metadata, loading with checks
  recorder.py      hooks that record a trace while a loaded model generates
  policies.py      eviction policies: lru, lfu, lfru, belady
  simulate.py      the cache model that replays a trace under one setting
  report.py        settings grid and table rows
  plots.py         PNG plots
  cli.py           `moe-offload trace` and `moe-offload simulate`
"""
from .cli import add_parser
from .policies import POLICIES
from .simulate import Result, Setting, Steps, simulate
from .trace_format import Trace, load_trace

__all__ = ["add_parser", "POLICIES", "Result", "Setting", "Steps", "simulate", "Trace", "load_trace"]

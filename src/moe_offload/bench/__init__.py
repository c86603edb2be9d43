"""`moe-offload bench`: the seed protocol in several modes side by side, with a roofline.

  cli.py       the subcommand: options, checks, the models --shape builds
  run.py       the run: every mode one after the other, each in its own process
  mode.py      the modes, and one mode's run timed by phase
  roofline.py  bytes per token, RAM and disk bandwidth, the tokens/s they allow
  compare.py   tokens equal to the references', the issue's targets
  system.py    page cache, disk reads, peak RSS (/proc)
  report.py    the table, the text report, the plot
  llamacpp.py  --gguf: llama.cpp's llama-bench on a GGUF of the model, as one more column
  cgroup.py    --memory-limit: each mode in a child memory cgroup (v1 or v2), out-of-memory kills
"""
from .cli import add_parser, cmd_bench, parse_modes, prepare_shape
from .compare import targets
from .mode import HF_MODES, LONG_PREFILL, MODES, OURS, PROMPTS, open_model, run_mode
from .report import format_report, format_table, plot
from .roofline import blob_bandwidth, disk_bandwidth, ram_bandwidth, roofline_around, roofline_for
from .system import disk_read_bytes, drop_page_cache
from .._lazy import lazy_exports

# run.py brings the plan and the store, hence torch: on first use, so that the CLI's parser starts without it.
__getattr__ = lazy_exports(__name__, {name: ".run" for name in ("run_bench", "worker_main", "_check_source",
                                                                 "_recorded_source")})

__all__ = ["add_parser", "cmd_bench", "parse_modes", "prepare_shape", "targets", "HF_MODES", "LONG_PREFILL",
           "MODES", "OURS", "PROMPTS", "open_model", "run_mode", "format_report", "format_table", "plot",
           "blob_bandwidth", "disk_bandwidth", "ram_bandwidth", "roofline_around", "roofline_for", "run_bench",
           "worker_main", "disk_read_bytes", "drop_page_cache"]

"""What a server was started with, and the request counts /metrics reports."""
from __future__ import annotations

import collections
from dataclasses import dataclass, field


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_tokens_limit: int = 2048
    max_queue: int = 16
    request_counts: collections.Counter = field(default_factory=collections.Counter)

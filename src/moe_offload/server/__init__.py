"""`moe-offload serve`: an OpenAI-compatible HTTP API over one offloaded model.

Shape: FastAPI handlers validate a request, turn it into prompt token ids and sampling
parameters, and put a Job in a bounded queue. One worker thread owns the model and runs jobs
one at a time; it sends text deltas back to the handler's event loop. A Job's cancel flag is
checked after every token, so a client that goes away frees the model within one token.

The generation core (engine.py) is shared with `moe-offload chat`.

  schemas.py     OpenAI's request shapes (the subset we implement) and error object
  settings.py    what the server was started with, and its request counts
  app.py         the FastAPI application: routes, authentication, error handlers
  job_inputs.py  prompt token ids, the room left to generate, sampling parameters
  responses.py   whole JSON answers, or server-sent events
  metrics.py     /metrics in Prometheus' text format
  cli.py         the `serve` subcommand
"""
from ..engine import Engine, SamplingParams, chat_prompt_ids
from .cli import add_parser, add_serve_parser, bind_socket, run_server
from .metrics import prometheus_text
from .settings import ServerSettings
from .._lazy import lazy_exports

# The CLI imports this module for every command: the web stack (fastapi, starlette, pydantic: ~7 MiB
# of memory, ~80 ms) is imported on first use of a name that needs it.
__getattr__ = lazy_exports(__name__, {"create_app": ".app", "ApiError": ".schemas", "ChatCompletionRequest": ".schemas",
                                      "ChatMessage": ".schemas", "CompletionRequest": ".schemas",
                                      "OpenAIRequest": ".schemas"})


__all__ = ["Engine", "SamplingParams", "chat_prompt_ids", "create_app", "add_parser", "add_serve_parser",
           "bind_socket", "run_server", "prometheus_text", "ApiError", "ChatCompletionRequest", "ChatMessage",
           "CompletionRequest", "OpenAIRequest", "ServerSettings"]

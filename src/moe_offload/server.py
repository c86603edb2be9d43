"""`moe-offload serve`: an OpenAI-compatible HTTP API over one offloaded model.

Shape: FastAPI handlers validate a request, turn it into prompt token ids and sampling
parameters, and put a Job in a bounded queue. One worker thread owns the model and runs jobs
one at a time; it sends text deltas back to the handler's event loop. A Job's cancel flag is
checked after every token, so a client that goes away frees the model within one token.

The generation core (engine.py) is shared with `moe-offload chat`.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import secrets
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse

from .engine import (Completion, Engine, Job, QueueFull, SamplingParams, chat_prompt_ids, context_length,
                     load_model)

# fastapi and transformers are imported where used: the CLI imports this module for every
# command, and they would add a second or more to `moe-offload --help`.

log = logging.getLogger("moe_offload.server")

# ---------------------------------------------------------------------------------------------
# Request and response shapes (OpenAI's, the subset we implement)
# ---------------------------------------------------------------------------------------------

SEED_RANGE = dict(ge=-(2**63), le=2**63 - 1)


class OpenAIRequest(BaseModel):
    # Unknown fields are refused: silently ignoring one would give a wrong answer.
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, **SEED_RANGE)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    # Accepted so that we can refuse non-default values with a clear message.
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stops if s)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_message(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(
            part.text for part in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


class ApiError(Exception):
    """An error for the client, sent as OpenAI's error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type, self.headers = type, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def refuse_unsupported(request: OpenAIRequest) -> None:
    """Parameters we accept only at their no-op values; anything else is a 400, not a wrong answer."""
    checks = {
        "n": lambda v: v not in (None, 1),
        "best_of": lambda v: v not in (None, 1),
        "presence_penalty": lambda v: v not in (None, 0),
        "frequency_penalty": lambda v: v not in (None, 0),
        "logit_bias": bool,
        "logprobs": lambda v: v not in (None, False),
        "top_logprobs": lambda v: v is not None,
        "echo": bool,
        "suffix": lambda v: v is not None,
        "tools": bool,
        "tool_choice": lambda v: v not in (None, "none"),
        "functions": bool,
        "function_call": lambda v: v not in (None, "none"),
        "response_format": lambda v: v not in (None, {"type": "text"}),
    }
    for name, is_unsupported in checks.items():
        if name in request.model_fields_set and is_unsupported(getattr(request, name, None)):
            raise ApiError(400, f"'{name}' is not supported by this server; leave it out.",
                           param=name, code="unsupported_parameter")


# ---------------------------------------------------------------------------------------------
# The HTTP application
# ---------------------------------------------------------------------------------------------


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_tokens_limit: int = 2048
    max_queue: int = 16
    request_counts: collections.Counter = field(default_factory=collections.Counter)


def create_app(engine: Engine, settings: ServerSettings):
    from fastapi import Depends, FastAPI
    from fastapi.security import HTTPBearer

    app = FastAPI(title="moe-offload", version="1",
                  description="OpenAI-compatible API for a Mixture-of-Experts model with offloaded experts.")
    bearer = HTTPBearer(auto_error=False)  # declares the scheme in the OpenAPI schema

    def check_api_key(credentials=Depends(bearer)) -> None:
        if settings.api_key is None:
            return
        if credentials is None or not secrets.compare_digest(
                credentials.credentials.encode(), settings.api_key.encode()):
            raise ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer KEY'.",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    install_error_handlers(app)
    app.add_middleware(GuardAndCount, counts=settings.request_counts)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": settings.model_name, "queue_depth": engine.queue_depth}

    @app.get("/v1/models", dependencies=[Depends(check_api_key)])
    def list_models() -> dict:
        return {"object": "list", "data": [model_card(settings.model_name)]}

    @app.get("/v1/models/{model_id}", dependencies=[Depends(check_api_key)])
    def get_model(model_id: str) -> dict:
        check_model_name(model_id, settings)
        return model_card(settings.model_name)

    @app.get("/metrics", dependencies=[Depends(check_api_key)], response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(engine, settings),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/chat/completions", dependencies=[Depends(check_api_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        refuse_unsupported(body)
        check_model_name(body.model, settings)
        messages = [m.as_template_message() for m in body.messages]
        try:
            prompt_ids = chat_prompt_ids(engine.tokenizer, messages)
        except Exception as exc:  # noqa: BLE001 - templates raise anything (jinja, ValueError)
            raise ApiError(400, f"The model's chat template rejected these messages: {exc}",
                           param="messages") from None
        room = room_to_generate(prompt_ids, engine, settings, "messages")
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        requested = body.max_completion_tokens or body.max_tokens
        params = sampling_params(body, requested, room, room, settings, param)
        return await respond(ChatFormat(settings.model_name), engine, request, prompt_ids, params,
                             bool(body.stream))

    @app.post("/v1/completions", dependencies=[Depends(check_api_key)])
    async def completions(body: CompletionRequest, request: Request):
        refuse_unsupported(body)
        check_model_name(body.model, settings)
        prompt_ids = completion_prompt_ids(body.prompt, engine)
        room = room_to_generate(prompt_ids, engine, settings, "prompt")
        params = sampling_params(body, body.max_tokens, min(COMPLETIONS_DEFAULT_MAX_TOKENS, room),
                                 room, settings, "max_tokens")
        return await respond(TextFormat(settings.model_name), engine, request, prompt_ids, params,
                             bool(body.stream))

    app.state.engine, app.state.settings = engine, settings
    return app


def install_error_handlers(app) -> None:
    """Every error leaves as OpenAI's error object; none as a traceback or a bare 500."""
    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail), code=f"http_{exc.status_code}",
                        headers=getattr(exc, "headers", None)).response()



class GuardAndCount:
    """Counts requests by endpoint and status, and turns an unexpected exception into one log
    line plus OpenAI's error object (Starlette's own handler would print a traceback).

    Plain ASGI rather than @app.middleware, which would buffer streams and hide disconnects.
    """

    def __init__(self, app, counts: collections.Counter):
        self.app, self.counts = app, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = None

        async def noting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting_send)
        except ClientDisconnect:
            status = status or 499  # nobody is listening any more
        except Exception as exc:  # noqa: BLE001 - last line of defence
            log.error("internal error on %s %s: %r", scope["method"], scope["path"], exc,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            if status is None:
                error = ApiError(500, f"Internal server error: {exc}", type="server_error")
                await error.response()(scope, receive, noting_send)
        finally:
            route = scope.get("route")
            self.counts[(route.path if route is not None else "other", status or 499)] += 1


def validation_error(errors) -> ApiError:
    first = errors[0] if errors else {}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return ApiError(400, "The request body is not valid JSON.", code="invalid_json")
    if first.get("type") == "extra_forbidden" and loc:
        return ApiError(400, f"Unrecognized request argument supplied: {loc[-1]}.",
                        param=".".join(loc), code="unsupported_parameter")
    param = ".".join(loc) or None
    message = first.get("msg", "Invalid request.")
    return ApiError(400, f"{param}: {message}" if param else message, param=param,
                    code="invalid_value")


def model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "moe-offload"}


def check_model_name(name: str, settings: ServerSettings) -> None:
    if name != settings.model_name:
        raise ApiError(404, f"The model '{name}' does not exist; this server serves "
                            f"'{settings.model_name}'.", param="model", code="model_not_found")


def completion_prompt_ids(prompt, engine: Engine) -> list[int]:
    """A single prompt as text or token ids; batches are refused like n > 1."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, "Only one prompt per request is supported.", param="prompt",
                           code="unsupported_parameter")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = engine.tokenizer(prompt).input_ids
        bos = engine.tokenizer.bos_token_id
        # The model needs one token to start from: an empty prompt starts from BOS.
        return ids or ([bos] if bos is not None else [])
    vocab = engine.model.get_input_embeddings().num_embeddings
    if not prompt or not all(0 <= t < vocab for t in prompt):
        raise ApiError(400, f"Token-id prompts must be non-empty, with ids in [0, {vocab}).",
                       param="prompt", code="invalid_value")
    return list(prompt)


COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's; chat's default is "as much as there is room for"


def room_to_generate(prompt_ids: list[int], engine: Engine, settings: ServerSettings,
                     param: str) -> int:
    """How many tokens may follow the prompt: the server's limit, within the model's context."""
    if not prompt_ids:
        raise ApiError(400, "The prompt is empty and the model has no BOS token to start from.",
                       param=param, code="invalid_value")
    context = context_length(engine.model)
    if context is None:
        return settings.max_tokens_limit
    if len(prompt_ids) >= context:
        raise ApiError(400, f"The prompt has {len(prompt_ids)} tokens, which fills the model's "
                            f"context of {context}; shorten it.", param=param,
                       code="context_length_exceeded")
    return min(settings.max_tokens_limit, context - len(prompt_ids))


def sampling_params(body: OpenAIRequest, requested: int | None, default: int, room: int,
                    settings: ServerSettings, param: str) -> SamplingParams:
    if requested is not None and requested > settings.max_tokens_limit:
        raise ApiError(400, f"{param} is {requested}; this server allows at most "
                            f"{settings.max_tokens_limit}.", param=param, code="invalid_value")
    if requested is not None and requested > room:
        raise ApiError(400, f"The prompt plus {param} ({requested}) exceeds the model's context; "
                            f"ask for at most {room}.", param=param,
                       code="context_length_exceeded")
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    return SamplingParams(requested or default, temperature, top_p, body.seed, body.stop_strings())


# ---------------------------------------------------------------------------------------------
# Answers: whole JSON, or server-sent events in OpenAI's chunk format
# ---------------------------------------------------------------------------------------------


class ChatFormat:
    def __init__(self, model_name: str):
        self.model, self.id, self.created = model_name, f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def _envelope(self, obj: str, choice: dict, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice], **extra}

    def whole(self, result: Completion) -> dict:
        message = {"role": "assistant", "content": result.text}
        return self._envelope("chat.completion", {"index": 0, "message": message,
                                                  "finish_reason": result.finish_reason,
                                                  "logprobs": None}, usage=usage(result))

    def chunk(self, delta_text: str | None, *, first=False, result: Completion | None = None) -> dict:
        delta = {"role": "assistant", "content": ""} if first else (
            {"content": delta_text} if delta_text is not None else {})
        choice = {"index": 0, "delta": delta, "logprobs": None,
                  "finish_reason": result.finish_reason if result else None}
        extra = {"usage": usage(result)} if result else {}
        return self._envelope("chat.completion.chunk", choice, **extra)


class TextFormat(ChatFormat):
    def __init__(self, model_name: str):
        super().__init__(model_name)
        self.id = f"cmpl-{uuid.uuid4().hex}"

    def whole(self, result: Completion) -> dict:
        return self._envelope("text_completion", {"index": 0, "text": result.text, "logprobs": None,
                                                  "finish_reason": result.finish_reason},
                              usage=usage(result))

    def chunk(self, delta_text: str | None, *, first=False, result: Completion | None = None) -> dict:
        if first:
            return None  # completions have no role-only opening chunk
        choice = {"index": 0, "text": delta_text or "", "logprobs": None,
                  "finish_reason": result.finish_reason if result else None}
        extra = {"usage": usage(result)} if result else {}
        return self._envelope("text_completion", choice, **extra)


def usage(result: Completion) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


async def respond(fmt: ChatFormat, engine: Engine, request: Request, prompt_ids: list[int],
                  params: SamplingParams, stream: bool):
    job = Job(prompt_ids, params, asyncio.get_running_loop())
    try:
        engine.submit(job)
    except QueueFull:
        wait = engine.retry_after_seconds()
        raise ApiError(429, f"The server is busy ({engine.max_queue} requests already waiting); "
                            f"retry in about {wait} s.", type="rate_limit_error",
                       code="server_busy", headers={"Retry-After": str(wait)}) from None
    if stream:
        return JobStream(sse_events(fmt, job), engine, job)
    answered = asyncio.create_task(final_event(job))
    disconnected = asyncio.create_task(wait_for_disconnect(request))
    try:
        await asyncio.wait({answered, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # whichever way this ends, nothing more is needed from the model
        answered.cancel()
        disconnected.cancel()
        engine.cancel(job)
    if answered.cancelled() or not answered.done():
        return JSONResponse({}, status_code=499)  # the client is gone; nobody reads this
    kind, payload = answered.result()
    if kind == "error":
        raise ApiError(500, payload, type="server_error")
    return fmt.whole(payload)


async def final_event(job: Job) -> tuple[str, Any]:
    while True:
        kind, payload = await job.events.get()
        if kind != "text":
            return kind, payload


async def wait_for_disconnect(request: Request) -> None:
    # After the body is read, the next ASGI message is the disconnect (or the end of the response).
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def sse_events(fmt: ChatFormat, job: Job):
    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    if (opening := fmt.chunk(None, first=True)) is not None:
        yield sse(opening)
    while True:
        kind, payload = await job.events.get()
        if kind == "text":
            yield sse(fmt.chunk(payload))
        elif kind == "done":
            yield sse(fmt.chunk(None, result=payload))
            break
        else:  # a failure after the 200 went out: OpenAI's clients read an error event
            yield sse(ApiError(500, payload, type="server_error").body())
            break
    yield "data: [DONE]\n\n"


class JobStream(StreamingResponse):
    """An SSE response that cancels its job however it ends (done, disconnect, shutdown)."""

    def __init__(self, events, engine: Engine, job: Job):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.engine, self.job = engine, job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.engine.cancel(self.job)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

STAT_METRICS = {  # offload_stats() key -> (metric name, type, help)
    "prefill_tokens_per_s": ("prefill_tokens_per_second", "gauge", "Prefill throughput."),
    "decode_tokens_per_s": ("decode_tokens_per_second", "gauge", "Decode throughput."),
    "hit_rate": ("expert_cache_hit_rate", "gauge", "Fraction of expert lookups served from the cache."),
    "hits": ("expert_cache_hits_total", "counter", "Expert lookups served from the cache."),
    "misses": ("expert_cache_misses_total", "counter", "Expert lookups that had to load the expert."),
    "prefetch_precision": ("prefetch_precision", "gauge", "Fraction of prefetched experts that were used."),
    "prefetch_recall": ("prefetch_recall", "gauge", "Fraction of used experts that had been prefetched."),
    "evictions": ("expert_cache_evictions_total", "counter", "Experts evicted from the cache."),
    "loads": ("expert_loads_total", "counter", "Expert reads from the slow tier."),
    "prefetch_useful_loads": ("prefetch_useful_loads_total", "counter", "Speculative reads that a layer then used."),
    "stall_seconds": ("stall_seconds_total", "counter", "Seconds compute waited for experts to arrive."),
    "resident_experts": ("resident_experts", "gauge", "Experts in the fast tier now."),
    "cache_slots": ("expert_cache_slots", "gauge", "Slots in the expert cache."),
    "peak_rss_bytes": ("peak_rss_bytes", "gauge", "Peak resident memory of the process."),
}


def prometheus_text(engine: Engine, settings: ServerSettings) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]):
        lines.extend([f"# HELP moe_offload_{name} {help_text}", f"# TYPE moe_offload_{name} {kind}"])
        lines.extend(f"moe_offload_{name}{labels} {number(value)}" for labels, value in samples)

    metric("requests_total", "counter", "HTTP requests, by endpoint and status code.",
           [(f'{{endpoint="{ep}",status="{status}"}}', n)
            for (ep, status), n in sorted(settings.request_counts.items(), key=str)])
    metric("generated_tokens_total", "counter", "Tokens generated.",
           [("", engine.counters["generated_tokens"])])
    metric("prompt_tokens_total", "counter", "Prompt tokens processed.",
           [("", engine.counters["prompt_tokens"])])
    metric("last_request_tokens_per_second", "gauge",
           "Generated tokens per second of the last finished request (prefill included).",
           [("", engine.last_tokens_per_s)])
    metric("queue_depth", "gauge", "Requests waiting for the model.", [("", engine.queue_depth)])
    metric("busy", "gauge", "1 while a generation runs.", [("", int(engine.busy))])

    stats = offload_stats_dict(engine.model)
    for key, (name, kind, help_text) in STAT_METRICS.items():
        if isinstance(stats.get(key), (int, float)):
            metric(name, kind, help_text, [("", stats[key])])
    if isinstance(stats.get("bytes_read"), dict):
        metric("bytes_read_total", "counter", "Bytes of experts read, by tier they came from.",
               [(f'{{tier="{tier}"}}', n) for tier, n in sorted(stats["bytes_read"].items())])
    return "\n".join(lines) + "\n"


def number(value) -> str:
    return str(int(value)) if isinstance(value, (bool, int)) else repr(float(value))


def offload_stats_dict(model) -> dict:
    stats = getattr(model, "offload_stats", None)
    return stats().as_dict() if callable(stats) else {}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_serve_parser(subparsers):
    from .cli import add_budget_args

    parser = subparsers.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve STORE over an OpenAI-compatible HTTP API (/v1/chat/completions, "
                    "/v1/completions, /v1/models, /health, /metrics).")
    parser.add_argument("store", help="a store made by `moe-offload convert`")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000,
                        help="port; 0 picks a free one (default: 8000)")
    parser.add_argument("--api-key", metavar="KEY", default=os.environ.get("MOE_OFFLOAD_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 and /metrics "
                             "(default: $MOE_OFFLOAD_API_KEY; the environment keeps it out of `ps`)")
    parser.add_argument("--max-queue", type=int, default=16, metavar="N",
                        help="requests that may wait for the model; more get 429 (default: 16)")
    parser.add_argument("--max-tokens-limit", type=int, default=2048, metavar="N",
                        help="largest max_tokens a request may ask for (default: 2048)")
    parser.add_argument("--model-name", metavar="NAME",
                        help="model id clients send (default: the store folder's name)")
    add_budget_args(parser)
    parser.set_defaults(func=run_server)
    return parser


add_parser = add_serve_parser  # the name cli.build_parser looks for


def bind_socket(host: str, port: int) -> socket.socket:
    import moe_offload

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise moe_offload.MoeOffloadError(
            f"Cannot listen on {host}:{port} ({exc.strerror}); choose another --port or --host.") from None
    return sock


def run_server(args) -> None:
    import moe_offload
    import uvicorn

    for name in ("max_queue", "max_tokens_limit"):
        if getattr(args, name) < 1:
            raise moe_offload.MoeOffloadError(f"--{name.replace('_', '-')} must be at least 1.")
    sock = bind_socket(args.host, args.port)  # before loading, so a busy port fails fast
    try:
        model, tokenizer = load_model(args)
    except BaseException:
        sock.close()
        raise
    engine = Engine(model, tokenizer, max_queue=args.max_queue)  # owns the model from here on
    settings = ServerSettings(model_name=args.model_name or Path(args.store).resolve().name,
                              api_key=args.api_key, max_tokens_limit=args.max_tokens_limit,
                              max_queue=args.max_queue)
    app = create_app(engine, settings)
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    port = sock.getsockname()[1]  # the real one when --port 0 asked for any free port
    print(f"Serving '{settings.model_name}' at http://{shown_host}:{port}/v1 "
          f"(OpenAI-compatible). Ctrl-C stops.", flush=True)
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the Ctrl-C it already handled by shutting down
    finally:
        engine.close()

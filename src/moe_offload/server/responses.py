"""Answers: whole JSON, or server-sent events in OpenAI's chunk format."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from ..engine import Completion, Engine, Job, QueueFull, SamplingParams
from .schemas import ApiError


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

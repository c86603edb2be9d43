"""Request and response shapes (OpenAI's, the subset we implement), and OpenAI's error object."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

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

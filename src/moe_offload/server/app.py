"""The HTTP application: routes, authentication, error handlers and the request counter."""
from __future__ import annotations

import collections
import logging
import secrets

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse

from ..engine import Engine, chat_prompt_ids
from .job_inputs import COMPLETIONS_DEFAULT_MAX_TOKENS, completion_prompt_ids, room_to_generate, sampling_params
from .metrics import prometheus_text
from .responses import ChatFormat, TextFormat, respond
from .schemas import ApiError, ChatCompletionRequest, CompletionRequest, refuse_unsupported
from .settings import ServerSettings

log = logging.getLogger("moe_offload.server")


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

"""From a request to a job's inputs: the prompt's token ids, the room left to generate, sampling."""
from __future__ import annotations

from ..engine import Engine, SamplingParams, context_length
from .schemas import ApiError, OpenAIRequest
from .settings import ServerSettings


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

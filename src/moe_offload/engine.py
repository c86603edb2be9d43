"""Generation for the server and the chat: sampling settings, incremental text, and the Engine,
whose one worker thread owns the model and runs jobs one at a time from a bounded queue.

A Job's cancel flag is checked after every token, so a client that goes away (or a Ctrl-C in the
chat) frees the model within one token.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("moe_offload.engine")

# ---------------------------------------------------------------------------------------------
# Generation core (shared with chat.py)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        # Below 1e-4 the logits / temperature overflow float32: that is greedy anyway.
        return self.temperature < 1e-4 or self.top_p == 0


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string), "length", or "cancelled"
    prompt_tokens: int
    token_ids: list[int]  # every generated token, EOS and tokens past a stop string included

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class TextTracker:
    """Turns generated tokens into text as they arrive, and stops generate() when asked to.

    A transformers StoppingCriteria (by its call signature): those run once per new token,
    with the token already in input_ids. Text is released only when it is final: a trailing
    partial UTF-8 character or a possible start of a stop string is held back until it resolves.
    """

    def __init__(self, tokenizer, prompt_len: int, stop: tuple[str, ...],
                 on_text: Callable[[str], None] | None, cancel: threading.Event | None):
        self.tokenizer, self.prompt_len, self.stop = tokenizer, prompt_len, stop
        self.on_text, self.cancel = on_text, cancel
        self.token_ids: list[int] = []
        self.released = ""  # text handed to on_text so far
        self.stop_hit = False

    def __call__(self, input_ids, scores, **kwargs):
        self.token_ids = input_ids[0, self.prompt_len:].tolist()
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stop_hit = True
            self._release(text[:cut])
        else:
            self._release(text[:len(text) - self._held_back(text)])
        stop_now = self.stop_hit or (self.cancel is not None and self.cancel.is_set())
        import torch

        return torch.full((input_ids.shape[0],), stop_now, dtype=torch.bool, device=input_ids.device)

    def finish(self) -> str:
        """Releases what is left once generation is over; returns the whole text."""
        if not self.stop_hit:
            self._release(self.tokenizer.decode(self.token_ids, skip_special_tokens=True))
        return self.released

    def _held_back(self, text: str) -> int:
        partial_char = len(text) - len(text.rstrip("\ufffd"))
        stop_prefix = max((n for s in self.stop for n in range(1, len(s))
                           if text.endswith(s[:n])), default=0)
        return max(partial_char, stop_prefix)

    def _release(self, text: str) -> None:
        # Text once released cannot be taken back; a decode that rewrites earlier text
        # (it does not happen with byte-level BPE) would only lose the rewritten part.
        if len(text) > len(self.released) and text.startswith(self.released):
            delta, self.released = text[len(self.released):], text
            if self.on_text is not None:
                self.on_text(delta)


def generation_config_for(model, tokenizer, params: SamplingParams):
    """A fresh config, so that defaults stored with the model cannot change OpenAI semantics."""
    from transformers import GenerationConfig

    base = model.generation_config
    eos = base.eos_token_id if base.eos_token_id is not None else tokenizer.eos_token_id
    pad = base.pad_token_id if base.pad_token_id is not None else (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    if isinstance(pad, list):
        pad = pad[0]
    sampling = {} if params.greedy else dict(temperature=params.temperature, top_p=params.top_p, top_k=0)
    return GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=not params.greedy,
                            eos_token_id=eos, pad_token_id=pad, bos_token_id=base.bos_token_id,
                            **sampling)


@functools.lru_cache(maxsize=1)
def _cache_kwarg() -> str:
    """transformers 5.24 renamed generate's `past_key_values` to `cache` (the old name now warns)."""
    import transformers

    version = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    return "cache" if version >= (5, 24) else "past_key_values"


def generate_text(model, tokenizer, prompt_ids: list[int], params: SamplingParams, *,
                  on_text: Callable[[str], None] | None = None,
                  cancel: threading.Event | None = None, past_key_values=None) -> Completion:
    """Runs model.generate on one prompt; streams text through on_text; honours stop and cancel.

    The caller must own the model (one generation at a time): the seed is global torch state.
    """
    import torch  # here, not at the top: the CLI's parser imports this module
    from transformers import StoppingCriteriaList

    if params.seed is not None:
        torch.manual_seed(params.seed)
    tracker = TextTracker(tokenizer, len(prompt_ids), params.stop, on_text, cancel)
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
    with torch.inference_mode():
        model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                       generation_config=generation_config_for(model, tokenizer, params),
                       stopping_criteria=StoppingCriteriaList([tracker]),
                       **{_cache_kwarg(): past_key_values})
    text = tracker.finish()
    if tracker.stop_hit:
        reason = "stop"
    elif cancel is not None and cancel.is_set():
        reason = "cancelled"
    elif len(tracker.token_ids) >= params.max_new_tokens:
        reason = "length"
    else:
        reason = "stop"  # EOS
    return Completion(text, reason, len(prompt_ids), tracker.token_ids)


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Messages -> token ids through the model's chat template, ready for the assistant's turn."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template writes special tokens (BOS, turn markers) itself.
    return tokenizer(text, add_special_tokens=False).input_ids


def context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


# ---------------------------------------------------------------------------------------------
# The worker: one thread owns the model; requests wait in a bounded queue
# ---------------------------------------------------------------------------------------------


class QueueFull(Exception):
    pass


class Job:
    """One request's generation; its events flow back to the asyncio loop of its handler."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams,
                 loop: asyncio.AbstractEventLoop):
        self.prompt_ids, self.params, self.loop = prompt_ids, params, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def send(self, kind: str, payload: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancelled.set()


class Engine:
    def __init__(self, model, tokenizer, *, max_queue: int):
        self.model, self.tokenizer, self.max_queue = model, tokenizer, max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._wakeup = threading.Condition()
        self._running: Job | None = None
        self._closed = False
        self.counters = collections.Counter()  # generated_tokens, prompt_tokens, generations
        self.last_tokens_per_s = 0.0
        self._mean_job_seconds = 1.0
        self._thread = threading.Thread(target=self._work, name="moe-offload-generate", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return self._running is not None

    def submit(self, job: Job) -> None:
        with self._wakeup:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull
            self._waiting.append(job)
            self._wakeup.notify()

    def cancel(self, job: Job) -> None:
        job.cancelled.set()
        with self._wakeup:
            if job in self._waiting:
                self._waiting.remove(job)

    def retry_after_seconds(self) -> int:
        return max(1, round(self._mean_job_seconds * (self.queue_depth + 1)))

    def close(self) -> None:
        """Stops the worker, then closes the model (the engine owns it)."""
        with self._wakeup:
            self._closed = True
            for job in self._waiting:
                job.cancelled.set()
            self._waiting.clear()
            if self._running is not None:
                self._running.cancelled.set()
            self._wakeup.notify()
        self._thread.join(timeout=30)
        if not self._thread.is_alive() and callable(getattr(self.model, "close", None)):
            self.model.close()

    def _next_job(self) -> Job | None:
        with self._wakeup:
            while not self._waiting and not self._closed:
                self._wakeup.wait()
            if self._closed:
                return None
            self._running = self._waiting.popleft()
            return self._running

    def _work(self) -> None:
        while (job := self._next_job()) is not None:
            try:
                if not job.cancelled.is_set():
                    self._run(job)
            finally:
                self._running = None

    def _run(self, job: Job) -> None:
        started = time.perf_counter()
        try:
            result = generate_text(self.model, self.tokenizer, job.prompt_ids, job.params,
                                   on_text=lambda delta: job.send("text", delta),
                                   cancel=job.cancelled)
        except Exception as exc:  # noqa: BLE001 - the worker must survive any one request
            log.error("generation failed: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
            job.send("error", f"generation failed: {exc}")
            return
        seconds = time.perf_counter() - started
        self._mean_job_seconds = 0.8 * self._mean_job_seconds + 0.2 * seconds
        self.counters.update(generations=1, generated_tokens=result.completion_tokens,
                             prompt_tokens=result.prompt_tokens)
        self.last_tokens_per_s = result.completion_tokens / seconds if seconds > 0 else 0.0
        job.send("done", result)


def freeze_heap() -> None:
    """Move every object the process holds now into the garbage collector's permanent generation,
    after a collection (so no garbage cycle is kept). A loaded model leaves ~520,000 tracked objects
    (torch, transformers, the modules), and a full collection over them takes ~200 ms (quarter:
    201-203 ms; 0.0 ms once frozen), paid by whichever decode step it falls in (33-token generates
    in one process: 34.4-36.4 ms a token in the one with a full collection, 27.2-30.1 in the
    others). Frozen objects are never traversed again and are still freed by reference counting.
    The command line, the server and the bench own their processes and call this once the model
    is loaded; load() does not, since it would change a library user's whole process."""
    import gc

    gc.collect()
    gc.freeze()


def load_model(args):
    """The offloaded model and its tokenizer, as the budget options of `args` ask."""
    import moe_offload
    from transformers import AutoTokenizer

    from .options import announce_cache, announce_preload, load_kwargs

    model = moe_offload.load(args.store, **load_kwargs(args))  # checks the store, says what is wrong
    announce_cache(model)
    try:
        # Every kernel now (chats and requests bring long prompts), not inside the first answer; this
        # also gives LLVM's library pages back before the cache fills.
        model.offload_warm_up()
        announce_preload(model)  # a cache of every expert: all of them now, not at first use
        tokenizer = AutoTokenizer.from_pretrained(args.store, local_files_only=True)
    except BaseException:
        model.close()
        raise
    freeze_heap()
    return model, tokenizer

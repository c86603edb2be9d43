"""`moe-offload chat`: talk to an offloaded model in the terminal.

The history is rendered by the model's chat template every turn; the KV cache of the tokens
already seen is kept, so a turn only prefills what is new (on an offloaded model a prefill
touches nearly every expert, which is the slow part). Ctrl-C stops the answer, not the program.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading

from .engine import (Completion, SamplingParams, chat_prompt_ids, context_length, generate_text,
                     load_model)

HELP = "/reset clears the conversation, /stats shows statistics, /exit quits; Ctrl-C stops an answer."
PROMPT = ">>> "


class ChatSession:
    """A conversation: messages plus the KV cache of the tokens the model has already read."""

    def __init__(self, model, tokenizer, params: SamplingParams, system: str | None = None):
        self.model, self.tokenizer, self.params, self.system = model, tokenizer, params, system
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self._cache = None
        self._cached_ids: list[int] = []  # the tokens whose keys and values _cache holds

    def ask(self, text: str, on_text=None, cancel: threading.Event | None = None) -> Completion:
        """Answers one user message; the answer (even a stopped one) joins the history."""
        messages = [*self.messages, {"role": "user", "content": text}]
        prompt_ids = chat_prompt_ids(self.tokenizer, messages)
        limit = context_length(self.model)
        max_new = self.params.max_new_tokens
        if limit is not None:
            if len(prompt_ids) >= limit:
                raise ConversationFull(len(prompt_ids), limit)
            max_new = min(max_new, limit - len(prompt_ids))
        params = SamplingParams(max_new, self.params.temperature, self.params.top_p,
                                self.params.seed, self.params.stop)
        cache = self._cache_for(prompt_ids)
        try:
            result = generate_text(self.model, self.tokenizer, prompt_ids, params,
                                   on_text=on_text, cancel=cancel, past_key_values=cache)
        except BaseException:
            self._cache, self._cached_ids = None, []  # half-written: no longer matches the ids
            raise
        self.messages = [*messages, {"role": "assistant", "content": result.text}]
        self._cache = cache
        self._cached_ids = (prompt_ids + result.token_ids)[:cache.get_seq_length()]
        return result

    def _cache_for(self, prompt_ids: list[int]):
        """The kept cache cut back to its longest prefix shared with prompt_ids (or a new one)."""
        from transformers import DynamicCache  # slow to import (seconds): only when chatting

        shared = 0
        for cached, new in zip(self._cached_ids, prompt_ids):
            if cached != new:
                break
            shared += 1
        shared = min(shared, len(prompt_ids) - 1)  # generate needs at least one new token
        if self._cache is None or shared == 0:
            return DynamicCache(config=self.model.config)
        try:
            self._cache.crop(shared - self._cache.get_seq_length())  # a negative count drops tokens
        except Exception:  # noqa: BLE001 - a cache that cannot be cut is just rebuilt
            return DynamicCache(config=self.model.config)
        return self._cache


class ConversationFull(Exception):
    def __init__(self, tokens: int, limit: int):
        super().__init__(f"The conversation has {tokens} tokens, the model's whole context "
                         f"({limit}); /reset to start over.")


@contextlib.contextmanager
def ctrl_c_sets(event: threading.Event):
    """While inside, Ctrl-C sets event (the answer stops after its current token)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers live on the main thread only
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stats_text(model) -> str:
    stats = model.offload_stats()
    if hasattr(stats, "summary"):
        return stats.summary()
    return "\n".join(f"{key}: {value}" for key, value in stats.as_dict().items())


def chat_loop(session: ChatSession) -> None:
    def say(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    say(f"{HELP}\n")
    while True:
        try:
            line = input(PROMPT).strip()
        except EOFError:  # Ctrl-D
            say("\n")
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, as in a shell
            say("\n")
            continue
        if not line:
            continue
        if line.startswith("/"):
            command = line.split()[0].lower()
            if command in ("/exit", "/quit", "/bye"):
                return
            if command == "/reset":
                session.reset()
                say("(conversation cleared)\n")
            elif command == "/stats":
                say(stats_text(session.model) + "\n")
            else:
                say(f"Unknown command {command}. {HELP}\n")
            continue
        cancel = threading.Event()
        try:
            with ctrl_c_sets(cancel):
                result = session.ask(line, on_text=say, cancel=cancel)
        except ConversationFull as exc:
            say(f"{exc}\n")
            continue
        except Exception as exc:  # noqa: BLE001 - e.g. the chat template refuses the history
            say(f"error: {exc}\n")
            continue
        say(" [stopped]\n\n" if result.finish_reason == "cancelled" else "\n\n")


def add_chat_parser(subparsers):
    from .options import add_budget_args

    parser = subparsers.add_parser(
        "chat", help="chat with the model in the terminal",
        description=f"Chat with STORE's model in the terminal. {HELP}")
    parser.add_argument("store", help="a store made by `moe-offload convert`")
    parser.add_argument("--system", metavar="TEXT", help="a system message to start with")
    parser.add_argument("--max-tokens", type=int, default=512, metavar="N",
                        help="longest answer in tokens (default: 512)")
    parser.add_argument("--temperature", type=float, default=0.7,
                        help="sampling temperature; 0 is greedy (default: 0.7)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default: 0.95)")
    parser.add_argument("--seed", type=int, help="seed the sampler, for repeatable answers")
    add_budget_args(parser)
    parser.set_defaults(func=run_chat)
    return parser


add_parser = add_chat_parser  # the name cli.build_parser looks for


def run_chat(args) -> None:
    import moe_offload

    if args.max_tokens < 1 or args.temperature < 0 or not 0 <= args.top_p <= 1:
        raise moe_offload.MoeOffloadError(
            "--max-tokens must be at least 1, --temperature at least 0, --top-p in [0, 1].")
    print(f"Loading {args.store} ...", flush=True)
    model, tokenizer = load_model(args)
    try:
        if getattr(tokenizer, "chat_template", None) is None:
            raise moe_offload.MoeOffloadError(
                f"{args.store} has no chat template, so it cannot chat; use an instruct model.")
        params = SamplingParams(args.max_tokens, args.temperature, args.top_p, args.seed)
        if sys.stdin.isatty():
            import readline  # noqa: F401 - line editing and history for input()
        chat_loop(ChatSession(model, tokenizer, params, system=args.system))
    finally:
        model.close()

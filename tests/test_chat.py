"""`moe-offload chat`: the session logic in-process, then the real command in a pseudo-terminal."""
from __future__ import annotations

import os
import re
import signal
import sys
import threading

import pexpect
import pytest
import torch
from transformers import AutoTokenizer

import moe_offload
from moe_offload.chat import PROMPT, ChatSession, ctrl_c_sets
from moe_offload.server import SamplingParams, chat_prompt_ids

GREEDY = SamplingParams(max_new_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def model(tiny_store16):
    model = moe_offload.load(tiny_store16)
    yield model
    model.close()


@pytest.fixture(scope="module")
def tokenizer(tiny_store16):
    return AutoTokenizer.from_pretrained(tiny_store16)


def greedy_reply(model, tokenizer, messages, max_new_tokens=8) -> str:
    """What plain `generate` answers to the whole conversation, from scratch."""
    ids = torch.tensor([chat_prompt_ids(tokenizer, messages)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_two_turns_match_generate_and_reuse_the_cache(model, tokenizer):
    session = ChatSession(model, tokenizer, GREEDY)
    first = session.ask("hello")
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first.text}]
    assert first.text == greedy_reply(model, tokenizer, history[:1])

    tokens_read = []  # tokens each forward pass reads
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: tokens_read.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        second = session.ask("tell me more")
    finally:
        handle.remove()
    history.append({"role": "user", "content": "tell me more"})
    assert second.text == greedy_reply(model, tokenizer, history)
    assert tokens_read[0] < len(chat_prompt_ids(tokenizer, history)), "the whole history was read again"
    assert session.messages == [*history, {"role": "assistant", "content": second.text}]


def test_reset_forgets_the_conversation(model, tokenizer):
    session = ChatSession(model, tokenizer, GREEDY, system="Be brief.")
    session.ask("hello")
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]
    messages = [*session.messages, {"role": "user", "content": "why?"}]
    assert session.ask("why?").text == greedy_reply(model, tokenizer, messages)


def test_ctrl_c_stops_the_answer_not_the_program(model, tokenizer):
    session = ChatSession(model, tokenizer, SamplingParams(max_new_tokens=200, temperature=0))
    shown = []

    def show_then_press_ctrl_c(delta):
        shown.append(delta)
        if len(shown) == 1:
            signal.raise_signal(signal.SIGINT)  # as the terminal does on Ctrl-C

    cancel = threading.Event()
    with ctrl_c_sets(cancel):
        result = session.ask("tell me everything", on_text=show_then_press_ctrl_c, cancel=cancel)
    assert result.finish_reason == "cancelled" and len(result.token_ids) < 200
    assert result.text == "".join(shown)  # stopped at the token that was on screen
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert session.messages[-1] == {"role": "assistant", "content": result.text}


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def screen_reply(before: str) -> str:
    """The answer on screen between the echoed input line and the next prompt."""
    text = ANSI_ESCAPE.sub("", before).replace("\r\n", "\n")
    echoed, _, reply = text.partition("\n")
    assert reply.endswith("\n\n"), repr(text)
    return reply[:-2]


def test_chat_in_a_terminal(tiny_store16, model, tokenizer):
    env = {**os.environ, "TERM": "dumb", "HF_HUB_OFFLINE": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "moe_offload", "chat", str(tiny_store16),
                                           "--temperature", "0", "--max-tokens", "8"],
                          env=env, encoding="utf-8", timeout=60)
    try:
        child.expect_exact(PROMPT)
        history = []
        for question in ("hello", "tell me more"):
            child.sendline(question)
            child.expect_exact(PROMPT)
            history.append({"role": "user", "content": question})
            expected = greedy_reply(model, tokenizer, history)
            assert screen_reply(child.before) == expected.replace("\r\n", "\n")
            history.append({"role": "assistant", "content": expected})

        child.sendintr()  # Ctrl-C at the prompt: a fresh prompt, not an exit
        child.expect_exact(PROMPT)
        child.sendline("/stats")
        child.expect("hit rate")
        child.expect_exact(PROMPT)
        child.sendline("/reset")
        child.expect_exact("cleared")
        child.expect_exact(PROMPT)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert "Traceback" not in child.before

"""`moe-offload serve` against the official openai client, on a live server and a tiny model."""
from __future__ import annotations

import collections
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
import uvicorn
from transformers import AutoTokenizer

import moe_offload
from moe_offload.cli import main
from moe_offload.server import Engine, ServerSettings, create_app

API_KEY = "test-key"
MODEL = "tiny-moe"
MAX_QUEUE = 8
MAX_TOKENS_LIMIT = 64


@pytest.fixture(scope="module")
def store(tiny_store16):
    return tiny_store16


@pytest.fixture(scope="module")
def reference(store):
    """A model of its own (the server's belongs to its worker) for expected greedy outputs."""
    model = moe_offload.load(store)
    yield Reference(model, AutoTokenizer.from_pretrained(store))
    model.close()


class Reference:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def chat_ids(self, messages) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=True, return_dict=False)

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[str, list[int]]:
        """Plain `load(...).generate`, the answer the server must reproduce."""
        ids = torch.tensor([prompt_ids])
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, len(prompt_ids):].tolist()
        return self.tokenizer.decode(new, skip_special_tokens=True), new


class LiveServer:
    """uvicorn in a thread on a port the OS picked; the test can reach its engine."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:  # uvicorn offers no event for this
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def engine(store):
    engine = Engine(moe_offload.load(store), AutoTokenizer.from_pretrained(store), max_queue=MAX_QUEUE)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(engine):
    settings = ServerSettings(model_name=MODEL, api_key=API_KEY, max_tokens_limit=MAX_TOKENS_LIMIT,
                              max_queue=MAX_QUEUE)
    live = LiveServer(create_app(engine, settings))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    # No retries: a 429 or a dropped request must show, not be papered over.
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def request(server, method, path, body=None, headers=None):
    """Raw HTTP, for what the openai client will not send (bad JSON, missing keys...)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json",
               **(headers or {})}
    data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
    conn.request(method, path, body=data, headers={k: v for k, v in headers.items() if v is not None})
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    content_type = response.getheader("content-type", "")
    payload = json.loads(raw) if content_type.startswith("application/json") else raw.decode()
    return response.status, dict(response.getheaders()), payload


def chat(client, messages, stream=False, **kwargs) -> tuple[str, str, object]:
    """(text, finish_reason, usage) of a chat completion, streamed or not."""
    kwargs = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 12, **kwargs}
    if not stream:
        r = client.chat.completions.create(**kwargs)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    return text, chunks[-1].choices[0].finish_reason, chunks[-1].usage


def complete(client, prompt, stream=False, **kwargs) -> tuple[str, str, object]:
    kwargs = {"model": MODEL, "prompt": prompt, "temperature": 0, "max_tokens": 12, **kwargs}
    if not stream:
        r = client.completions.create(**kwargs)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage
    chunks = list(client.completions.create(stream=True, **kwargs))
    return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason, chunks[-1].usage


def finish_reason_for(token_ids, max_tokens) -> str:
    return "length" if len(token_ids) == max_tokens else "stop"


MESSAGES = [[{"role": "user", "content": "Tell me about experts."}],
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "What is a cache?"}]]


def test_health_and_models(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    status, _, body = request(server, "GET", "/health", headers={"Authorization": None})
    assert status == 200 and body["status"] == "ok"


@pytest.mark.parametrize("messages", MESSAGES)
def test_chat_streamed_equals_whole_equals_generate(client, reference, messages):
    prompt_ids = reference.chat_ids(messages)
    expected, new_ids = reference.greedy(prompt_ids, 12)
    for stream in (False, True):
        text, finish, usage = chat(client, messages, stream=stream, seed=3)
        assert text == expected
        assert finish == finish_reason_for(new_ids, 12)
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt_ids), len(new_ids))
        assert usage.total_tokens == len(prompt_ids) + len(new_ids)


@pytest.mark.parametrize("prompt", ["The router picks", "def load(store):"])
def test_completions_streamed_equals_whole_equals_generate(client, reference, prompt):
    prompt_ids = reference.tokenizer(prompt).input_ids
    expected, new_ids = reference.greedy(prompt_ids, 12)
    for stream in (False, True):
        text, finish, usage = complete(client, prompt, stream=stream)
        assert text == expected
        assert finish == finish_reason_for(new_ids, 12)
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt_ids), len(new_ids))
    assert complete(client, prompt_ids)[0] == expected  # token ids work as a prompt too


def test_stop_is_honoured(client, reference):
    prompt = "Experts are"
    expected, _ = reference.greedy(reference.tokenizer(prompt).input_ids, 24)
    # Two characters from the middle of the answer (no U+FFFD: a partial character decodes to it).
    starts = [i for i in range(1, len(expected) - 1)
              if expected[i:i + 2].strip() and "\ufffd" not in expected[i:i + 2]]
    assert starts, "the tiny model's answer is too short to cut"
    stop = expected[starts[len(starts) // 2]:starts[len(starts) // 2] + 2]
    cut = expected[:expected.index(stop)]
    for stream in (False, True):
        for stop_param in (stop, ["never-produced", stop]):
            text, finish, _ = complete(client, prompt, stream=stream, max_tokens=24, stop=stop_param)
            assert (text, finish) == (cut, "stop")
    text, finish, _ = chat(client, MESSAGES[0], stop=["\x00never"])  # a stop never met changes nothing
    assert finish in ("stop", "length") and text == chat(client, MESSAGES[0])[0]


def test_seeded_sampling_repeats(client):
    sampled = [chat(client, MESSAGES[0], stream=stream, temperature=0.9, top_p=0.9, seed=7)[0]
               for stream in (False, True, False)]
    assert sampled[0] == sampled[1] == sampled[2]


def test_eight_concurrent_clients_all_correct(client, reference):
    prompts = [[{"role": "user", "content": f"Question number {i}: why offload?"}] for i in range(8)]
    expected = [reference.greedy(reference.chat_ids(m), 10)[0] for m in prompts]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: chat(client, prompts[i], stream=i % 2 == 1, max_tokens=10)[0],
                                range(8)))
    assert answers == expected


class Gate:
    """Holds the worker inside the model's forward until opened: a request that stays running."""

    def __init__(self, model):
        self.entered, self.opened = threading.Event(), threading.Event()
        self.handle = model.register_forward_pre_hook(self._hold)

    def _hold(self, module, args):
        self.entered.set()
        self.opened.wait(timeout=60)

    def open(self):
        self.opened.set()
        self.handle.remove()


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():  # polls a state the server exposes; there is no event to wait on
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_queue_overflow_gets_429_with_retry_after(server, engine, client):
    gate = Gate(engine.model)
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": 0}
    try:
        with ThreadPoolExecutor(MAX_QUEUE + 1) as pool:
            running = pool.submit(request, server, "POST", "/v1/completions", body)
            assert gate.entered.wait(10)
            waiting = [pool.submit(request, server, "POST", "/v1/completions", body)
                       for _ in range(MAX_QUEUE)]
            wait_until(lambda: engine.queue_depth == MAX_QUEUE)
            status, headers, error = request(server, "POST", "/v1/completions", body)
            assert status == 429 and int(headers["retry-after"]) >= 1
            assert error["error"]["type"] == "rate_limit_error"
            with pytest.raises(openai.RateLimitError):
                client.completions.create(**body)
            gate.open()
            assert [f.result()[0] for f in [running, *waiting]] == [200] * (MAX_QUEUE + 1)
    finally:
        gate.open()


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_disconnect_frees_the_model(server, engine, stream):
    # Make each token take 0.1 s, like a big model: the abandoned answer would need ~6 s more.
    handle = engine.model.register_forward_pre_hook(lambda module, args: time.sleep(0.1))
    try:
        tokens_before = engine.counters["generated_tokens"]
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps(
            {"model": MODEL, "prompt": "Once", "max_tokens": 60, "temperature": 0, "stream": stream}),
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
        events = 0
        if stream:
            response = conn.getresponse()
            assert response.status == 200
            while events < 2:
                events += response.readline().startswith(b"data: ")
            response.close()
        else:
            wait_until(lambda: engine.busy)
        conn.close()
        started = time.monotonic()
        status, _, body = request(server, "POST", "/v1/completions",
                                  {"model": MODEL, "prompt": "Next", "max_tokens": 1})
        assert status == 200 and body["usage"]["completion_tokens"] == 1
        assert time.monotonic() - started < 3.0
        abandoned = engine.counters["generated_tokens"] - tokens_before - 1
        assert abandoned <= events + 4, f"the abandoned answer ran on for {abandoned} tokens"
    finally:
        handle.remove()


def test_a_failing_model_gives_a_clean_error_and_the_server_carries_on(server, engine, client, capfd):
    def fail(module, args):
        raise RuntimeError("the disk went away")

    handle = engine.model.register_forward_pre_hook(fail)
    try:
        status, _, body = request(server, "POST", "/v1/completions",
                                  {"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert status == 500 and body["error"]["type"] == "server_error"
        assert "the disk went away" in body["error"]["message"]
        with pytest.raises(openai.APIError, match="the disk went away"):
            list(client.completions.create(model=MODEL, prompt="hi", max_tokens=2, stream=True))
    finally:
        handle.remove()
    assert complete(client, "hi", max_tokens=2)[2].completion_tokens == 2
    assert "Traceback" not in capfd.readouterr().err


def test_an_unexpected_exception_is_an_openai_error_not_a_traceback(capfd):
    class BrokenTokenizer:
        def __call__(self, text):
            raise ValueError("tokenizer exploded")

    engine = type("EngineStub", (), {"tokenizer": BrokenTokenizer(), "queue_depth": 0})()
    live = LiveServer(create_app(engine, ServerSettings(model_name=MODEL)))
    try:
        status, _, body = request(live, "POST", "/v1/completions", {"model": MODEL, "prompt": "hi"})
    finally:
        live.stop()
    assert status == 500 and body["error"]["type"] == "server_error"
    assert "tokenizer exploded" in body["error"]["message"]
    assert "Traceback" not in capfd.readouterr().err


BAD_CHAT_BODIES = {
    "malformed json": b'{"model": "tiny-moe", "messages": [',
    "not an object": b"[1, 2, 3]",
    "messages not a list": {"model": MODEL, "messages": "hello"},
    "max_tokens wrong type": {"model": MODEL, "messages": MESSAGES[0], "max_tokens": "many"},
    "temperature wrong type": {"model": MODEL, "messages": MESSAGES[0], "temperature": "hot"},
    "negative max_tokens": {"model": MODEL, "messages": MESSAGES[0], "max_tokens": -5},
    "zero max_tokens": {"model": MODEL, "messages": MESSAGES[0], "max_tokens": 0},
    "huge max_tokens": {"model": MODEL, "messages": MESSAGES[0], "max_tokens": 10**12},
    "empty messages": {"model": MODEL, "messages": []},
    "no model": {"messages": MESSAGES[0]},
    "unknown model": {"model": "gpt-17", "messages": MESSAGES[0]},
    "unknown role": {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]},
    "image content": {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
    "n > 1": {"model": MODEL, "messages": MESSAGES[0], "n": 2},
    "tools": {"model": MODEL, "messages": MESSAGES[0], "tools": [{"type": "function"}]},
    "logprobs": {"model": MODEL, "messages": MESSAGES[0], "logprobs": True},
    "unknown parameter": {"model": MODEL, "messages": MESSAGES[0], "best_answer": True},
    "five stop strings": {"model": MODEL, "messages": MESSAGES[0], "stop": list("abcde")},
    "temperature out of range": {"model": MODEL, "messages": MESSAGES[0], "temperature": 7},
}


def assert_openai_error(status, body, expected_status=None):
    assert 400 <= status < 500 and (expected_status is None or status == expected_status)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@pytest.mark.parametrize("case", BAD_CHAT_BODIES)
def test_bad_chat_requests_get_openai_errors(server, case):
    status, _, body = request(server, "POST", "/v1/chat/completions", BAD_CHAT_BODIES[case])
    assert_openai_error(status, body, 404 if case == "unknown model" else 400)


@pytest.mark.parametrize("body", [
    {"model": MODEL, "prompt": [10**9]},  # a token id outside the vocabulary
    {"model": MODEL, "prompt": ["one", "two"]},  # batches are not supported
    {"model": MODEL, "prompt": []},
    {"model": MODEL, "prompt": "hi", "echo": True},
    {"model": MODEL, "prompt": "hi", "best_of": 3},
], ids=["token out of range", "two prompts", "empty prompt", "echo", "best_of"])
def test_bad_completion_requests_get_openai_errors(server, body):
    assert_openai_error(*request(server, "POST", "/v1/completions", body)[::2], 400)


def test_prompt_and_max_tokens_beyond_the_context_are_refused(server, engine):
    context = engine.model.config.max_position_embeddings
    too_long = {"model": MODEL, "prompt": [5] * context}
    status, _, body = request(server, "POST", "/v1/completions", too_long)
    assert_openai_error(status, body, 400)
    assert body["error"]["code"] == "context_length_exceeded"
    if context - 4 < MAX_TOKENS_LIMIT:  # only reachable when the context is small
        status, _, body = request(server, "POST", "/v1/completions",
                                  {"model": MODEL, "prompt": [5] * 8, "max_tokens": context - 4})
        assert_openai_error(status, body, 400)


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic dGVzdC1rZXk=", "Bearer"])
def test_wrong_api_key_gets_401(server, authorization):
    for method, path, body in [("GET", "/v1/models", None), ("GET", "/metrics", None),
                               ("POST", "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES[0]})]:
        status, headers, error = request(server, method, path, body, {"Authorization": authorization})
        assert_openai_error(status, error, 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="wrong", max_retries=0).models.list()


def test_unknown_routes_and_methods_get_openai_errors(server):
    assert_openai_error(*request(server, "GET", "/v1/engines")[::2], 404)
    assert_openai_error(*request(server, "GET", "/v1/chat/completions")[::2], 405)


def test_metrics_in_prometheus_format(server, engine, client):
    chat(client, MESSAGES[0], max_tokens=3)
    status, headers, text = request(server, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            name, value = re.fullmatch(r"([a-z_]+(?:\{.*\})?) (\S+)", line).groups()
            samples[name] = float(value)
    assert samples['moe_offload_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert samples["moe_offload_generated_tokens_total"] >= 3
    assert samples["moe_offload_queue_depth"] == 0
    stats = engine.model.offload_stats().as_dict()
    for key, metric in [("hit_rate", "expert_cache_hit_rate"), ("prefetch_precision", "prefetch_precision"),
                        ("prefetch_recall", "prefetch_recall"), ("stall_seconds", "stall_seconds_total"),
                        ("resident_experts", "resident_experts"),
                        ("decode_tokens_per_s", "decode_tokens_per_second")]:
        if isinstance(stats.get(key), (int, float)):
            assert f"moe_offload_{metric}" in samples
    for tier in stats.get("bytes_read", {}):
        assert f'moe_offload_bytes_read_total{{tier="{tier}"}}' in samples
    for part in ("libraries", "dense", "expert_cache", "rest"):
        assert f'moe_offload_memory_bytes{{part="{part}"}}' in samples


def test_schemathesis_finds_no_server_error(server):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    failures, calls = [], collections.Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in schemathesis.GenerationMode:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=10, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def no_server_error(case):
                if mode is schemathesis.GenerationMode.POSITIVE and isinstance(case.body, dict):
                    case.body["model"] = MODEL  # else every valid body is just an unknown model
                response = case.call(base_url=server.base_url, timeout=60,
                                     headers={"Authorization": f"Bearer {API_KEY}"})
                calls[operation.label, response.status_code // 100] += 1
                if response.status_code >= 500:
                    failures.append((operation.label, case.body, response.status_code, response.text))

            try:
                no_server_error()
            except Unsatisfiable:  # no invalid input exists for an operation without parameters
                assert mode is schemathesis.GenerationMode.NEGATIVE
    assert not failures, failures[:3]
    for endpoint in ("POST /v1/chat/completions", "POST /v1/completions"):
        assert calls[endpoint, 2] > 0 and calls[endpoint, 4] > 0, calls


def test_command_line_serves_and_stops_cleanly(store):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "moe_offload", "serve", str(store), "--port", "0",
                             "--api-key", API_KEY, "--model-name", MODEL],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        banner = ""
        while "Serving" not in banner:
            banner = proc.stdout.readline()
            assert banner or proc.poll() is None, proc.stderr.read()
        port = int(re.search(r"127\.0\.0\.1:(\d+)/v1", banner).group(1))
        live = type("Live", (), {"port": port})()
        wait_until(lambda: _health(port) == 200, timeout=30)
        assert request(live, "GET", "/v1/models", headers={"Authorization": None})[0] == 401
        assert request(live, "GET", "/v1/models")[2]["data"][0]["id"] == MODEL
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
        assert "Traceback" not in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def _health(port) -> int | None:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        return conn.getresponse().status
    except OSError:
        return None


def test_command_line_errors_are_messages(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing"), "--port", "0"]) != 0
    assert "no such store" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", str(tmp_path), "--port", str(busy.getsockname()[1])]) != 0
        assert "choose another --port" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--max-queue", "0"]) != 0
    assert "--max-queue must be at least 1" in capsys.readouterr().err

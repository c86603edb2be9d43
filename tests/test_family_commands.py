"""Everything else follows the model: generate (with each tokenizer's chat template), verify, the
server and the statistics work for every named family; the CLI and bench for one far from Mixtral."""
import json

import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

import moe_offload
from conftest import run_cli
from families import NAMED
from moe_offload.generate import generate_once
from moe_offload.server import Engine, ServerSettings, create_app
from moe_offload.store import Store
from moe_offload.synthetic import build_random_moe, tiny_moe_config


@pytest.fixture(scope="module", params=list(NAMED))
def family_store(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    src = build_random_moe(root / "src", tiny_moe_config(request.param, **{**NAMED[request.param], "vocab_size": 512}), seed=5)
    return request.param, moe_offload.convert(src, root / "store", expert_bits=4, dense_bits=4, progress=False)


def test_generate_verify_and_serve(family_store):
    family, store = family_store
    st = Store.open(store)
    st.verify()
    result = generate_once(store, "Where is the moon?", chat=True, max_new_tokens=4, stream=False,
                           experts_per_layer=st.top_k)
    assert result["completion_tokens"] == 4 or result["finish_reason"] == "stop", family
    stats = result["stats"]
    assert stats["moe_layers"] == st.moe_layers and len(stats["hits_per_layer"]) == len(st.moe_layers)
    assert stats["hits"] + stats["misses"] > 0

    model = moe_offload.load(store, experts_per_layer=st.top_k)
    engine = Engine(model, AutoTokenizer.from_pretrained(store), max_queue=2)
    try:
        client = TestClient(create_app(engine, ServerSettings(model_name=family)))
        r = client.post("/v1/chat/completions", json={"model": family, "max_tokens": 3, "temperature": 0,
                                                      "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
        assert "moe_offload_bytes_read_total" in client.get("/metrics").text
    finally:
        engine.close()
        model.close()


def test_cli_on_a_family_far_from_mixtral(tmp_path):
    """gpt-oss: transposed, interleaved, biased experts with a clamped SwiGLU, sliding layers."""
    src = build_random_moe(tmp_path / "src", tiny_moe_config("gpt_oss", **{**NAMED["gpt_oss"], "vocab_size": 512}), seed=6)
    convert = run_cli("convert", src, tmp_path / "store", "--expert-bits", "4")
    assert convert.returncode == 0, convert.stderr
    assert "family gpt_oss: 3 MoE layer(s), 10 experts per layer, top-3" in convert.stderr
    for args in (("verify",), ("generate", "--prompt", "Hello", "--chat", "--max-new-tokens", "3", "--json")):
        result = run_cli(args[0], tmp_path / "store", *args[1:])
        assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["completion_tokens"] >= 1
    bench = run_cli("bench", tmp_path / "store", "--modes", "resident,offload", "--prompts", "1",
                    "--max-new-tokens", "3", "--in-process", "--no-plan", "--json", tmp_path / "b.json")
    assert bench.returncode == 0, bench.stderr
    assert set(json.loads((tmp_path / "b.json").read_text())["modes"]) == {"resident", "offload"}

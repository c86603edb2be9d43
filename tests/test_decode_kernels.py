"""The decode path outside the experts: attention (attention_decode.py) and RMSNorm (norm_decode.py)
in numba kernels, each next to its plain reference, and each checking itself against transformers'
own forward on its first call."""
import collections

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import moe_offload
from families import NAMED
from moe_offload import attention_decode, decode_path, kernels, kernels_layer, norm_decode, router_decode
from moe_offload.kernels_layer import quantize_rowtile
from moe_offload.model import STOCK_DECODE
from moe_offload.prefetch import Prefetcher
from moe_offload.store import Store
from moe_offload.synthetic import build_random_moe, tiny_moe_config

STEPS = 16


def _logits(model, seq, prompt):
    """Teacher-forced logits: the prompt at once, then one token at a time (the decode path)."""
    with torch.no_grad():
        out = model(seq[:, :prompt], use_cache=True)
        logits = [out.logits[0, -1]]
        for i in range(prompt, seq.shape[1]):
            out = model(seq[:, i:i + 1], cache=out.past_key_values, use_cache=True)
            logits.append(out.logits[0, -1])
    return torch.stack(logits)


def _paths(model):
    return collections.Counter((type(m._decode_path).__name__, m._decode_path.verified)
                               for m in model.modules() if hasattr(m, "_decode_path"))


@pytest.mark.parametrize("family,overrides,routers,plain_blocks", [
    ("mixtral", {"sliding_window": None}, True, True),  # GQA
    ("qwen3_moe", {}, True, True),  # q/k RMSNorm per head; a dense MLP layer between MoE layers
    ("qwen2_moe", {}, True, False),  # q/k/v bias; a shared expert in the MoE block
    ("olmoe", {}, True, True),  # q/k RMSNorm over the whole projection
    ("glm4_moe", {}, False, False),  # rotary embedding on part of each head; a grouped sigmoid router
])
def test_decode_kernels_match_transformers(family, overrides, routers, plain_blocks, tmp_path, monkeypatch):
    config = tiny_moe_config(family, **{**NAMED[family], **overrides})
    src = build_random_moe(tmp_path / "src", config, seed=4, tokenizer=False)
    store = moe_offload.convert(src, tmp_path / "st", expert_bits=4, dense_bits=4, progress=False)
    assert Store.open(store).manifest["dense_linears"], "the dense projections must be quantized (rowtile)"
    torch.manual_seed(0)
    seq = torch.randint(3, config.vocab_size, (1, 9 + STEPS))
    experts = Store.open(store).num_experts
    monkeypatch.setenv(STOCK_DECODE, "1")
    # (prefetch off in both: whether a guess reads depends on timing, which these counts must not)
    stock = moe_offload.load(store, experts_per_layer=experts, prefetch=0)
    try:
        assert not _paths(stock)
        expected = _logits(stock, seq, 9)
        stock_stats = stock.offload_stats().as_dict()
    finally:
        stock.close()
    monkeypatch.delenv(STOCK_DECODE)
    calls, fused = [], []
    real, real_fused = attention_decode._attend, attention_decode.attend_route
    monkeypatch.setattr(attention_decode, "_attend", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(attention_decode, "attend_route", lambda *a: fused.append(1) or real_fused(*a))
    model = moe_offload.load(store, experts_per_layer=experts, prefetch=0)
    try:
        got = _logits(model, seq, 9)
        paths = _paths(model)
        stats = model.offload_stats().as_dict()
        layers = [m._decode_path for m in model.modules() if type(getattr(m, "_decode_path", None)).__name__ == "_LayerPath"]
    finally:
        model.close()
    # every decoder layer checked itself against its own forward (which it ran once, not twice:
    # the cache saw the same requests)
    assert len(layers) == config.num_hidden_layers and all(p.verified for p in layers)
    plain = [p.plain_block for p in layers if p.router is not None]  # MoE blocks of a router and experts only
    assert (plain and all(plain)) if plain_blocks else not any(plain)
    assert (stats["hits_per_layer"], stats["misses_per_layer"]) == (stock_stats["hits_per_layer"], stock_stats["misses_per_layer"])
    n_attn = config.num_hidden_layers
    assert paths[("_DecodePath", True)] == n_attn and paths[("_NormPath", True)] >= 2 * n_attn + 1, paths
    assert paths[("_LayerPath", True)] == n_attn, paths
    assert paths[("_RouterPath", True)] == (len(Store.open(store).moe_layers) if routers else 0), paths
    assert not any(v is False for _, v in paths), paths
    # every layer's first decode step is the check (transformers' forward, then the kernels on its
    # cache, then again on the cache with the kernels' keys and values); the rest run the kernels
    # (the fused layer step attends in attend_route; the prefetcher's residual hook only observes, so
    # the fused step runs it itself)
    assert len(fused) == sum(1 for p in layers if p.plain_block) * (STEPS - 2)
    assert len(calls) + len(fused) == n_attn * (STEPS - 1) + 2 * n_attn
    diffs = (got - expected).abs().amax(-1) / expected.abs().max()
    assert diffs[0] <= 1e-5  # the prompt: transformers' attention, our norms (float rounding)
    # float rounding (~1e-7); an int8 activation that rounds the other way moves a step by up to ~1e-3
    assert diffs.median() <= 1e-5 and diffs.max() <= 2e-2, diffs

    # Every layer whose block is a router and experts takes the fused step (layer_decode._fused), with
    # the children's own floats, bit for bit; a prefetcher is handed the same residual streams as with
    # the children called one by one (whether a guess then reads depends on the loads' timing).
    def run(fuse: bool, **options):
        model = moe_offload.load(store, **options)
        streams = []
        real_guess = Prefetcher.guess
        monkeypatch.setattr(Prefetcher, "guess", lambda self, layer, residual: streams.append(
            (layer, residual.clone())) or real_guess(self, layer, residual))
        try:
            for m in model.modules():
                if type(getattr(m, "_decode_path", None)).__name__ == "_LayerPath":
                    m._decode_path.fused = fuse
            before = len(fused)
            return _logits(model, seq, 9), len(fused) - before, streams, model.offload_stats().as_dict()
        finally:
            monkeypatch.setattr(Prefetcher, "guess", real_guess)
            model.close()
    n_plain = sum(1 for p in layers if p.plain_block)
    for options in (dict(experts_per_layer=experts, prefetch=0),
                    dict(experts_per_layer=config.num_experts_per_tok + 1, prefetch=2)):
        (with_fused, n_fused, fused_streams, fused_stats), (unfused, n_unfused, unfused_streams, _) = (
            run(True, **options), run(False, **options))
        # (a layer's first decode step checks its attention, the second the layer; then every step is fused)
        assert n_fused == n_plain * (STEPS - 2) and n_unfused == 0
        assert torch.equal(with_fused, unfused)
        assert len(fused_streams) == len(unfused_streams) >= (STEPS + 1) * (options["prefetch"] > 0)
        assert all(a == b and x.shape == y.shape and torch.equal(x.reshape(-1), y.reshape(-1))
                   for (a, x), (b, y) in zip(fused_streams, unfused_streams))
        assert (fused_stats["prefetch_guesses"] > 0) == (options["prefetch"] > 0)

def _plan(heads, kv_heads, hd, H, bits, group, bias, norm, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = (heads * hd, H), (kv_heads * hd, H), (kv_heads * hd, H), (H, heads * hd)
    qms = tuple(quantize_rowtile(torch.randn(*s, generator=g) * 0.1, bits, group, optimize=False) for s in shapes)
    biases = tuple(torch.randn(s[0], generator=g).numpy() if bias else attention_decode._empty() for s in shapes)
    width = {"none": 0, "head": hd, "whole": None}[norm]
    norms = tuple(attention_decode._empty() if width == 0 else
                  (torch.rand(width or n * hd, generator=g) + 0.5).numpy() for n in (heads, kv_heads))
    return attention_decode._Plan(qms, tuple(m.tensors["tiles"].numpy() for m in qms), biases, norms, 1e-6,
                                  heads, kv_heads, hd, hd ** -0.5, kernels_layer._tag(kernels_layer.variant()))


def _projection_reference(p, x, cos, sin):
    out = []
    for m, b, w, n in zip(p.qms[:3], p.biases[:3], p.norms + (attention_decode._empty(),), (p.heads, p.kv_heads, p.kv_heads)):
        y = kernels_layer.linear_reference(torch.from_numpy(x)[None], m)[0]
        if b.size:
            y = y + torch.from_numpy(b)
        if w.size:
            y = y.view(-1, w.size)
            y = torch.from_numpy(w) * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + p.eps))
        y = y.reshape(n, p.head_dim)
        if w is not None and m is not p.qms[2]:
            r, c, s = cos.size, torch.from_numpy(cos), torch.from_numpy(sin)
            rot, rest = y[:, :r], y[:, r:]
            rotated = torch.cat([-rot[:, r // 2:], rot[:, :r // 2]], -1)
            y = torch.cat([rot * c + rotated * s, rest], -1)
        out.append(y.reshape(-1))
    return out


@pytest.mark.parametrize("heads,kv_heads,hd,H,S,bits,group,bias,norm,rotary", [
    (4, 2, 32, 64, 1, 4, 32, False, "none", 1.0),
    (6, 3, 16, 96, 7, 4, 32, True, "head", 1.0),
    (4, 1, 64, 128, 33, 3, 64, False, "whole", 0.5),  # MQA, partial rotary
    (8, 8, 32, 256, 300, 8, 128, True, "head", 1.0),
    (2, 2, 32, 32, 2, 2, 32, False, "none", 1.0),
])
def test_attention_kernels_match_their_reference(heads, kv_heads, hd, H, S, bits, group, bias, norm, rotary):
    p = _plan(heads, kv_heads, hd, H, bits, group, bias, norm, seed=S)
    g = torch.Generator().manual_seed(100 + S)
    x = torch.randn(H, generator=g).numpy()
    r = int(hd * rotary)
    angle = torch.rand(r // 2, generator=g) * 6
    cos, sin = torch.cat([angle.cos(), angle.cos()]).numpy(), torch.cat([angle.sin(), angle.sin()]).numpy()
    q, k, v = (a.copy() for a in attention_decode._project(p, x, cos, sin))
    for got, ref in zip((q, k, v), _projection_reference(p, x, cos, sin)):
        assert decode_path.close(torch.from_numpy(got), ref, 1e-5), (got - ref.numpy()).max()
    keys = torch.randn(1, kv_heads, S, hd, generator=g)
    values = torch.randn(1, kv_heads, S, hd, generator=g)
    keys[0, :, -1], values[0, :, -1] = torch.from_numpy(k).view(kv_heads, hd), torch.from_numpy(v).view(kv_heads, hd)
    y, core = attention_decode._attend(p, q, keys, values)
    core = torch.from_numpy(core)
    assert decode_path.close(core, attention_decode.attention_reference(torch.from_numpy(q), keys, values, p.scale),
                                   1e-5)
    expected = kernels_layer.linear_reference(core[None], p.qms[3])[0] + (torch.from_numpy(p.biases[3]) if bias else 0)
    assert decode_path.close(torch.from_numpy(y), expected, 1e-5)


@pytest.mark.parametrize("rows,H", [(1, 48), (3, 1000), (1, 1024), (7, 32)])
def test_rms_norm_kernel_matches_its_reference(rows, H):
    g = torch.Generator().manual_seed(rows * H)
    x, w = torch.randn(rows, H, generator=g) * 3, torch.rand(H, generator=g) + 0.5
    y = np.empty((rows, H), np.float32)
    decode_path.jit().rms_norm_rows(x.numpy(), w.numpy(), 1e-6, y)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert decode_path.close(torch.from_numpy(y), ref, 2e-6)


@pytest.mark.parametrize("E,H,k,bias", [(8, 64, 2, False), (128, 96, 8, True), (4, 32, 1, False), (3, 32, 3, True)])
def test_router_kernel_matches_its_reference(E, H, k, bias):
    g = torch.Generator().manual_seed(E * k)
    x, w = torch.randn(H, generator=g), torch.randn(E, H, generator=g) * 0.3
    b = torch.randn(E, generator=g) if bias else None
    logits = F.linear(x, w, b)
    top, idx = torch.softmax(logits, -1).topk(k)
    for renorm in (True, False):
        out = np.empty(E, np.float32), np.empty(k, np.float32), np.empty(k, np.int64)
        decode_path.jit().topk_router(x.numpy(), w.numpy(), b.numpy() if bias else np.zeros(0, np.float32), k,
                                            renorm, *out)
        assert decode_path.close(torch.from_numpy(out[0]), logits, 1e-6)
        assert torch.equal(torch.from_numpy(out[2]), idx)
        assert decode_path.close(torch.from_numpy(out[1]), top / top.sum() if renorm else top, 1e-6)


@pytest.fixture(scope="module")
def qwen3_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3")
    config = tiny_moe_config("qwen3_moe", **NAMED["qwen3_moe"])
    src = build_random_moe(root / "src", config, seed=5, tokenizer=False)
    return moe_offload.convert(src, root / "st", expert_bits=4, dense_bits=4, progress=False), config


def test_a_module_that_computes_otherwise_keeps_transformers_forward(qwen3_store):
    """The self-check is what makes the path safe for families it was not written for: a module whose
    forward does something else (here: doubles its output, a norm scaling by 1 + weight, a router
    with sigmoid weights, a decoder layer adding a term of its own) fails the check on its first
    call and stays on its own forward; a layer whose children stay on theirs never takes the path."""
    store, config = qwen3_store
    model = moe_offload.load(store, experts_per_layer=Store.open(store).num_experts)
    try:
        attn = next(m for m in model.modules() if isinstance(getattr(m, "_decode_path", None), attention_decode._DecodePath))
        norm = next(m for m in model.modules() if isinstance(getattr(m, "_decode_path", None), norm_decode._NormPath))
        router = next(m for m in model.modules() if isinstance(getattr(m, "_decode_path", None), router_decode._RouterPath))
        a_path, n_path, r_path = attn._decode_path, norm._decode_path, router._decode_path
        a_orig, n_orig, r_orig = a_path.original, n_path.original, r_path.original
        a_path.original = lambda *a, **k: (lambda o: (o[0] * 2, o[1]))(a_orig(*a, **k))
        n_path.original = lambda x: n_orig(x) + x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + n_path.eps)

        def sigmoid_router(x):  # DeepSeek-style scores: the same experts, other weights
            logits, _, idx = r_orig(x)
            return logits, torch.sigmoid(logits).gather(-1, idx), idx
        r_path.original = sigmoid_router
        first, _, third = (layer._decode_path for layer in model.model.layers)
        assert attn in first.module.modules() and norm in first.module.modules() and router in first.module.modules()
        l_orig = third.original
        third.original = lambda x, **kw: l_orig(x, **kw) + 1e-3 * x  # e.g. a scaled residual
        seq = torch.randint(3, config.vocab_size, (1, 8))
        _logits(model, seq, 5)
        assert a_path.verified is False and "output" in a_path.why
        assert n_path.verified is False and r_path.verified is False
        assert first.verified is None and third.verified is False
        others = [m._decode_path.verified for m in model.modules() if hasattr(m, "_decode_path")
                  and m._decode_path not in (a_path, n_path, r_path, first, third)]
        assert others and all(others)
    finally:
        model.close()


def test_calls_the_kernels_do_not_cover_go_to_transformers(qwen3_store, monkeypatch):
    """Prompts, batches of two, masks with padding, and kernels.use_reference() never reach the kernels."""
    store, config = qwen3_store
    calls = []
    real = attention_decode._attend
    monkeypatch.setattr(attention_decode, "_attend", lambda *a: calls.append(1) or real(*a))
    model = moe_offload.load(store, experts_per_layer=Store.open(store).num_experts)
    try:
        ids = torch.randint(3, config.vocab_size, (2, 6))
        mask = torch.ones_like(ids)
        mask[1, 0] = 0
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
        model.generate(ids, attention_mask=mask, **kw)
        with kernels.use_reference():
            model.generate(ids[:1], **kw)
        assert not calls
        model.generate(ids[:1], **kw)
        assert calls  # the same model does take the path for one sequence
    finally:
        model.close()


def test_the_paths_follow_tensors_that_change(qwen3_store):
    """Weights replaced by assignment or moved by .to() are read again, not served from a stale array."""
    store, config = qwen3_store
    model = moe_offload.load(store, experts_per_layer=Store.open(store).num_experts)
    try:
        seq = torch.randint(3, config.vocab_size, (1, 8))
        _logits(model, seq, 5)  # every path checked and in use
        norm = next(m for m in model.modules() if isinstance(getattr(m, "_decode_path", None), norm_decode._NormPath))
        router = next(m for m in model.modules() if isinstance(getattr(m, "_decode_path", None), router_decode._RouterPath))
        x = torch.randn(1, 1, norm.weight.shape[0])
        with torch.no_grad():
            norm.weight = torch.nn.Parameter(norm.weight * 3, requires_grad=False)
            router.weight = torch.nn.Parameter(router.weight.flip(0), requires_grad=False)
            assert decode_path.close(norm(x), norm._decode_path.original(x), 1e-5)
            h = torch.randn(1, router.weight.shape[1])
            got, ref = router(h), router._decode_path.original(h)
            assert torch.equal(got[2], ref[2]) and decode_path.close(got[1], ref[1], 1e-5)
            before = _logits(model, seq, 5)
            model.to(torch.float32)  # _apply on every module: the kernels' arrays are rebuilt
            assert decode_path.close(_logits(model, seq, 5), before, 1e-6)
    finally:
        model.close()


def test_the_kernels_are_never_handed_buffers_too_small():
    """The kernels check no bounds (speed): the Python side refuses shapes they would overrun."""
    p = _plan(4, 2, 32, 64, 4, 32, False, "none", seed=0)
    with pytest.raises(ValueError):
        attention_decode._Plan(**{**p.__dict__, "norms": (np.ones(7, np.float32), p.norms[1])})
    with pytest.raises(ValueError):
        attention_decode._Plan(**{**p.__dict__, "heads": 8})
    angle = np.zeros(16, np.float32)
    with pytest.raises(ValueError):
        attention_decode._project(p, np.ones(32, np.float32), angle, angle)  # hidden size 64 expected
    with pytest.raises(ValueError):
        attention_decode._project(p, np.ones(64, np.float32), np.zeros(64, np.float32), np.zeros(64, np.float32))
    q = np.ones(4 * 32, np.float32)
    with pytest.raises(ValueError):
        attention_decode._attend(p, q, torch.ones(1, 4, 3, 32), torch.ones(1, 4, 3, 32))  # 4 KV heads, not 2


def test_two_threads_decode_with_one_model(qwen3_store):
    """The paths keep no per-call state between calls (fresh outputs, thread-local kernel scratch):
    two generations running at once give what each gives alone."""
    import threading

    store, config = qwen3_store
    model = moe_offload.load(store, experts_per_layer=Store.open(store).num_experts)
    try:
        prompts = [torch.randint(3, config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
        kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None, output_logits=True,
                  return_dict_in_generate=True)
        alone = [model.generate(p, **kw) for p in prompts]
        together = [None, None]

        def run(i):
            for _ in range(3):
                together[i] = model.generate(prompts[i], **kw)
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for a, b in zip(alone, together):
            assert torch.equal(a.sequences, b.sequences)
            assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))
    finally:
        model.close()

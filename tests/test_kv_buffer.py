"""kv_buffer.append against transformers' own DynamicLayer.update (the reference), on random steps."""
import numpy as np
import pytest
import torch
from transformers.cache_utils import DynamicLayer

from moe_offload import kv_buffer


def _layer(kv, hd, n, g):
    layer = DynamicLayer()
    layer.update(torch.randn(1, kv, n, hd, generator=g), torch.randn(1, kv, n, hd, generator=g))
    return layer


@pytest.mark.parametrize("kv,hd,prompt", [(1, 8, 1), (2, 16, 5), (3, 32, 63), (4, 4, 64)])
def test_append_equals_update_through_growth_and_outside_changes(kv, hd, prompt):
    g = torch.Generator().manual_seed(kv * 100 + prompt)
    ours, ref = _layer(kv, hd, prompt, g), DynamicLayer()
    ref.update(ours.keys.clone(), ours.values.clone())
    for step in range(300):  # past the first capacities (64, then doubling)
        kind = torch.randint(0, 12, (1,), generator=g).item()
        if kind == 0:  # a prompt's forward in between: transformers' update() on our views
            n = torch.randint(1, 9, (1,), generator=g).item()
            k, v = torch.randn(1, kv, n, hd, generator=g), torch.randn(1, kv, n, hd, generator=g)
            ours.update(k, v)
            ref.update(k, v)
        elif kind == 1 and ref.get_seq_length() > 3:  # crop, as generate's assisted decoding does
            ours.crop(-2)
            ref.crop(-2)
        else:
            k, v = (torch.randn(kv * hd, generator=g).numpy() for _ in range(2))
            keys, values, length = kv_buffer.append(ours, k, v)
            ref.update(torch.from_numpy(k).view(1, kv, 1, hd), torch.from_numpy(v).view(1, kv, 1, hd))
            assert length == ref.get_seq_length() and keys.shape[1] >= length and keys.flags.c_contiguous
            assert np.array_equal(keys[:, :length], ref.keys[0].numpy())
            assert np.array_equal(values[:, :length], ref.values[0].numpy())
        assert ours.get_seq_length() == ref.get_seq_length()
        assert torch.equal(ours.keys, ref.keys) and torch.equal(ours.values, ref.values)


def test_two_caches_never_share_a_buffer():
    g = torch.Generator().manual_seed(0)
    a, b = _layer(2, 8, 3, g), _layer(2, 8, 3, g)
    ka, kb = a.keys.clone(), b.keys.clone()
    for _ in range(70):
        k = torch.randn(16, generator=g).numpy()
        kv_buffer.append(a, k, k)
        ka = torch.cat([ka, torch.from_numpy(k).view(1, 2, 1, 8)], -2)
        k = torch.randn(16, generator=g).numpy()
        kv_buffer.append(b, k, k)
        kb = torch.cat([kb, torch.from_numpy(k).view(1, 2, 1, 8)], -2)
    assert torch.equal(a.keys, ka) and torch.equal(b.keys, kb)


def test_layers_it_does_not_handle_are_left_alone():
    g = torch.Generator().manual_seed(1)
    k = np.ones(16, np.float32)
    assert kv_buffer.append(DynamicLayer(), k, k) is None  # nothing cached yet
    half = DynamicLayer()
    half.update(torch.randn(1, 2, 3, 8, generator=g).half(), torch.randn(1, 2, 3, 8, generator=g).half())
    before = half.keys
    assert kv_buffer.append(half, k, k) is None and half.keys is before
    batch = _layer(2, 8, 3, g)
    batch.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    assert kv_buffer.append(batch, np.ones(8, np.float32), np.ones(8, np.float32)) is None  # not KV * hd values

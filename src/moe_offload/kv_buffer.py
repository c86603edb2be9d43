"""A decode token's keys and values appended to transformers' cache without copying it.

transformers' DynamicLayer.update() concatenates: every decode step copies the layer's whole cache
into a new tensor, twice (keys, values), a cost that grows with the context (quarter decode after a
2,048-token prompt: 15.1 tok/s with it, 19.1 without; README, "Performance"). The fused decode step
(layer_decode.py) instead writes the new position into a buffer with room to grow, kept on the
cache layer itself (so two caches never share one), and makes the layer's keys/values views of its
filled part: what update() would have left there, same shapes and values, so every other reader (a
prompt's forward, crop, generate's bookkeeping) sees the cache as it expects. Whatever replaces
those views (update() after a prompt, crop, a reorder) is taken over by the next step with one copy.
"""
from __future__ import annotations

import numpy as np
import torch

_ATTR = "_moe_offload_kv"  # the buffer's place on the cache layer
_MIN_ROOM = 64  # positions; capacity doubles from there


class _Buffer:
    __slots__ = ("keys", "values", "knp", "vnp", "kview", "vview", "length", "width")

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
        b, kv, n, hd = keys.shape
        self.keys = torch.empty(b, kv, room, hd, dtype=keys.dtype)
        self.values = torch.empty(b, kv, room, hd, dtype=values.dtype)
        self.keys[:, :, :n] = keys
        self.values[:, :, :n] = values
        self.knp, self.vnp = self.keys.numpy()[0], self.values.numpy()[0]
        self.kview = self.vview = None
        self.length, self.width = n, kv * hd


def append(layer, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Add one token's k and v [KV * hd] after the cached positions of `layer` (a DynamicLayer
    holding fp32 CPU tensors [1, KV, S, hd]); returns (keys, values [KV, capacity, hd], S + 1) for
    the kernels, or None, with nothing changed, for a layer this does not handle (the caller then
    calls update())."""
    buf = ready(layer, k.shape[0]) if v.shape == k.shape else None
    if buf is None:
        return None
    n = buf.length
    buf.knp[:, n] = k.reshape(buf.knp.shape[0], -1)
    buf.vnp[:, n] = v.reshape(buf.vnp.shape[0], -1)
    advance(layer, buf)
    return buf.knp, buf.vnp, n + 1


def current(layer) -> _Buffer | None:
    """The layer's buffer if it still holds what the layer shows (the views advance made last, checked
    by identity: nothing else to check) and has room for one more position (a caller that writes
    position `length` itself, then calls advance)."""
    buf = layer.__dict__.get(_ATTR)
    if buf is None or layer.keys is not buf.kview or layer.values is not buf.vview or buf.length >= buf.knp.shape[1]:
        return None
    return buf


def ready(layer, width: int) -> _Buffer | None:
    """current(layer), or else a new buffer holding the layer's keys and values (a prompt's update()
    replaced them: the first decode token after it), for a caller that writes position `length`
    of `width` (KV * hd) floats itself, then calls advance; None for a layer this does not handle."""
    buf = current(layer)
    return buf if buf is not None and buf.width == width else _adopt(layer, width)


def advance(layer, buf: _Buffer) -> None:
    """The position written at buf.length becomes part of the layer's keys and values."""
    n = buf.length + 1
    buf.length = n
    layer.keys = buf.kview = buf.keys.narrow(2, 0, n)
    layer.values = buf.vview = buf.values.narrow(2, 0, n)


def _adopt(layer, width: int) -> _Buffer | None:
    """A new buffer holding the layer's current keys and values, with room to grow; None if the
    layer is not one append handles or its positions are not `width` floats."""
    keys, values = layer.keys, layer.values
    if (not layer.is_initialized or keys is None or keys.dim() != 4 or keys.shape[0] != 1 or keys.dtype != torch.float32
            or values.dtype != torch.float32 or not keys.is_cpu or keys.shape != values.shape or keys.shape[-2] == 0
            or width != keys.shape[1] * keys.shape[3]):
        return None
    n = keys.shape[-2]
    buf = layer.__dict__[_ATTR] = _Buffer(keys, values, max(2 * n, _MIN_ROOM))
    return buf

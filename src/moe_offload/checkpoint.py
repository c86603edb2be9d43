"""Which checkpoint tensors feed which expert, read from transformers' own conversion rules.

Checkpoints keep experts as they were published: one tensor per expert and matrix (Mixtral's
`experts.E.w1.weight`, Qwen's `experts.E.gate_proj.weight`) or stacked by expert (gpt-oss). In
memory transformers 5 holds them fused (`experts.gate_up_proj [E, 2I, H]`), and its
`from_pretrained` maps one onto the other with per-family rules (renamings, then converters that
stack and concatenate). We replay those rules on ONE expert at a time: each converter's operations
run on single-expert lists, so the result is that expert's slice of the fused tensor, exactly as
transformers would build it, without ever holding a whole layer's experts.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field

import torch

from .archs import MoeSpec
from .errors import MoeOffloadError


@dataclass
class ExpertSource:
    """How to read one fused expert tensor (one layer, one parameter) for a given expert."""

    stacked_key: str | None = None  # the checkpoint holds it stacked by expert: slice it
    converter: object = None  # else a transformers WeightConverter, replayed per expert
    parts: dict[int, dict[str, str]] = field(default_factory=dict)  # expert -> {source pattern: key}


class CheckpointMap:
    def __init__(self, model, spec: MoeSpec, keys: list[str]):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, apply_renamings

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        names = set(model.state_dict().keys())
        prefix = getattr(model, "base_model_prefix", "") or ""
        expert_of = {f"{layer.experts}.{p}": (layer.index, p, layer.experts.rpartition(".")[2])
                     for layer in spec.layers for p in spec.expert_params}
        self.spec, self.model = spec, model  # some operations read sizes off the (meta) model
        self.dense: dict[str, str] = {}  # in-memory name -> checkpoint key
        # Non-expert tensors built by a converter (fused or split projections): output name -> group
        self.dense_groups: dict[str, tuple[object, str, dict[str, list[str]]]] = {}
        self._built: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.experts: dict[tuple[int, str], ExpertSource] = {}
        self.skipped: list[str] = []  # checkpoint tensors the model has no place for
        for key in keys:
            renamed = apply_renamings(key, renamings)
            target, converter, pattern = renamed, None, None
            for c in converters:
                target, pattern = c.rename_source_key(renamed)
                if pattern is not None:
                    converter = c
                    break
            target = _with_prefix(target, names | set(expert_of), prefix)
            if target in expert_of:
                layer, param, tail = expert_of[target]
                source = self.experts.setdefault((layer, param), ExpertSource())
                if converter is None or "*" not in pattern:
                    source.stacked_key, source.converter = key, converter
                else:
                    match = re.search(rf"(?:^|\.){re.escape(tail)}\.(\d+)\.", renamed)
                    if match is None:
                        raise MoeOffloadError(f"cannot tell which expert the checkpoint tensor {key} belongs to")
                    source.converter = converter
                    source.parts.setdefault(int(match.group(1)), {})[pattern] = key
            elif converter is not None and target in names:
                group = self.dense_groups.get(target) or (converter, target, {})
                group[2].setdefault(pattern, []).append(key)
                first, _, rest = target.partition(converter.target_patterns[0])
                for out in converter.target_patterns:
                    self.dense_groups[first + out + rest] = group
            elif target in names:
                self.dense[target] = key
            elif key in names:  # a renaming meant for the original release, not for this save
                self.dense[key] = key
            else:
                self.skipped.append(key)
        self._check_complete()

    def dense_names(self) -> list[str]:
        return list(self.dense) + [n for n in self.dense_groups if n not in self.dense]

    def dense_tensor(self, sources, name: str) -> torch.Tensor:
        """A non-expert tensor by its in-memory name, through the family's converter if it has one."""
        if name in self.dense:
            return sources.get(self.dense[name])
        with self._lock:
            if name not in self._built:
                converter, target, parts = self.dense_groups[name]
                collected = {p: [sources.get(k) for k in sorted(parts[p])] for p in converter.source_patterns
                             if p in parts}
                for op in converter.operations:
                    collected = op.convert(collected, source_patterns=converter.source_patterns,
                                           target_patterns=converter.target_patterns, full_layer_name=target,
                                           model=self.model, config=self.model.config)
                first, _, rest = target.partition(converter.target_patterns[0])
                for out, t in collected.items():
                    self._built[first + out + rest] = t
            return self._built.pop(name)

    def _check_complete(self) -> None:
        spec = self.spec
        for layer in spec.layers:
            for param in spec.expert_params:
                source = self.experts.get((layer.index, param))
                if source is None:
                    raise MoeOffloadError(f"the checkpoint holds no {param} for the experts of layer {layer.index}")
                if source.stacked_key is not None:
                    continue
                wanted = set(source.converter.source_patterns)
                for e in range(spec.num_experts):
                    if set(source.parts.get(e, {})) != wanted:
                        raise MoeOffloadError(f"the checkpoint is missing weights of expert {e} in layer "
                                              f"{layer.index} ({param})")

    def expert_tensor(self, sources, layer: int, param: str, expert: int) -> torch.Tensor:
        """One expert's slice of a fused expert parameter, in transformers' in-memory layout."""
        source = self.experts[(layer, param)]
        if source.stacked_key is not None:
            one = sources.get_slice(source.stacked_key, expert)
            if source.converter is None:
                return one
            collected = {source.converter.source_patterns[0]: one.unsqueeze(0)}  # a stack of one expert
        else:
            parts = source.parts[expert]
            collected = {p: [sources.get(parts[p])] for p in source.converter.source_patterns}
        c = source.converter
        for op in c.operations:
            collected = op.convert(collected, source_patterns=c.source_patterns, target_patterns=c.target_patterns,
                                   full_layer_name=param, model=self.model, config=self.model.config)
        (tensor,) = collected.values()
        return tensor[0] if isinstance(tensor, torch.Tensor) else tensor[0][0]


def _with_prefix(name: str, names: set[str], prefix: str) -> str:
    """Checkpoints of the base model lack the causal LM's prefix, and the other way round."""
    if name in names or not prefix:
        return name
    if f"{prefix}.{name}" in names:
        return f"{prefix}.{name}"
    stripped = name.removeprefix(f"{prefix}.")
    return stripped if stripped in names else name

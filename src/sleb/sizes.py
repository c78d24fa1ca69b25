"""Sizes of a model, in one place: parameters, weight bytes, quantization kind, and forward FLOPs.

The FLOP model per token counts multiply-adds as 2 FLOPs: every weight matrix a token passes
through (each block's parameters, the LM head; the embedding lookup is a copy, 0 FLOPs), plus
attention's score and value products over the context (on average half the context for causal
attention). Its ratio is the 'ideal' speedup that removing blocks should give; `sleb bench`
reports it beside the measured one and the budgets (`--target-speedup`) aim at it. Both a
block's parameters and its FLOPs add up, so the size of any removal set is a sum over blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .arch import BRANCH_KINDS, attention_layers, attention_width, find_blocks, kv_width


def logical_numel(param) -> int:
    """Elements of the matrix a parameter stands for, also when a quantization library packs it.

    bitsandbytes' 4-bit parameters store two weights per byte and keep the real shape in their
    `quant_state`; counting the packed tensor would halve their FLOPs.
    """
    state = getattr(param, "quant_state", None)
    shape = getattr(state, "shape", None)
    if shape is not None:
        return math.prod(shape)
    return param.numel()


def count_parameters(module: nn.Module) -> int:
    """Parameter count of a module as the unquantized model would have it (see `logical_numel`)."""
    return sum(logical_numel(p) for p in module.parameters())


def forward_flops_per_token(model, context: int = 2048) -> dict[str, float]:
    """FLOPs for one token's forward pass at a given context length, split by part."""
    blocks = find_blocks(model).modules
    block_params = count_parameters(blocks)
    head = model.get_output_embeddings()
    head_params = logical_numel(head.weight) if head is not None else 0
    attention = attention_layers(model) * 2 * 2 * (context / 2) * attention_width(model)
    parts = {"blocks": 2.0 * block_params, "attention": float(attention), "head": 2.0 * head_params}
    parts["total"] = sum(parts.values())
    return parts


def kv_cache_bytes_per_token(model, item_bytes: int | None = None) -> int:
    """Bytes of KV cache one token of context holds: key and value for every layer that attends, in the
    model's dtype unless `item_bytes` says otherwise."""
    if item_bytes is None:
        item_bytes = torch.finfo(model.dtype).bits // 8 if model.dtype.is_floating_point else 4
    return 2 * attention_layers(model) * kv_width(model) * item_bytes


def block_params(model) -> list[int]:
    """Parameters of each block, in block order."""
    return [count_parameters(block) for block in find_blocks(model).modules]


def block_flops(model, context: int = 2048) -> list[float]:
    """Forward FLOPs per token of each block (its weights and its attention over the context)."""
    attention = 2 * 2 * (context / 2) * attention_width(model)
    return [2.0 * p + attention for p in block_params(model)]


def quantization_of(model) -> str | None:
    """A short name of the weight quantization a model was loaded with, None for plain weights."""
    qc = getattr(model.config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method", "quantized")
    method = getattr(method, "value", method)  # transformers keeps an enum here
    if qc.get("load_in_4bit"):
        return f"{method} {qc.get('bnb_4bit_quant_type', '4bit')}"
    if qc.get("load_in_8bit"):
        return f"{method} int8"
    return str(method)


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def weight_bytes(model) -> int:
    """Bytes the model's weights take in memory: parameters, buffers and quantization scales.

    Tied weights count once; bitsandbytes' packed weights count as stored, with their scales
    (`SCB` for int8, the quant state's absmax and nested state for 4-bit).
    """
    seen: set[int] = set()
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += _tensor_bytes(tensor)
        total += _tensor_bytes(getattr(tensor, "SCB", None))
        state = getattr(tensor, "quant_state", None)
        while state is not None:
            total += _tensor_bytes(getattr(state, "absmax", None)) + _tensor_bytes(getattr(state, "offset", None))
            state = getattr(state, "state2", None)
    return total


@dataclass
class Sizer:
    """Parameter count and ideal speedup of any removal set of a model, from per-unit sizes (both add up).

    The units are the blocks, or with `branches` (`sleb.arch.find_branches`) each block's attention
    (id 2i: its weights and its attention over the context) and MLP (2i + 1). `block_params` and
    `block_flops` are indexed by unit id; a branch's `block_params` are its own module's (what
    `--unit-score per-parameter` divides by). `unit_params` is what removing a unit takes out of the
    saved model: a branch with the norms that serve only it (`Branches.norms`; the DeciLM and deci GGUF
    layouts drop them with it), so `params` is the saved model's count exactly. `block_rest` is what a
    block holds beyond its two units (a norm both serve), gone only with the whole block.
    """

    dense_params: int
    block_params: list[int]
    dense_flops: float
    block_flops: list[float]
    unit_params: list[int] | None = None  # None: block_params (whole blocks)
    block_rest: list[int] | None = None

    def flops(self, removed) -> float:
        return self.dense_flops - sum(self.block_flops[b] for b in removed)

    @classmethod
    def of(cls, model, context: int, branches=None) -> "Sizer":
        dense_params, dense_flops = count_parameters(model), forward_flops_per_token(model, context)["total"]
        if branches is None:
            return cls(dense_params, block_params(model), dense_flops, block_flops(model, context))
        attention = 2 * 2 * (context / 2) * attention_width(model)
        params, flops, units, rest = [], [], [], []
        for block in find_blocks(model).modules:
            for kind in BRANCH_KINDS:
                p = count_parameters(getattr(block, branches.name(kind)))
                params.append(p)
                flops.append(2.0 * p + (attention if kind == "attn" else 0.0))
                units.append(p + sum(count_parameters(getattr(block, n)) for n in branches.norms.get(kind, ())))
            rest.append(count_parameters(block) - units[-1] - units[-2])
        return cls(dense_params, params, dense_flops, flops, units, rest)

    @property
    def unit_sizes(self) -> list[int]:
        """Parameters each unit's removal takes out of the saved model (`unit_params`), by unit id."""
        return self.block_params if self.unit_params is None else self.unit_params

    def removed_params(self, removed) -> int:
        """Parameters the saved model loses with the units in `removed`."""
        removed = set(removed)
        rest = sum(r for b, r in enumerate(self.block_rest or []) if {2 * b, 2 * b + 1} <= removed)
        return sum(self.unit_sizes[u] for u in removed) + rest

    def params(self, removed) -> int:
        return self.dense_params - self.removed_params(removed)

    def speedup(self, removed) -> float:
        return self.dense_flops / self.flops(removed)

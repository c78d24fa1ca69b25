"""A forward-FLOP model per token: the 'ideal' speedup that removing blocks should give.

Counts multiply-adds as 2 FLOPs: every weight matrix a token passes through (each block's
parameters, the LM head; the embedding lookup is a copy, 0 FLOPs), plus attention's score and value
products over the context (on average half the context for causal attention).
"""

from __future__ import annotations

import math

from torch import nn

from .arch import find_blocks, text_config


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


def block_params(model) -> list[int]:
    """Parameters of each block, in block order."""
    return [count_parameters(block) for block in find_blocks(model).modules]


def _attention_width(model) -> int:
    cfg = text_config(model)
    heads = getattr(cfg, "num_attention_heads", None)
    head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else cfg.hidden_size)
    return (heads or 1) * head_dim


def forward_flops_per_token(model, context: int = 2048) -> dict[str, float]:
    """FLOPs for one token's forward pass at a given context length, split by part."""
    blocks = find_blocks(model).modules
    block_params = count_parameters(blocks)
    head = model.get_output_embeddings()
    head_params = logical_numel(head.weight) if head is not None else 0
    attention = len(blocks) * 2 * 2 * (context / 2) * _attention_width(model)
    parts = {"blocks": 2.0 * block_params, "attention": float(attention), "head": 2.0 * head_params}
    parts["total"] = sum(parts.values())
    return parts


def ideal_speedup(baseline, candidate, context: int = 2048) -> float:
    """Speedup of `candidate` over `baseline` if time followed forward FLOPs exactly."""
    return forward_flops_per_token(baseline, context)["total"] / forward_flops_per_token(candidate, context)["total"]

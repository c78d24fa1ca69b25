"""A forward-FLOP model per token: the 'ideal' speedup that removing blocks should give.

Counts multiply-adds as 2 FLOPs: every weight matrix a token passes through (each block's
parameters, the LM head; the embedding lookup is free), plus attention's score and value
products over the context (on average half the context for causal attention).
"""

from __future__ import annotations

from .arch import find_blocks, text_config


def _attention_width(model) -> int:
    cfg = text_config(model)
    heads = getattr(cfg, "num_attention_heads", None)
    head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else cfg.hidden_size)
    return (heads or 1) * head_dim


def forward_flops_per_token(model, context: int = 2048) -> dict[str, float]:
    """FLOPs for one token's forward pass at a given context length, split by part."""
    blocks = find_blocks(model).modules
    block_params = sum(p.numel() for p in blocks.parameters())
    head = model.get_output_embeddings()
    head_params = head.weight.numel() if head is not None else 0
    attention = len(blocks) * 2 * 2 * (context / 2) * _attention_width(model)
    parts = {"blocks": 2.0 * block_params, "attention": float(attention), "head": 2.0 * head_params}
    parts["total"] = sum(parts.values())
    return parts


def ideal_speedup(baseline, candidate, context: int = 2048) -> float:
    """Speedup of `candidate` over `baseline` if time followed forward FLOPs exactly."""
    return forward_flops_per_token(baseline, context)["total"] / forward_flops_per_token(candidate, context)["total"]

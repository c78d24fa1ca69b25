"""Evaluation: perplexity on held-out text with the paper's protocol."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .arch import input_device, next_token_losses
from .data import eval_windows

PROTOCOL = (
    "test split joined into one token stream; non-overlapping windows of {seqlen} tokens, tail dropped "
    "(BOS first when the tokenizer adds one); perplexity = exp(mean next-token NLL over all windows)"
)


@dataclass
class PerplexityResult:
    spec: str
    seqlen: int
    windows: int
    tokens: int  # predicted tokens
    nll: float  # mean next-token negative log-likelihood
    ppl: float
    protocol: str

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    spec: str,
    seqlen: int = 2048,
    *,
    batch_size: int = 1,
    max_windows: int | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `model` on the test part of a text spec (see `sleb.data`).

    Windows are batched for speed; every window has the same length, so the result does not
    depend on `batch_size` beyond float rounding.
    """
    windows = eval_windows(tokenizer, spec, seqlen=seqlen, max_windows=max_windows)
    device = input_device(model)
    total = 0.0
    batches = torch.split(windows, max(1, batch_size))
    for batch in tqdm(batches, desc=f"ppl {spec}", disable=not progress, unit="batch", dynamic_ncols=True):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        total += next_token_losses(logits, batch).sum().item()
    nll = total / len(windows)
    return PerplexityResult(
        spec=spec,
        seqlen=seqlen,
        windows=len(windows),
        tokens=len(windows) * (seqlen - 1),
        nll=nll,
        ppl=math.exp(nll),
        protocol=PROTOCOL.format(seqlen=seqlen),
    )

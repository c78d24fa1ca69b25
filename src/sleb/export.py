"""Deleting blocks and exporting a vanilla Hugging Face checkpoint that any runtime loads."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .arch import find_blocks, input_device, per_layer_config_fields, renumber_layer_indices, text_config
from .errors import SlebError
from .report import build_report

REPORT_NAME = "sleb_report.json"
PROBE_TEXT = "The capital of France is Paris. Pruning removes whole transformer blocks from a model"


def remove_blocks(model: nn.Module, removed: list[int]) -> nn.Module:
    """Delete blocks in place (indices into the current block list) and keep the config in step.

    The layer count in the config drops, every config field with one entry per layer is sliced to
    the kept blocks, and every block's layer index is renumbered so the KV cache lines up.
    """
    blocks = find_blocks(model)
    n = len(blocks.modules)
    removed_set = set(removed)
    if len(removed_set) != len(removed) or not all(isinstance(i, int) and 0 <= i < n for i in removed):
        raise SlebError(f"blocks to remove must be distinct indices in [0, {n}), got {list(removed)}")
    if len(removed_set) >= n:
        raise SlebError(f"cannot remove all {n} blocks")
    kept = [i for i in range(n) if i not in removed_set]
    cfg = text_config(model)
    for name in per_layer_config_fields(cfg, n):
        value = getattr(cfg, name)
        setattr(cfg, name, type(value)(value[i] for i in kept))
    blocks.replace(nn.ModuleList([blocks.modules[i] for i in kept]))
    cfg.num_hidden_layers = len(kept)
    renumber_layer_indices(blocks.modules)
    return model


@torch.no_grad()
def _probe_logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"].to(input_device(model))
    return model(input_ids=ids, use_cache=False).logits.float().cpu()


def verify_reload(model, tokenizer, folder: str | os.PathLike, *, gguf_file: str | None = None,
                  expected: torch.Tensor | None = None) -> float:
    """Reload a saved checkpoint with plain transformers and compare its logits to `model`'s.

    `gguf_file` reloads that GGUF file in `folder` instead; `expected` replaces `model`'s own probe
    logits (for a file written in a lossy type: the model with its weights round-tripped).
    Returns the largest absolute logit difference; raises SlebError when it exceeds float noise.
    """
    from transformers import AutoModelForCausalLM

    # A model spread over several devices reloads spread out too (its old map names pre-removal blocks).
    spread = len({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}) > 1
    device_map = "auto" if spread else str(input_device(model))
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=model.dtype, device_map=device_map, **extra)
    reloaded.eval()
    if expected is None:
        expected = _probe_logits(model, tokenizer)
    got = _probe_logits(reloaded, tokenizer)
    del reloaded
    if got.shape != expected.shape:
        raise SlebError(f"the saved model gives logits of shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    diff = (got - expected).abs().max().item()
    relative = 1e-4 if model.dtype == torch.float32 else 2e-2
    if not diff <= relative * max(1.0, expected.abs().max().item()):
        raise SlebError(f"the saved model's logits differ from the pruned model's by up to {diff:.3g}; not saved")
    return diff


@contextmanager
def atomic_folder(out: Path):
    """Yield a temporary folder beside `out` that replaces `out` only if the block succeeds.

    On any error the temporary folder is deleted and `out` (if it existed) is left untouched.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(
    model,
    tokenizer,
    out_dir: str | os.PathLike,
    result=None,
    *,
    overwrite: bool = False,
    report: dict | None = None,
    verify: bool = True,
    gguf_source: str | os.PathLike | None = None,
    gguf_type: str = "f16",
) -> Path:
    """Write a vanilla checkpoint (safetensors, config, tokenizer) and `sleb_report.json`.

    An `out_dir` ending in `.gguf` writes a GGUF file instead (`sleb.gguf_export.save_gguf`): from
    `gguf_source`, the GGUF file the model was loaded from, with the kept blocks copied byte for
    byte; without it, the in-memory model in `gguf_type` (f16, bf16, q8_0).

    The checkpoint loads with plain `AutoModelForCausalLM.from_pretrained(out_dir)`. It is written
    to a temporary folder beside `out_dir`, reloaded and compared with the in-memory model on a
    probe input (a mismatch is an error), and only then moved into place, so a failed save leaves
    nothing behind. An existing `out_dir` is replaced only with `overwrite=True`.

    Args:
        result: the SearchResult whose removals were applied (recorded in the report).
        report: extra fields for the report (model source, calibration spec and seed, ...).
        verify: reload and compare logits before moving the checkpoint into place.
    """
    from .gguf_export import is_gguf_path, save_gguf

    if is_gguf_path(out_dir):
        return save_gguf(model, tokenizer, out_dir, result, source=gguf_source, gguf_type=gguf_type,
                         overwrite=overwrite, report=report, verify=verify)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise SlebError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        fields = dict(report or {})
        if verify:
            fields["reload_max_logit_diff"] = verify_reload(model, tokenizer, tmp)
        (tmp / REPORT_NAME).write_text(json.dumps(build_report(model, result, fields), indent=2))
    return out

"""Deleting blocks and exporting a vanilla Hugging Face checkpoint that any runtime loads."""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .arch import (LAYER_INDEX_ATTRIBUTES, find_blocks, input_device, per_layer_config_fields,
                   renumber_layer_indices, text_config)
from .errors import CheckFailed, SlebError
from .loading import is_disk_offloaded, offload_device_map
from .outputs import atomic_folder, check_output_folder
from .runfile import RUN_FILE, RunRecord

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


@contextlib.contextmanager
def pruned_view(model, removed: list[int]) -> Iterator:
    """Temporarily remove blocks in place (as `sleb.remove_blocks` does) and restore them after.

    Lets a pruned variant be evaluated or measured without copying the model.
    """
    blocks = find_blocks(model)
    original = blocks.modules
    cfg = text_config(model)
    saved_fields = {name: getattr(cfg, name) for name in per_layer_config_fields(cfg, len(original))}
    saved_layers = cfg.num_hidden_layers
    saved_indices = [
        (module, attr, getattr(module, attr))
        for block in original
        for module in block.modules()
        for attr in LAYER_INDEX_ATTRIBUTES
        if isinstance(getattr(module, attr, None), int)
    ]
    try:
        if removed:
            remove_blocks(model, list(removed))
        yield model
    finally:
        blocks.replace(original)
        cfg.num_hidden_layers = saved_layers
        for name, value in saved_fields.items():
            setattr(cfg, name, value)
        for module, attr, value in saved_indices:
            setattr(module, attr, value)


@torch.no_grad()
def probe_logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"].to(input_device(model))
    return model(input_ids=ids, use_cache=False).logits.float().cpu()


def verify_reload(model, tokenizer, folder: str | os.PathLike, *, tolerance: float | None = None,
                  what: str = "saved model", gguf_file: str | None = None,
                  expected: torch.Tensor | None = None, trust_remote_code: bool = False) -> float:
    """Reload a saved checkpoint with plain transformers and compare its logits to `model`'s.

    `gguf_file` reloads that GGUF file in `folder` instead; `expected` replaces `model`'s own probe
    logits (for a file written in a lossy type: the model with its weights rounded the same way);
    `trust_remote_code` reloads a folder that carries its own model code (`sleb.decilm`).
    Returns the largest absolute logit difference; raises CheckFailed when it exceeds `tolerance`
    times the largest logit (default: float noise for the model's dtype).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    # Said either way: left out, transformers asks on the terminal whether to run a folder's own code.
    extra = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        extra["gguf_file"] = gguf_file
    with contextlib.ExitStack() as stack:
        if is_disk_offloaded(model) and not gguf_file:
            # Reloaded the way it was loaded, blocks on disk: a model larger than memory stays out of it.
            # (Safetensors are read in place: the scratch folder accelerate asks for stays empty.)
            config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
            extra.update(device_map=offload_device_map(config, str(input_device(model))),
                         offload_folder=stack.enter_context(tempfile.TemporaryDirectory(prefix="sleb-verify-")))
        else:
            # A model spread over several devices reloads spread out too (its old map names pre-removal blocks).
            spread = len({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}) > 1
            extra["device_map"] = "auto" if spread else str(input_device(model))
        reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=model.dtype, **extra)
        reloaded.eval()
        if expected is None:
            expected = probe_logits(model, tokenizer)
        got = probe_logits(reloaded, tokenizer)
        del reloaded
    if got.shape != expected.shape:
        raise CheckFailed(f"the {what} gives logits of shape {tuple(got.shape)}, expected {tuple(expected.shape)}; "
                          "not saved")
    diff = (got - expected).abs().max().item()
    if tolerance is None:
        tolerance = 1e-4 if model.dtype == torch.float32 else 2e-2
    if not diff <= tolerance * max(1.0, expected.abs().max().item()):
        raise CheckFailed(f"the {what}'s logits differ from the in-memory model's by up to {diff:.3g}; not saved")
    return diff


def save_weights(model, folder: str | os.PathLike) -> None:
    """`save_pretrained`, in shards of one block each when the blocks are on disk.

    transformers brings a disk-offloaded model's weights into memory a shard at a time, and its
    default shard (50 GB) would hold the whole model of any size that needs offloading.
    """
    if not is_disk_offloaded(model):
        model.save_pretrained(folder)
        return
    shard = max(sum(p.numel() * p.element_size() for p in block.parameters()) for block in find_blocks(model).modules)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
        model.save_pretrained(folder, max_shard_size=max(shard, 1))


def has_remote_code(model) -> bool:
    """Whether `model`'s class is code its checkpoint shipped (loaded with trust_remote_code), not transformers'."""
    return type(model).__module__.startswith("transformers_modules")


def save(
    model,
    tokenizer,
    out_dir: str | os.PathLike,
    result=None,
    *,
    overwrite: bool = False,
    report: dict | None = None,
    verify: bool = True,
    inputs=(),
) -> Path:
    """Write a vanilla checkpoint (safetensors, config, tokenizer) and `sleb_report.json`.

    The checkpoint loads with plain `AutoModelForCausalLM.from_pretrained(out_dir)`. It is written
    to a temporary folder beside `out_dir`, reloaded and compared with the in-memory model on a
    probe input (a mismatch is an error), and only then moved into place, so a failed save leaves
    nothing behind. An existing `out_dir` is replaced only with `overwrite=True`, only when it is an
    earlier `sleb` output, and only once the new checkpoint is complete (see `sleb.outputs`).

    Args:
        result: the SearchResult whose removals were applied (recorded in the report).
        report: extra fields for the report (model source, calibration spec and seed, ...).
        verify: reload and compare logits before moving the checkpoint into place.
        inputs: local paths the run read (model, texts): the output may not be, contain or lie in them.
    """
    out = Path(out_dir)
    check_output_folder(out, overwrite=overwrite, inputs=inputs)
    with atomic_folder(out, replace=overwrite) as tmp:
        save_weights(model, tmp)
        tokenizer.save_pretrained(tmp)
        fields = dict(report or {})
        if verify:
            # A model whose class came with its checkpoint (a DeciLM folder, loaded with --trust-remote-code)
            # reloads with that code, which save_pretrained copied beside the weights.
            fields["reload_max_logit_diff"] = verify_reload(model, tokenizer, tmp,
                                                            trust_remote_code=has_remote_code(model))
        fields["files"] = sorted(p.name for p in tmp.iterdir()) + [RUN_FILE]
        RunRecord.of(model, result, **fields).write(tmp / RUN_FILE)
    return out

"""Deleting blocks and exporting a vanilla Hugging Face checkpoint that any runtime loads."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from .arch import find_blocks, input_device
from .errors import CheckFailed
from .loading import is_disk_offloaded, offload_device_map
from .sizes import weight_bytes
from .writer import SaveJob, Writer, save_with

PROBE_TEXT = "The capital of France is Paris. Pruning removes whole transformer blocks from a model"


@torch.no_grad()
def probe_logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"].to(input_device(model))
    return model(input_ids=ids, use_cache=False).logits.float().cpu()


def verify_reload(model, tokenizer, folder: str | os.PathLike, *, tolerance: float | None = None,
                  what: str = "saved model", gguf_file: str | None = None,
                  expected: torch.Tensor | None = None, trust_remote_code: bool = False, config=None) -> float:
    """Reload a saved checkpoint with plain transformers and compare its logits to `model`'s.

    `gguf_file` reloads that GGUF file in `folder` instead; `expected` replaces `model`'s own probe
    logits (for a file written in a lossy type: the model with its weights rounded the same way);
    `trust_remote_code` reloads a folder that carries its own model code (`sleb.decilm`); `config`
    replaces the configuration transformers would read from the checkpoint.
    Returns the largest absolute logit difference; raises CheckFailed when it exceeds `tolerance`
    times the largest logit (default: float noise for the model's dtype).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    # Said either way: left out, transformers asks on the terminal whether to run a folder's own code.
    extra = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        extra["gguf_file"] = gguf_file
    if config is not None:
        extra["config"] = config
    with contextlib.ExitStack() as stack:
        if not gguf_file:
            config = config or AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        if not gguf_file and getattr(config, "quantization_config", None) is None:
            # Blocks stay on disk and are streamed one at a time: the check adds one block's weights, not a
            # second model beside the one in memory (which doubled a 1.5B model's peak, 7.4 -> 12.1 GiB).
            # (Safetensors are read in place: the scratch folder accelerate asks for stays empty.) Quantized
            # weights cannot be offloaded; a quantized checkpoint is the small one and reloads whole.
            extra.update(device_map=offload_device_map(config, str(input_device(model)), trust_remote_code),
                         offload_folder=stack.enter_context(tempfile.TemporaryDirectory(prefix="sleb-verify-")))
            # accelerate warns that the blocks are offloaded: the check's own choice, not news to the user.
            quiet = logging.getLogger("accelerate.big_modeling")
            stack.callback(quiet.setLevel, quiet.level)
            quiet.setLevel(logging.ERROR)
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


@dataclass
class Folder(Writer):
    """A vanilla checkpoint folder (safetensors, config, tokenizer, run file) that plain
    `AutoModelForCausalLM.from_pretrained(folder)` loads, reload-checked that way."""

    name: ClassVar[str] = "folder"

    def size(self, model) -> int:
        return weight_bytes(model)  # the pruned checkpoint is at most the dense model's size

    def write(self, job: SaveJob, tmp: Path) -> dict:
        save_weights(job.model, tmp)
        job.tokenizer.save_pretrained(tmp)
        return {}

    def reload(self, job: SaveJob, tmp: Path) -> dict:
        # A model whose class came with its checkpoint (a DeciLM folder, loaded with --trust-remote-code)
        # reloads with that code, which save_pretrained copied beside the weights.
        return {"reload_max_logit_diff": verify_reload(job.model, job.tokenizer, tmp,
                                                       trust_remote_code=has_remote_code(job.model))}


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
    earlier `sleb` output, and only once the new checkpoint is complete (see `sleb.outputs`; the
    steps are `sleb.writer.save_with`'s, the same for every format).

    Args:
        result: the SearchResult whose removals were applied (recorded in the report).
        report: extra fields for the report (model source, calibration spec and seed, ...).
        verify: reload and compare logits before moving the checkpoint into place.
        inputs: local paths the run read (model, texts): the output may not be, contain or lie in them.
    """
    save_with(Folder(), model, tokenizer, out_dir, result, report=report, overwrite=overwrite, inputs=inputs,
              verify=verify)
    return Path(out_dir)

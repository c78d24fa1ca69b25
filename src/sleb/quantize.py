"""Weight-only post-training quantization of a (pruned or dense) checkpoint with bitsandbytes.

Why bitsandbytes: it is maintained, quantizes both 8-bit and 4-bit on CPU as well as CUDA, and
its checkpoints are plain safetensors that `AutoModelForCausalLM.from_pretrained(folder)`
reloads quantized with no loader of its own (see the README). Methods:

- `int8`: LLM.int8() linear layers (per-row absmax int8 weights, outlier columns kept in 16 bit
  at run time);
- `int4`: NF4 4-bit linear layers, blocks of 64 weights, with double quantization (the scales
  quantized too). Double quantization also avoids a bitsandbytes 0.50 CPU bug where a 4-bit
  model saved after a forward pass reloads as garbage; the reload check below would catch it.

Embeddings and the LM head stay in the source dtype (bitsandbytes quantizes `nn.Linear` only and
keeps the output layer, tied to the embedding here, unquantized).
"""

from __future__ import annotations

import gc
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch

from . import loading
from .errors import SlebError
from .export import verify_reload
from .outputs import check_output_folder
from .runfile import RunRecord, read_entries
from .sizes import logical_numel, weight_bytes
from .writer import SaveJob, Writer, save_with

METHODS = {
    "int8": "bitsandbytes LLM.int8(): int8 weights with per-row scales",
    "int4": "bitsandbytes NF4: 4-bit weights in blocks of 64, double-quantized scales",
}
INSTALL_HINT = "pip install 'sleb[quant]' (bitsandbytes)"


@dataclass
class QuantizeResult:
    """What `quantize` wrote: the bytes of the quantized layers before and after, and the reload check."""

    out_dir: str
    method: str
    description: str
    quantized_layers: int
    linear_bytes_before: int  # the quantized layers' weights in the source dtype
    linear_bytes_after: int  # the same layers as stored: packed weights and their scales
    weight_bytes: int  # the whole quantized model in memory
    weight_bytes_before: int  # the whole model in the source dtype
    reload_max_logit_diff: float

    def to_dict(self) -> dict:
        return asdict(self)


def quiet_bitsandbytes() -> None:
    """Silence bitsandbytes' log line on every int8 matmul with fp32 inputs (it computes in fp16 by design)."""
    import logging

    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(getattr(f, "_sleb", False) for f in logger.filters):
        def drop(record: logging.LogRecord) -> bool:
            return "inputs will be cast" not in record.getMessage()

        drop._sleb = True  # type: ignore[attr-defined]
        logger.addFilter(drop)


def quantization_config(method: str, compute_dtype: torch.dtype | None = None):
    """The transformers `BitsAndBytesConfig` for a method name."""
    if method not in METHODS:
        raise SlebError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as err:
        raise SlebError(f"quantization needs bitsandbytes: {INSTALL_HINT}") from err
    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or torch.float32,
    )


def _quantized_linears(model) -> list[torch.nn.Module]:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))]


def _stored_bytes(param) -> int:
    holder = torch.nn.Module()
    holder.weight = param
    return weight_bytes(holder)


def probe_source(source: str, dtype, device: str | None, trust_remote_code: bool) -> None:
    """The causal probe `sleb.load` runs, on the unquantized source (BadInput for an encoder such as BERT, which
    transformers maps to BertLMHeadModel, so `peek` lets it through).

    Not on the quantized model: LLM.int8() picks its 16-bit outlier columns over the whole input, so later
    tokens move a causal model's earlier logits by its rounding; a forward pass also changes a bitsandbytes
    model's buffers before the save. The source is loaded once for this and dropped.
    """
    model, _ = loading.load(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class QuantizedFolder(Writer):
    """A bitsandbytes-quantized checkpoint folder that plain `from_pretrained(folder)` reloads quantized, with
    the source's run file carried over plus a `quantization` entry; reloaded and compared on a probe."""

    name: ClassVar[str] = "quantized-folder"

    source: str  # what was quantized, as the user named it
    checkpoint: str  # its local folder, whose run file is carried over
    measures: QuantizeResult  # the quantized layers and their bytes, measured before the save's forward pass
    trust_remote_code: bool = False  # the source's class came with it (a DeciLM folder): reload with that code

    def size(self, model) -> int:
        return self.measures.weight_bytes

    def write(self, job: SaveJob, tmp: Path) -> dict:
        job.model.save_pretrained(tmp)
        job.tokenizer.save_pretrained(tmp)
        return {}

    def reload(self, job: SaveJob, tmp: Path) -> dict:
        # The same kernels on the same packed weights: anything beyond rounding noise is a broken checkpoint.
        return {"reload_max_logit_diff": verify_reload(job.model, job.tokenizer, tmp, tolerance=1e-4,
                                                       what="saved quantized model",
                                                       trust_remote_code=self.trust_remote_code)}

    def record(self, job: SaveJob, entries: dict) -> RunRecord:
        self.measures.reload_max_logit_diff = entries.get("reload_max_logit_diff")
        found = read_entries(self.checkpoint)
        record = RunRecord.from_dict(found) if found is not None else RunRecord(source=self.source)
        record.quantization = {"source": self.source, **self.measures.to_dict()}
        record.quantization.pop("out_dir")
        return record


def quantize(
    source: str,
    out_dir: str | os.PathLike,
    method: str,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | None = "auto",
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> QuantizeResult:
    """Quantize the linear layers of a checkpoint's weights and save a plain-reloadable checkpoint.

    Args:
        source: anything `sleb.load` takes (hub id, folder, `.gguf`, `smollm2-135m`), typically a
            folder written by `sleb prune`.
        out_dir: the new checkpoint (safetensors, config with its `quantization_config`,
            tokenizer, and `sleb_report.json` carrying the source's report plus a `quantization` entry).
        method: `int8` or `int4` (see `METHODS`).
        dtype: dtype of the unquantized parts and the 4-bit compute dtype (`auto`: the checkpoint's).
        device: where to quantize and run (`auto`: CUDA if present, else CPU).

    The source is first loaded unquantized for the causal probe (`probe_source`). The checkpoint is
    written to a temporary folder beside `out_dir`, reloaded with plain
    transformers and compared with the in-memory quantized model on a probe input, then moved
    into place; a mismatch raises SlebError and leaves nothing behind.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = loading.parse_dtype(dtype)
    bnb_config = quantization_config(method, torch_dtype if isinstance(torch_dtype, torch.dtype) else None)
    out = Path(out_dir)
    inputs = loading.local_paths(source)
    check_output_folder(out, inputs=inputs, overwrite=overwrite)
    config, tokenizer = loading.peek(source, trust_remote_code)
    folder = loading.local_checkpoint(source)
    if getattr(config, "quantization_config", None) is not None:
        raise SlebError(f"{source} is already quantized; quantize the unquantized (pruned) checkpoint")
    probe_source(source, torch_dtype, device, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch_dtype, quantization_config=bnb_config, trust_remote_code=trust_remote_code,
            **loading._device_kwargs(device),
        )
    except Exception as err:  # bitsandbytes and loading errors: one line for the user
        raise SlebError(f"cannot quantize {source!r}: {loading._first_line(err)}") from err
    model.eval()

    layers = _quantized_linears(model)
    if not layers:
        raise SlebError(f"{source} has no linear layers bitsandbytes could quantize")
    source_item = torch.finfo(model.dtype).bits // 8
    before = sum(logical_numel(m.weight) for m in layers) * source_item
    after = sum(_stored_bytes(m.weight) for m in layers)
    total_after = weight_bytes(model)
    measures = QuantizeResult(
        out_dir=str(out), method=method, description=METHODS[method], quantized_layers=len(layers),
        linear_bytes_before=before, linear_bytes_after=after, weight_bytes=total_after,
        weight_bytes_before=total_after - after + before, reload_max_logit_diff=float("nan"),
    )
    writer = QuantizedFolder(source=source, checkpoint=folder, measures=measures, trust_remote_code=trust_remote_code)
    writer.check_output(out, inputs=inputs, overwrite=overwrite, need_bytes=writer.size(model))
    save_with(writer, model, tokenizer, out, overwrite=overwrite, inputs=inputs)
    return measures

"""Sizes and costs of a model, in one place: parameters, weight bytes, quantization kind, and per-token costs.

One cost model (`ModelCost`) serves Hugging Face models (`ModelCost.of_model`) and GGUF files
(`ModelCost.of_gguf`, from the tensors and header `sleb.llamacpp_bench` reads) alike. FLOPs per token
count multiply-adds as 2 FLOPs: every weight of the blocks and the LM head a token passes through
(the embedding lookup is a copy, 0 FLOPs), plus attention's score and value products over the
context (on average half the context for causal attention) in each layer that attends. Their ratio
is the 'ideal' speedup that removing blocks should give; `sleb bench` reports it beside the
measured one and the budgets (`--target-speedup`) aim at it. Bytes read per generated token are
every weight but the embedding (of which one row), plus the KV cache at the context. Both a
block's parameters and its FLOPs add up, so the size of any removal set is a sum over blocks.

With `--speed-at`, the costs are measured instead (`MeasuredCost`, timed by `sleb.timing`): seconds of one
pass at the named shape per block, attention and MLP unit; `Sizer` prices removal sets in either measure,
and the budgets, the per-second unit score and the run file all ask it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .arch import BRANCH_KINDS, attending_layers, attention_width, find_blocks, kv_width
from .errors import SlebError


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
    """FLOPs for one token's forward pass at a given context length, split by part (`ModelCost.flops_by_part`)."""
    return ModelCost.of_model(model).flops_by_part(context)


def dtype_bytes(model) -> int:
    """Bytes of one element in the model's dtype (4 for an integer dtype)."""
    return torch.finfo(model.dtype).bits // 8 if model.dtype.is_floating_point else 4


def kv_cache_bytes_per_token(model, item_bytes: int | None = None) -> int:
    """Bytes of KV cache one token of context holds: key and value for every layer that attends, in the
    model's dtype unless `item_bytes` says otherwise."""
    return ModelCost.of_model(model).kv_cache_bytes_per_token(dtype_bytes(model) if item_bytes is None else item_bytes)


def block_params(model) -> list[int]:
    """Parameters of each block, in block order."""
    return [count_parameters(block) for block in find_blocks(model).modules]


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


def attention_flops(query_width: int, context: float) -> float:
    """FLOPs of one token's attention scores and weighted values over a causal `context` (half of it on
    average), for layers of `query_width` summed query heads x head size."""
    return 2 * 2 * (context / 2) * query_width


@dataclass(frozen=True)
class BranchCost:
    """One branch (attention or MLP) of a layer, for sublayer units."""

    module_params: int  # the branch module's own weights (its FLOPs; what --unit-score per-parameter divides by)
    params: int  # with the norms that serve only it: what removing it takes out of a saved model


@dataclass(frozen=True)
class LayerCost:
    """One decoder layer (block) as the cost model sees it."""

    params: int  # every weight of the layer: matrices, norms, biases
    bytes: int  # those weights as stored (quantized sizes included)
    attends: bool = True
    query_width: int = 0  # query heads x head size (0 where the layer does not attend)
    kv_width: int = 0  # key (= value) heads x head size: what the layer adds to the KV cache per token, per K and V
    branches: tuple[BranchCost, ...] | None = None  # by BRANCH_KINDS, where the branches are known

    def flops_per_token(self, context: float) -> float:
        return 2.0 * self.params + attention_flops(self.query_width, context)

    def branch_flops(self, kind: str, context: float) -> float:
        """FLOPs of one branch: its module's weights, and for attention its products over the context."""
        own = 2.0 * self.branches[BRANCH_KINDS.index(kind)].module_params
        return own + (attention_flops(self.query_width, context) if kind == "attn" else 0.0)


_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class ModelCost:
    """What one token costs a model, whatever it is stored as: per layer, and for the rest of the model."""

    layers: tuple[LayerCost, ...]
    params: int  # every weight of the model, tied ones once
    head_params: int  # the LM head's matrix (the embedding's, when tied)
    other_bytes: int  # read per token outside the layers: the LM head, the final norm, one embedding row

    @classmethod
    def of_model(cls, model, branches=None) -> "ModelCost":
        """From a Hugging Face model; with `branches` (`sleb.arch.find_branches`) each layer's attention and MLP."""
        query, kv = attention_width(model), kv_width(model)
        layers = []
        for block, attends in zip(find_blocks(model).modules, attending_layers(model)):
            split = None
            if branches is not None:
                split = tuple(_branch_cost(block, branches, kind) for kind in BRANCH_KINDS)
            layers.append(LayerCost(count_parameters(block), weight_bytes(block), attends, query if attends else 0,
                                    kv if attends else 0, split))
        head, embedding = model.get_output_embeddings(), _input_embeddings(model)
        tied = head is not None and embedding is not None and head.weight is embedding.weight
        embedding_bytes = weight_bytes(embedding) if embedding is not None else 0
        row = embedding_bytes // max(embedding.weight.shape[0], 1) if embedding is not None else 0
        rest = weight_bytes(model) - sum(layer.bytes for layer in layers) - embedding_bytes
        return cls(tuple(layers), count_parameters(model), logical_numel(head.weight) if head is not None else 0,
                   rest + row + (embedding_bytes if tied else 0))

    @classmethod
    def of_gguf(cls, tensors, attends: list[bool], query_widths: list[int], kv_widths: list[int]) -> "ModelCost":
        """From a GGUF file's tensors (with `name`, `shape`, `n_elements` and `n_bytes`, as `gguf.GGUFReader`
        gives them) and, per layer from its header, whether it attends and its widths. A layer is the
        `blk.{i}.` tensors; the LM head is `output.weight`, or the embedding `token_embd.weight` when tied."""
        params, stored = [0] * len(attends), [0] * len(attends)
        total = head = other = 0
        by_name = {t.name: t for t in tensors}
        for t in tensors:
            n, size = int(t.n_elements), int(t.n_bytes)
            total += n
            block = _GGUF_BLOCK.match(t.name)
            if block:
                i = int(block[1])
                if i >= len(attends):
                    raise SlebError(f"the GGUF file's tensor {t.name} is beyond its block count ({len(attends)})")
                params[i] += n
                stored[i] += size
            elif t.name == "token_embd.weight":
                rows = int(t.shape[-1]) if len(t.shape) > 1 else 1
                other += size // max(rows, 1)  # one row looked up per token
            else:
                other += size
                if t.name == "output.weight":
                    head = n
        embedding = by_name.get("token_embd.weight")
        if "output.weight" not in by_name and embedding is not None:  # tied: the head reads the whole embedding
            head = int(embedding.n_elements)
            other += int(embedding.n_bytes)
        layers = tuple(LayerCost(*values) for values in zip(params, stored, attends, query_widths, kv_widths))
        return cls(layers, total, head, other)

    @property
    def attention_layers(self) -> int:
        return sum(layer.attends for layer in self.layers)

    @property
    def query_width(self) -> int:
        """Query heads x head size, summed over the layers."""
        return sum(layer.query_width for layer in self.layers)

    @property
    def kv_width(self) -> int:
        """Key (= value) heads x head size, summed over the layers."""
        return sum(layer.kv_width for layer in self.layers)

    @property
    def weight_flops(self) -> int:
        """FLOPs per token of the weights alone: the layers' and the LM head's."""
        return 2 * (sum(layer.params for layer in self.layers) + self.head_params)

    @property
    def weight_bytes_per_token(self) -> int:
        """Bytes of weights read per generated token (see `other_bytes`)."""
        return sum(layer.bytes for layer in self.layers) + self.other_bytes

    def flops_by_part(self, context: float) -> dict[str, float]:
        """FLOPs per token of a `context`-token prefill (attention over half of it on average), by part."""
        parts = {"blocks": 2.0 * sum(layer.params for layer in self.layers),
                 "attention": float(attention_flops(self.query_width, context)),
                 "head": 2.0 * self.head_params}
        parts["total"] = sum(parts.values())
        return parts

    def flops_per_token(self, context: float) -> float:
        return self.flops_by_part(context)["total"]

    def kv_cache_bytes_per_token(self, item_bytes: int) -> int:
        """Bytes of KV cache one token of context holds: key and value of every layer, `item_bytes` each."""
        return 2 * self.kv_width * item_bytes

    def bytes_per_token(self, context: float = 0, kv_item_bytes: int = 2) -> float:
        """Bytes read per generated token at `context` tokens of context: the weights, and the KV cache."""
        return self.weight_bytes_per_token + context * self.kv_cache_bytes_per_token(kv_item_bytes)


def _input_embeddings(model):
    """The token embedding, None for a model that does not say (its bytes then count as read whole)."""
    try:
        return model.get_input_embeddings()
    except NotImplementedError:
        return None


def _branch_cost(block, branches, kind: str) -> BranchCost:
    own = count_parameters(getattr(block, branches.name(kind)))
    return BranchCost(own, own + sum(count_parameters(getattr(block, n)) for n in branches.norms.get(kind, ())))


@dataclass(frozen=True)
class MeasuredCost:
    """The measured cost model (`sleb.timing.measure_costs`): seconds of one forward pass at a named shape
    (`mode` prefill or generation, `tokens` of context), split by part, medians over `rounds`.

    `block_seconds[i]` is block i; `branch_seconds[i]` (where branches are known) its attention unit and MLP
    unit, each with the norms that serve only it (`Branches.norms`: they go with it); what a block takes
    beyond its two units (residual adds, the call) is `block_seconds[i]` minus both. `total_seconds` is the
    whole pass measured with the same hooks; what no block holds (embedding, final norm, LM head, masks,
    rotary tables, Python) is the rest. `info` says how it was measured (device, dtype, threads, versions,
    rounds, spread)."""

    mode: str
    tokens: int
    block_seconds: tuple[float, ...]
    total_seconds: float
    branch_seconds: tuple[tuple[float, float], ...] | None = None
    embedding_seconds: float = 0.0
    head_seconds: float = 0.0
    spread: float = 0.0  # half the range of the total over the rounds (the middle 80% of 10+), relative to its median
    info: dict = field(default_factory=dict)

    @property
    def spec(self) -> str:
        return f"{self.mode}:{self.tokens}"

    @property
    def fixed_seconds(self) -> float:
        """What no removal saves: the pass less its blocks."""
        return self.total_seconds - sum(self.block_seconds)

    def to_dict(self) -> dict:
        data = {"speed_at": self.spec, "total_seconds": self.total_seconds, "spread": self.spread,
                "fixed_seconds": self.fixed_seconds, "embedding_seconds": self.embedding_seconds,
                "head_seconds": self.head_seconds, "block_seconds": list(self.block_seconds)}
        if self.branch_seconds is not None:
            data["attention_seconds"] = [a for a, _ in self.branch_seconds]
            data["mlp_seconds"] = [m for _, m in self.branch_seconds]
        data["measured"] = dict(self.info)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "MeasuredCost":
        """The table `to_dict` wrote (a run file's or a checkpoint's `speed` entry)."""
        mode, _, tokens = data["speed_at"].partition(":")
        branches = None
        if data.get("attention_seconds") is not None:
            branches = tuple(zip(map(float, data["attention_seconds"]), map(float, data["mlp_seconds"])))
        return cls(mode, int(tokens), tuple(map(float, data["block_seconds"])), float(data["total_seconds"]),
                   branches, float(data.get("embedding_seconds", 0.0)), float(data.get("head_seconds", 0.0)),
                   float(data.get("spread", 0.0)), dict(data.get("measured") or {}))


@dataclass
class Sizer:
    """Parameter count and speedup of any removal set of a model, from per-unit sizes and costs (both add up).

    The units are the blocks, or with `branches` (`sleb.arch.find_branches`) each block's attention
    (id 2i: its weights and its attention over the context) and MLP (2i + 1). `block_params` and
    `block_flops` are indexed by unit id; a branch's `block_params` are its own module's (what
    `--unit-score per-parameter` divides by). `unit_params` is what removing a unit takes out of the
    saved model: a branch with the norms that serve only it (`Branches.norms`; the DeciLM and deci GGUF
    layouts drop them with it), so `params` is the saved model's count exactly. `block_rest` is what a
    block holds beyond its two units (a norm both serve), gone only with the whole block.

    The cost model: `block_flops` (by unit id) and `dense_flops` are FLOPs per token (the ideal), or with
    `measured` (`MeasuredCost`) seconds of one pass at its shape; there a block whose two units are both
    removed also saves `block_rest_cost` (its call and residual adds: the saved layouts delete it).
    """

    dense_params: int
    block_params: list[int]
    dense_flops: float
    block_flops: list[float]
    unit_params: list[int] | None = None  # None: block_params (whole blocks)
    block_rest: list[int] | None = None
    measured: MeasuredCost | None = None  # None: the FLOP ideal
    block_rest_cost: list[float] | None = None  # measured only, by block
    context: int = 0  # the FLOP model's context (what `cost_name` says)

    def flops(self, removed) -> float:
        """The cost of the model without `removed`, in the cost model's measure (FLOPs, or seconds)."""
        removed = set(removed)
        rest = sum(r for b, r in enumerate(self.block_rest_cost or []) if {2 * b, 2 * b + 1} <= removed)
        return self.dense_flops - sum(self.block_flops[b] for b in removed) - rest

    @property
    def cost_name(self) -> str:
        """How the cost model is said: `ideal FLOP speedup at context 2048`, `measured speedup at generation:1024`."""
        where = f" in {self.measured.info['runtime']}" if self.measured and self.measured.info.get("runtime") else ""
        return (f"measured speedup at {self.measured.spec}{where}" if self.measured is not None else
                f"ideal FLOP speedup at context {self.context}")

    @classmethod
    def of(cls, model, context: int, branches=None, measured: MeasuredCost | None = None) -> "Sizer":
        """From `model` (with `branches`: its attention and MLP units); costs from FLOPs at `context`, or the
        `measured` seconds (`sleb.timing.measure_costs`)."""
        cost = ModelCost.of_model(model, branches)
        dense_params, dense_flops = cost.params, cost.flops_per_token(context)
        if measured is not None:
            dense_flops = measured.total_seconds
            if len(measured.block_seconds) != len(cost.layers):
                raise SlebError(f"the measured costs are of {len(measured.block_seconds)} blocks, the model has "
                                f"{len(cost.layers)}")
        if branches is None:
            flops = ([layer.flops_per_token(context) for layer in cost.layers] if measured is None
                     else list(measured.block_seconds))
            return cls(dense_params, [layer.params for layer in cost.layers], dense_flops, flops, measured=measured,
                       context=context)
        if measured is not None and measured.branch_seconds is None:
            raise SlebError("the measured costs have no attention and MLP times; measure with the branches")
        params, flops, units, rest, rest_cost = [], [], [], [], []
        for i, layer in enumerate(cost.layers):
            for k, (kind, branch) in enumerate(zip(BRANCH_KINDS, layer.branches)):
                params.append(branch.module_params)
                flops.append(layer.branch_flops(kind, context) if measured is None else measured.branch_seconds[i][k])
                units.append(branch.params)
            rest.append(layer.params - units[-1] - units[-2])
            if measured is not None:
                rest_cost.append(max(0.0, measured.block_seconds[i] - sum(measured.branch_seconds[i])))
        return cls(dense_params, params, dense_flops, flops, units, rest, measured, rest_cost or None, context)

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

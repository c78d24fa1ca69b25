"""Architecture knowledge, in one place.

Everything `sleb` needs to know about a decoder's structure is discovered here from the module
tree and the config, never from model or class names:

* where the blocks live (`find_blocks`): the `nn.ModuleList` whose length equals the config's
  layer count and whose entries share one class;
* which config fields hold one entry per layer (`per_layer_config_fields`);
* which attributes inside a block carry its position in the stack (`LAYER_INDEX_ATTRIBUTES`),
  so the KV cache still addresses the right slot after blocks are deleted;
* how to run the stack one block at a time (`BlockRunner`): the arguments each block receives
  (masks, rotary embeddings, position ids, whatever the family uses) are recorded from one real
  forward pass and replayed, so any family that keeps its blocks in one `ModuleList` works.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from .errors import BadInput, SlebError

# Attributes that hold a block's index in the stack (attention modules use it to address the cache).
LAYER_INDEX_ATTRIBUTES = ("layer_idx", "layer_id", "layer_index")


def text_config(model_or_config):
    """The config section that describes the decoder stack (the model's own config for most models)."""
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config(decoder=True)


def num_layers(model) -> int:
    """The layer count as the config states it (`num_hidden_layers`, whatever the family calls it)."""
    cfg = text_config(model)
    n = getattr(cfg, "num_hidden_layers", None)
    if not isinstance(n, int):
        raise SlebError(
            f"{type(cfg).__name__} has no integer num_hidden_layers (nor an alias for it); "
            "cannot tell how many blocks the model has"
        )
    return n


def head_dim(model_or_config) -> int:
    """The size of one attention head: the config's `head_dim`, else hidden size / heads (the hidden
    size itself when the config states no heads)."""
    cfg = text_config(model_or_config)
    heads = getattr(cfg, "num_attention_heads", None)
    return getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else cfg.hidden_size)


def attention_width(model_or_config) -> int:
    """Query heads x head size (one head when the config states none)."""
    cfg = text_config(model_or_config)
    return (getattr(cfg, "num_attention_heads", None) or 1) * head_dim(cfg)


def kv_width(model_or_config) -> int:
    """Key (or value) heads x head size, one layer's K (or V) cache per token; the query heads without GQA."""
    cfg = text_config(model_or_config)
    heads = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", None) or 1
    return heads * head_dim(cfg)


def attending_layers(model) -> list[bool]:
    """Whether each block attends (and holds a KV cache): all of them, except in a model saved with sublayers
    removed (`sleb.decilm`: the DeciLM layout), whose config says per layer (`block_configs[i].attention.no_op`)."""
    entries = getattr(text_config(model), "block_configs", None)
    if isinstance(entries, (list, tuple)) and entries:
        def no_op(entry) -> bool:
            attention = entry["attention"] if isinstance(entry, dict) else entry.attention
            return bool(attention["no_op"] if isinstance(attention, dict) else attention.no_op)

        return [not no_op(entry) for entry in entries]
    return [True] * len(find_blocks(model).modules)


def attention_layers(model) -> int:
    """How many blocks attend (`attending_layers`)."""
    return sum(attending_layers(model))


def max_context(model) -> int | None:
    """The longest sequence the model was configured for, when the config says."""
    cfg = text_config(model)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass
class BlockList:
    """Where a model keeps its decoder blocks."""

    parent: nn.Module
    attribute: str
    path: str

    @property
    def modules(self) -> nn.ModuleList:
        return getattr(self.parent, self.attribute)

    def replace(self, new: nn.ModuleList) -> None:
        setattr(self.parent, self.attribute, new)


def find_blocks(model: nn.Module) -> BlockList:
    """Find the decoder's `ModuleList` of blocks without looking at model names.

    The blocks are the `nn.ModuleList` of `num_hidden_layers` modules of one class. When several
    lists qualify (rare: e.g. a vision tower of the same depth), the one holding the most
    parameters wins; ties go to the shallowest path.
    """
    n = num_layers(model)
    found: list[tuple[int, int, str]] = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) != n or n == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        n_params = sum(p.numel() for p in module.parameters())
        found.append((n_params, -path.count("."), path))
    if not found:
        raise SlebError(
            f"cannot find the decoder blocks of {type(model).__name__}: looked for an nn.ModuleList "
            f"of {n} modules of one class (num_hidden_layers={n} in the config) and found none"
        )
    path = max(found)[2]
    parent_path, _, attribute = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    return BlockList(parent=parent, attribute=attribute, path=path)


def per_layer_config_fields(config, n: int) -> list[str]:
    """Config fields that hold one entry per layer (lists or tuples of length `n`)."""
    names = []
    for name, value in config.to_dict().items():
        if isinstance(value, (list, tuple)) and len(value) == n and n > 1:
            names.append(name)
    return names


def renumber_layer_indices(blocks: nn.ModuleList) -> None:
    """Set every index attribute inside block i to i, so cache slots follow the new order."""
    for new_index, block in enumerate(blocks):
        for module in block.modules():
            for attr in LAYER_INDEX_ATTRIBUTES:
                if isinstance(getattr(module, attr, None), int):
                    setattr(module, attr, new_index)


def input_device(model: nn.Module) -> torch.device:
    """Where input ids must go: the device of the input embedding (differs from model.device under device_map)."""
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def check_causal(model: nn.Module, name: str = "the model") -> None:
    """Refuse a model whose outputs depend on later tokens (an encoder such as BERT behind an LM head).

    Structural, not by name: two inputs that share their first half must give the same logits
    there. Non-finite logits are left to the calibration-loss check, which names the bad window.
    """
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(0, vocab, (1, 16), generator=generator)
    second = first.clone()
    second[:, 8:] = torch.randint(0, vocab, (1, 8), generator=generator)
    # One batch: LLM.int8() (bitsandbytes) keeps in 16 bit the columns where any token of the input is an
    # outlier, so two separate calls would let later tokens move a causal model's earlier logits.
    logits = model(input_ids=torch.cat([first, second]).to(input_device(model)), use_cache=False).logits
    a, b = logits[:1, :8].float(), logits[1:, :8].float()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return
    tolerance = (1e-4 if a.dtype == torch.float32 and model.dtype == torch.float32 else 2e-2) * max(1.0, a.abs().max().item())
    if not (a - b).abs().max().item() <= tolerance:
        raise BadInput(
            f"{name} is not a causal decoder: its output at a position changes with later tokens "
            f"({type(model).__name__} attends in both directions); sleb prunes decoder-only causal LMs"
        )


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once what was needed has been captured."""


@dataclass
class _BlockCall:
    """How the model called one block: the positional and keyword arguments besides the hidden states."""

    args: tuple
    kwargs: dict
    hidden_as_kwarg: bool
    returns_tuple: bool = False
    tail: tuple = ()


def _hidden_of(args: tuple, kwargs: dict) -> tuple[torch.Tensor, bool]:
    if args:
        return args[0], False
    return kwargs["hidden_states"], True


class _Passthrough(nn.Module):
    """Stands in for a block: returns its input (or an injected tensor) shaped like a block's output."""

    def __init__(self, call: _BlockCall, inject: torch.Tensor | None = None):
        super().__init__()
        self.call = call
        self.inject = inject

    def forward(self, *args, **kwargs):
        hidden, _ = _hidden_of(args, kwargs)
        out = self.inject if self.inject is not None else hidden
        return (out, *self.call.tail) if self.call.returns_tuple else out


@dataclass
class BlockRunner:
    """Runs a causal LM piecewise: embeddings, any chosen blocks, then the head and the loss.

    Block calls are recorded once per input shape from a real forward pass (so masks, rotary
    tables and per-layer arguments are exactly the model's own) and replayed for every window
    and every candidate. The head is run by the model's own forward with the blocks swapped for
    pass-throughs, which keeps each family's final norm, projection and logit soft-capping.
    Blocks are addressed by their current position in the block list.
    """

    model: nn.Module
    blocks: BlockList = field(init=False)
    _calls: dict = field(default_factory=dict, init=False)

    def __post_init__(self):
        self.blocks = find_blocks(self.model)

    @property
    def num_units(self) -> int:
        """How many units `block` addresses (here the blocks; `sleb.units.BranchRunner`: their branches)."""
        return len(self.blocks.modules)

    def prepare(self, input_ids: torch.Tensor) -> "Branches | None":
        """The branches a runner of branch units skips (`sleb.units.BranchRunner`); whole blocks have none."""
        return None

    def unit_module(self, index: int) -> nn.Module:
        """The block that unit `index` runs (here block `index`)."""
        return self.blocks.modules[index]

    # -- embeddings and recorded block calls -------------------------------------------------
    def _record(self, input_ids: torch.Tensor) -> list[_BlockCall]:
        key = tuple(input_ids.shape)
        if key in self._calls:
            return self._calls[key]
        calls: list[_BlockCall | None] = [None] * len(self.blocks.modules)
        handles = []
        for i, block in enumerate(self.blocks.modules):

            def pre_hook(module, args, kwargs, i=i):
                _, as_kwarg = _hidden_of(args, kwargs)
                rest_args = args[1:] if not as_kwarg else args
                rest_kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                calls[i] = _BlockCall(rest_args, rest_kwargs, as_kwarg)

            def post_hook(module, args, kwargs, output, i=i):
                if isinstance(output, tuple):
                    calls[i].returns_tuple = True
                    calls[i].tail = tuple(output[1:])

            handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(block.register_forward_hook(post_hook, with_kwargs=True))
        try:
            self.model(input_ids=input_ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        if any(c is None for c in calls):
            raise SlebError(f"{type(self.model).__name__}'s forward did not call every block once")
        self._calls[key] = calls
        return calls

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states entering the first block."""
        input_ids = input_ids.to(input_device(self.model))
        self._record(input_ids)
        captured = {}

        def grab(module, args, kwargs):
            captured["h"], _ = _hidden_of(args, kwargs)
            raise _StopForward

        handle = self.blocks.modules[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured["h"]

    @torch.no_grad()
    def block(self, index: int, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Run block `index` (position in the current block list) on `hidden`."""
        call = self._record(input_ids)[index]
        module = self.blocks.modules[index]
        if call.hidden_as_kwarg:
            out = module(*call.args, hidden_states=hidden, **call.kwargs)
        else:
            out = module(hidden, *call.args, **call.kwargs)
        return out[0] if isinstance(out, tuple) else out

    # -- head and loss -------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits for hidden states leaving the last block, through the model's own head."""
        calls = self._record(input_ids.to(input_device(self.model)))
        original = self.blocks.modules
        standins = [_Passthrough(calls[0], inject=hidden)] + [_Passthrough(c) for c in calls[1:]]
        self.blocks.replace(nn.ModuleList(standins))
        try:
            return self.model(input_ids=input_ids.to(input_device(self.model)), use_cache=False).logits
        finally:
            self.blocks.replace(original)

    def window_losses(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of each window (float64, on CPU)."""
        return next_token_losses(self.logits(hidden, input_ids), input_ids)


def next_token_losses(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy per row of a [batch, seq] window batch, as float64 on CPU."""
    labels = input_ids[:, 1:].to(logits.device)
    # One window at a time: the float32 copy and log-softmax of a whole batch's logits (batch x
    # seqlen x vocab) fall out of cache; measured 3 ms for one 128-token window of a 49k vocabulary
    # and 175 ms for four at once.
    losses = [torch.nn.functional.cross_entropy(logits[i, :-1, :].float(), labels[i]) for i in range(labels.shape[0])]
    return torch.stack(losses).double().cpu()


# -- where a block writes to the residual stream ------------------------------------------------
@dataclass
class ResidualWriter:
    """An affine layer inside a block whose output is added, unchanged, to the block's output.

    For such a layer, multiplying its output by a matrix T (on the right) can be folded into its
    weights exactly: `fold` does it. `transposed` is True for layers that store the weight as
    [in, out] (GPT-2's Conv1D) rather than nn.Linear's [out, in].
    """

    module: nn.Module
    path: str  # inside the block
    transposed: bool

    @torch.no_grad()
    def fold(self, transform: torch.Tensor) -> None:
        """Replace the layer's output y by y @ transform, in place (computed in float64)."""
        weight = self.module.weight
        t = transform.to(device=weight.device, dtype=torch.float64)
        new = weight.double() @ t if self.transposed else t.T @ weight.double()
        weight.copy_(new.to(weight.dtype))
        bias = getattr(self.module, "bias", None)
        if bias is not None:
            bias.copy_((bias.double() @ t).to(bias.dtype))


def _affine_writers(block: nn.Module, hidden_size: int) -> list[ResidualWriter]:
    """Affine layers of `block` that output `hidden_size` features, in registration order."""
    from transformers.pytorch_utils import Conv1D

    found = []
    for path, module in block.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == hidden_size:
            found.append(ResidualWriter(module, path, transposed=False))
        elif isinstance(module, Conv1D) and module.nf == hidden_size:
            found.append(ResidualWriter(module, path, transposed=True))
    return found


@torch.no_grad()
def residual_writer(runner: BlockRunner, index: int, hidden: torch.Tensor, input_ids: torch.Tensor) -> ResidualWriter:
    """The MLP output projection of block `index`: the last affine layer whose output the block adds
    to its residual stream as is, proven by a probe rather than by names. For a branch runner
    (`sleb.units.BranchRunner`), `index` is a unit and the layer found is that branch's output
    projection (the other branch is skipped, so its layers never fire).

    The probe runs the block on `hidden` twice, the second time with a random tensor added to the
    layer's output; the layer qualifies when the block's output moves by exactly that tensor. This
    holds for the MLP (and attention) output projections of pre-norm and parallel-residual blocks,
    and fails where a norm follows the projection before the residual add (post-norm families),
    where a single layer does not carry the whole write (mixture-of-experts) and for everything
    inside a sublayer. Of the qualifying layers the last registered one is taken (the MLP's).
    """
    block = runner.unit_module(index)
    base = runner.block(index, hidden, input_ids)
    scale = base.float().pow(2).mean().sqrt().clamp_min(1e-3).item()
    tol = 1e-3 if base.dtype in (torch.float32, torch.float64) else 5e-2
    generator = torch.Generator().manual_seed(index)
    for writer in reversed(_affine_writers(block, base.shape[-1])):
        delta = (torch.randn(base.shape, generator=generator) * scale).to(device=base.device, dtype=base.dtype)

        def add(module, args, output, delta=delta):
            return output + delta.to(output.device)

        handle = writer.module.register_forward_hook(add)
        try:
            moved = runner.block(index, hidden, input_ids)
        finally:
            handle.remove()
        error = (moved.float() - base.float() - delta.to(moved.device).float()).abs().max().item()
        if error <= tol * delta.float().abs().max().item():
            return writer
    family = getattr(text_config(runner.model), "model_type", type(runner.model).__name__)
    raise SlebError(
        f"cannot fold a linear map into {'block' if type(runner) is BlockRunner else 'unit'} {index} of {family} ({type(runner.model).__name__}): no linear layer "
        "in it adds its output unchanged to the residual stream (a norm follows the MLP output before the residual "
        "add, as in post-norm families such as Gemma-2/3 and OLMo-2, or the MLP is a mixture of experts)"
    )


# -- the two residual branches of a block (attention and MLP) ------------------------------------
BRANCH_KINDS = ("attn", "mlp")


class ZeroBranch(nn.Module):
    """Stands in for a skipped branch: outputs zeros shaped like its input (so `x + branch(...)` is `x`),
    in the structure the real branch returned (a tensor, or a tuple whose tail is None)."""

    def __init__(self, returns_tuple: bool, tail_length: int):
        super().__init__()
        self.returns_tuple = returns_tuple
        self.tail_length = tail_length

    def forward(self, *args, **kwargs):
        hidden, _ = _hidden_of(args, kwargs)
        zeros = torch.zeros_like(hidden)
        return (zeros, *([None] * self.tail_length)) if self.returns_tuple else zeros


@dataclass
class Branches:
    """Where each block keeps its attention and MLP branches: the attribute names (one pair for every
    block, since the blocks share one class) and the stand-in that skips each. `norms[kind]` names the
    block's norms (children with only vector weights) that serve only that branch, normalising its input
    or its output: a branch removed from a saved model takes them along (`sleb.sizes.Sizer`)."""

    attn: str
    mlp: str
    standins: dict[str, ZeroBranch]
    norms: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def name(self, kind: str) -> str:
        return self.attn if kind == "attn" else self.mlp


def _first_input(args: tuple, kwargs: dict):
    """A module call's hidden states (first positional, else `hidden_states`), None when neither is there."""
    return args[0] if args else kwargs.get("hidden_states")


def _matrix_children(block: nn.Module) -> list[str]:
    """Direct children of `block` that hold a weight matrix (norms hold only vectors)."""
    return [name for name, child in block.named_children()
            if any(p.dim() >= 2 for p in child.parameters())]


@contextlib.contextmanager
def skipped(block: nn.Module, branches: Branches, kinds) -> Iterator[None]:
    """Temporarily replace the branches of `block` named in `kinds` by their zero stand-ins."""
    saved = {kind: getattr(block, branches.name(kind)) for kind in kinds}
    try:
        for kind in kinds:
            setattr(block, branches.name(kind), branches.standins[kind])
        yield
    finally:
        for kind, module in saved.items():
            setattr(block, branches.name(kind), module)


@torch.no_grad()
def find_branches(runner: "BlockRunner", input_ids: torch.Tensor) -> Branches:
    """Find each block's attention and MLP branch from the module tree and a forward probe, not names.

    The branches are the two direct children of a block that hold weight matrices; attention is the
    one called with more than the hidden states (mask, positions, rotary tables, cache), the MLP the
    one called with the hidden states alone. Then every block is probed on the model's own hidden
    states, and the units are refused (SlebError, one line) unless skipping is exact:

    * both branches zeroed must give the block's input back (else a norm or another write follows the
      residual adds: post-norm families such as OPT with `do_layer_norm_before=False`);
    * the block must equal its attention unit followed by its MLP unit (else the MLP reads the block's
      input, not the attention's output: parallel-residual families such as GPT-NeoX, GPT-J, Phi-1/2).
    """
    family = getattr(text_config(runner.model), "model_type", type(runner.model).__name__)
    first = runner.blocks.modules[0]
    names = _matrix_children(first)
    for index, block in enumerate(runner.blocks.modules):
        held = _matrix_children(block)
        if held != names:  # e.g. a DeciLM model's layers without attention or MLP
            raise SlebError(f"the blocks of {family} differ (block {index} holds {', '.join(held) or 'no weights'}, "
                            f"block 0 {', '.join(names)}): some have lost a branch already; use --unit block")
    if len(names) != 2:
        raise SlebError(f"cannot split the blocks of {family} into an attention and an MLP branch: a block has "
                        f"{len(names)} children with weight matrices ({', '.join(names) or 'none'}), not 2")
    seen: dict[str, tuple] = {}
    ends: dict[str, tuple] = {}  # the first call's (input hidden states, output) of every branch and norm

    def probe(name):
        def pre(module, args, kwargs):
            seen.setdefault(name, (len(args), len([v for v in kwargs.values() if v is not None])))

        def post(module, args, kwargs, output):
            if len(seen[name]) == 2:  # the first call only (recording the block calls runs the model too)
                is_tuple = isinstance(output, tuple)
                seen[name] = seen[name] + (is_tuple, len(output) - 1 if is_tuple else 0)
            ends.setdefault(name, (_first_input(args, kwargs), output[0] if isinstance(output, tuple) else output))
        return pre, post

    def probe_norm(name):
        def post(module, args, kwargs, output):
            ends.setdefault(name, (_first_input(args, kwargs), output))
        return post

    norm_names = [name for name, child in first.named_children()
                  if name not in names and any(True for _ in child.parameters())
                  and all(p.dim() == 1 for p in child.parameters())]
    handles = []
    for name in names:
        pre, post = probe(name)
        child = getattr(first, name)
        handles.append(child.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(child.register_forward_hook(post, with_kwargs=True))
    for name in norm_names:
        handles.append(getattr(first, name).register_forward_hook(probe_norm(name), with_kwargs=True))
    try:
        hidden = runner.embed(input_ids)
        BlockRunner.block(runner, 0, hidden, input_ids)
    finally:
        for h in handles:
            h.remove()
    if set(seen) != set(names):
        raise SlebError(f"cannot split the blocks of {family}: its block forward does not call "
                        f"{', '.join(sorted(set(names) - set(seen)))}")
    inputs = {name: seen[name][0] + seen[name][1] for name in names}
    attn, mlp = sorted(names, key=lambda n: -inputs[n])
    if inputs[attn] == inputs[mlp]:
        raise SlebError(f"cannot tell the attention branch of {family} from its MLP: {attn} and {mlp} are called "
                        "with the same number of inputs")
    # A norm serves a branch when its output is the branch's input or its input is the branch's output
    # (tensor identity in the probe's forward: Llama's input_layernorm, Gemma-2's post-attention norm).
    norms = {kind: tuple(n for n in norm_names if n in ends and
                         (ends[n][1] is ends[branch][0] or ends[n][0] is ends[branch][1]))
             for kind, branch in (("attn", attn), ("mlp", mlp))}
    shared = set(norms["attn"]) & set(norms["mlp"])  # serves both: it stays while the block does
    norms = {kind: tuple(n for n in names_ if n not in shared) for kind, names_ in norms.items()}
    branches = Branches(attn, mlp, {"attn": ZeroBranch(*seen[attn][2:]), "mlp": ZeroBranch(*seen[mlp][2:])}, norms)
    _check_exact_skips(runner, branches, input_ids, hidden, family)
    return branches


def _check_exact_skips(runner, branches: Branches, input_ids, hidden, family: str) -> None:
    tol = 1e-5 if hidden.dtype in (torch.float32, torch.float64) else 1e-2
    run = functools.partial(BlockRunner.block, runner)
    for index, block in enumerate(runner.blocks.modules):
        scale = hidden.float().abs().max().clamp_min(1e-6).item()
        with skipped(block, branches, BRANCH_KINDS):
            identity = run(index, hidden, input_ids)
        if (identity.float() - hidden.float()).abs().max().item() > tol * scale:
            raise SlebError(f"cannot skip branches of {family} exactly: block {index} with both branches zeroed does "
                            "not return its input (a norm or another write follows the residual adds, as in "
                            "post-norm blocks); use --unit block")
        full = run(index, hidden, input_ids)
        with skipped(block, branches, ("mlp",)):
            after_attn = run(index, hidden, input_ids)
        with skipped(block, branches, ("attn",)):
            composed = run(index, after_attn, input_ids)
        out_scale = full.float().abs().max().clamp_min(1e-6).item()
        if (composed.float() - full.float()).abs().max().item() > tol * out_scale:
            raise SlebError(f"cannot split the blocks of {family} into a sequence of branches: block {index}'s MLP "
                            "reads the block's input, not the attention's output (parallel residual); use --unit block")
        hidden = full

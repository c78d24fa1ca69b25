"""Healing: a short, budgeted distillation of the pruned model toward the dense one.

After blocks are removed (and, if asked, compensated), a small, stated set of parameters is
trained so that the pruned model's next-token distribution matches the dense model's on
calibration text (knowledge distillation, as LinearPatch and Shortened-LLaMA heal). The dense
model's distributions are computed once, before removal, and kept compactly: for every position
the teacher's top-k log-probabilities and their token ids, plus the mass of the rest as one
bucket, so the loss is the exact KL divergence over k + 1 outcomes and the teacher never runs
again. A slice of the text, cut apart from the training windows, is held out: its KL to the dense
model (and its perplexity) is measured as training goes, training stops early when the KL no
longer improves, and the best state is what is kept. The budget is wall-clock minutes and/or steps, not epochs.

Parameter sets (`sleb.settings.HEAL_PARAMETER_SETS`):

* ``neighbours``: every weight of the kept blocks on either side of each removed run;
* ``lora``: LoRA adapters (peft) on the linear layers of those blocks, merged into the weights
  at the end, so the result is a plain checkpoint;
* ``tail``: the final norm, the LM head (with tied embeddings: the shared embedding) and the
  last `last_blocks` blocks (arXiv 2411.15558 finds the head and last layers heal best);
* ``maps``: only the output projections that `--compensate` folded its maps into (LinearPatch's
  choice); needs compensation.

With branch units (`sleb.units`) the blocks near the removals also include each block that lost one
branch (`removed_neighbours`), and what a removed branch left in its block is never trained.

The model is edited in place; nothing is written but, with a checkpoint path, the heal's state after
every held-out scoring, from which the same heal resumes (`heal_checkpoint_path`). Under torchrun
the ranks share each step's batch through DistributedDataParallel (docs/healing.md).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import data, distributed
from .arch import find_blocks, input_device, text_config
from .errors import BadInput, SlebError, SlebWarning
from .fingerprint import model_fingerprint, same_model
from .outputs import atomic_write
from .progress import progress_bar
from .settings import Healing, differing_settings
from .units import lost_parts, remove_units, unit_kind

# Positions (batch rows x sequence positions, flattened) whose logits are computed at once: the loss never
# holds more than this many rows of the vocabulary in float32 (256 x 49k x 4 B = 50 MB for SmolLM2; 155 MB
# for a 152k vocabulary), small beside the weights yet wide enough that the head's matrix product stays efficient.
HEAD_CHUNK_ROWS = 256


@dataclass
class TeacherTargets:
    """The dense model's next-token distributions on the training windows, kept as top-k log-probs."""

    logprobs: torch.Tensor  # float32 [windows, seqlen - 1, k]
    tokens: torch.Tensor  # int32 [windows, seqlen - 1, k]

    def batch(self, rows: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logprobs[rows].to(device), self.tokens[rows].to(device)


@dataclass
class HealRecord:
    """What healing did (the run file's `healing` entry)."""

    params: str
    trained: list[str]  # the trained modules (or LoRA targets), by name in the pruned model
    trained_parameters: int
    text: str | None
    windows: int
    heldout_windows: int
    seqlen: int
    batch_size: int
    lr: float
    top_k: int
    seed: int
    budget: dict
    steps: int = 0
    best_step: int = 0
    stopped_by: str = ""
    teacher_seconds: float = 0.0
    seconds: float = 0.0
    heldout_kl_before: float | None = None  # KL to the dense model on the held-out slice (picks the state kept)
    heldout_kl_after: float | None = None
    heldout_ppl_before: float | None = None
    heldout_ppl_after: float | None = None
    checkpointing: bool = False  # gradient checkpointing over the blocks the gradient passes through
    autocast: str | None = None  # the half precision the training passes ran in (None: the model's dtype)
    curve: list[dict] = field(default_factory=list)  # {step, seconds, train_kl, heldout_kl, heldout_ppl}
    world_size: int = 1  # torchrun ranks that shared each step's batch
    resumed_from: int | None = None  # the step a --checkpoint resumed from

    def to_dict(self) -> dict:
        return asdict(self)


def split_windows(windows: torch.Tensor, train: int, heldout: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle non-overlapping windows (seeded) and cut `heldout` of them apart, then up to `train` more.

    Raises BadInput when the text cannot give the held-out slice and at least one training window."""
    if windows.shape[0] < heldout + 1:
        raise BadInput(f"the calibration text gives {windows.shape[0]} windows of {windows.shape[1]} tokens; healing "
                       f"needs {heldout} held out and at least one to train on: use a longer text, a shorter "
                       "--heal-seqlen or fewer --heal-heldout-windows")
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))
    shuffled = windows[order]
    return shuffled[heldout : heldout + train], shuffled[:heldout]


class TeacherClock:
    """The dense model's passes against `--heal-minutes`: they count towards it, so a pass that cannot end
    within it is stopped as soon as that is clear, not after it has spent the budget.

    `tick` after every batch projects the passes' time from the fastest window timed so far and raises
    BadInput once even that projection exceeds the budget; a first batch alone decides only when it
    has overrun the budget itself (it may be slow for warm-up alone). `windows` is every window the
    passes will score (training and held out)."""

    def __init__(self, minutes: float | None, windows: int):
        self.budget = None if minutes is None else minutes * 60
        self.minutes, self.windows = minutes, windows
        self.started = self._last = time.perf_counter()
        self.done, self.batches, self.fastest = 0, 0, math.inf

    def tick(self, windows: int) -> None:
        now = time.perf_counter()
        self.fastest = min(self.fastest, (now - self._last) / windows)
        self.done, self.batches, self._last = self.done + windows, self.batches + 1, now
        if self.budget is None or self.done >= self.windows:
            return
        elapsed = now - self.started
        projected = elapsed + (self.windows - self.done) * self.fastest
        if projected > self.budget and (self.batches > 1 or elapsed > self.budget):
            raise BadInput(f"--heal-minutes {self.minutes:g} is too short: the dense model's pass over the "
                           f"{self.windows} healing windows, which counts towards it, would take at least "
                           f"{projected:.3g} s of its {self.budget:.3g} s (timed on {self.done}); give more "
                           "--heal-minutes, fewer --heal-windows or a shorter --heal-seqlen")


@torch.no_grad()
def teacher_targets(model, windows: torch.Tensor, top_k: int, *, batch_size: int = 1,
                    progress: bool = True, clock: TeacherClock | None = None) -> TeacherTargets:
    """Run the (dense) model once over `windows` and keep each position's top-k next-token log-probs.

    The logits are computed `HEAD_CHUNK_ROWS` positions at a time (`final_hidden`, `head_logits`), so a
    batch's full logits are never held. With a `clock`, every batch is timed against its budget
    (`TeacherClock.tick`)."""
    device = input_device(model)
    check_head(model, windows[:1, : min(16, windows.shape[1])].to(device))
    logprobs, tokens = [], []
    for start in progress_bar(range(0, windows.shape[0], batch_size), desc="teacher (dense model)", unit="batch",
                              disable=not progress, leave=False):
        ids = windows[start : start + batch_size].to(device)
        hidden = final_hidden(model, ids)[:, :-1]
        rows = hidden.reshape(-1, hidden.shape[-1])
        values, indices = [], []
        for lo in range(0, rows.shape[0], HEAD_CHUNK_ROWS):
            top = torch.log_softmax(head_logits(model, rows[lo : lo + HEAD_CHUNK_ROWS]).float(), -1).topk(top_k, -1)
            values.append(top.values.cpu())
            indices.append(top.indices.to(torch.int32).cpu())
        logprobs.append(torch.cat(values).reshape(*hidden.shape[:2], top_k))
        tokens.append(torch.cat(indices).reshape(*hidden.shape[:2], top_k))
        if clock is not None:
            clock.tick(ids.shape[0])
    return TeacherTargets(torch.cat(logprobs), torch.cat(tokens))


@dataclass
class Teacher:
    """The dense model's top-k targets on the healing windows (`dense_teacher`), taken before compensation
    and removal; one serves every heal of the same model (`sleb compare --heal` heals every row with it)."""

    train: torch.Tensor
    heldout: torch.Tensor
    targets: TeacherTargets
    heldout_targets: TeacherTargets
    seconds: float  # the dense model's passes, which count towards each heal's --heal-minutes


def heal_windows(tokenizer, spec: str, settings: Healing, seqlen: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training and held-out windows of `settings` (`seqlen` tokens unless `settings.seqlen`), cut
    without overlap from the train part of `spec` (`split_windows`)."""
    windows = data.consecutive_windows(tokenizer, spec, "train", settings.seqlen or seqlen)
    return split_windows(windows, settings.windows, settings.heldout_windows, seed)


def dense_teacher(model, windows: tuple[torch.Tensor, torch.Tensor], settings: Healing, *, batch_size: int,
                  progress: bool = True) -> Teacher:
    """Run the dense `model` once over the (training, held-out) `windows` and keep its top-k log-probs; the
    passes are timed against `settings.minutes` (`TeacherClock`)."""
    started = time.perf_counter()
    train, held = windows
    clock = TeacherClock(settings.minutes, train.shape[0] + held.shape[0])
    targets = teacher_targets(model, train, settings.top_k, batch_size=batch_size, progress=progress, clock=clock)
    held_targets = teacher_targets(model, held, settings.top_k, batch_size=batch_size, progress=False, clock=clock)
    return Teacher(train, held, targets, held_targets, time.perf_counter() - started)


class _StopForward(Exception):
    pass


def final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """The hidden states entering the model's output head ([batch, seqlen, hidden]): its forward is cut
    there, so the logits of the whole batch are never computed (gradients flow when enabled)."""
    captured = {}

    def grab(module, args):
        captured["h"] = args[0]
        raise _StopForward

    handle = model.get_output_embeddings().register_forward_pre_hook(grab)
    try:
        model(input_ids=ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if "h" not in captured:
        raise SlebError(f"{type(model).__name__}'s forward did not call its output head")
    return captured["h"]


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of `hidden` (states entering the head) as the model's forward makes them: the head, then the
    scalings some families apply to its output (Gemma 2/3's soft-capping, Cohere's and Granite's scale).
    `check_head` verifies this against the model's own logits."""
    logits = model.get_output_embeddings()(hidden)
    config = text_config(model)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    if getattr(config, "logit_scale", None) is not None:
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None) is not None:
        logits = logits / config.logits_scaling
    return logits


@torch.no_grad()
def check_head(model, ids: torch.Tensor) -> None:
    """SlebError unless `head_logits(final_hidden)` is the model's own logits on `ids` (a few tokens): a
    family that treats its logits in a way `head_logits` does not know is stopped before any work."""
    if model.get_output_embeddings() is None:
        raise SlebError(f"--heal needs the model's output head; {type(model).__name__} does not name one")
    own = model(input_ids=ids, use_cache=False).logits.float()
    ours = head_logits(model, final_hidden(model, ids)).float()
    if not torch.allclose(own, ours, rtol=1e-3, atol=1e-3 * max(1.0, own.abs().max().item())):
        raise SlebError(f"--heal computes the logits in chunks through the output head, and that does not give "
                        f"{type(model).__name__}'s logits (a treatment of the logits sleb does not know)")


def _kl_sum(logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_tokens: torch.Tensor) -> torch.Tensor:
    """Summed KL(teacher || student) over rows: `logits` [..., vocab], teacher tensors [..., k]."""
    student = torch.log_softmax(logits.float(), dim=-1)
    student_top = student.gather(-1, teacher_tokens.long())
    teacher_p = teacher_logprobs.exp()
    teacher_rest = (1.0 - teacher_p.sum(-1)).clamp_min(1e-8)
    student_rest = (1.0 - student_top.exp().sum(-1)).clamp_min(1e-8)
    kl = (teacher_p * (teacher_logprobs - student_top)).sum(-1) + teacher_rest * (teacher_rest.log() - student_rest.log())
    return kl.sum()


def distillation_loss(logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_tokens: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) on the teacher's top-k tokens plus one bucket for the rest.

    `logits` [batch, seqlen, vocab] (the student's, all positions); teacher tensors [batch, seqlen - 1, k].
    The reference for `chunked_distillation_loss`, which the heal uses.
    """
    # The logits may sit on another device than the inputs (a model spread over GPUs).
    teacher_logprobs, teacher_tokens = teacher_logprobs.to(logits.device), teacher_tokens.to(logits.device)
    return _kl_sum(logits[:, :-1], teacher_logprobs, teacher_tokens) / teacher_tokens.shape[:-1].numel()


def chunked_distillation_loss(model, hidden: torch.Tensor, teacher_logprobs: torch.Tensor,
                              teacher_tokens: torch.Tensor, chunk: int = HEAD_CHUNK_ROWS) -> torch.Tensor:
    """`distillation_loss` from the hidden states entering the head ([batch, seqlen, hidden]), `chunk`
    positions at a time. With gradients on, each chunk's head and loss are recomputed in the backward
    pass (torch checkpointing), so only one chunk's float32 logits exist at any time, forward or backward."""
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    lp = teacher_logprobs.to(rows.device).reshape(rows.shape[0], -1)
    tok = teacher_tokens.to(rows.device).reshape(rows.shape[0], -1)

    def part(h, t_lp, t_tok):
        return _kl_sum(head_logits(model, h), t_lp, t_tok)

    total = rows.new_zeros((), dtype=torch.float32)
    for lo in range(0, rows.shape[0], chunk):
        args = (rows[lo : lo + chunk], lp[lo : lo + chunk], tok[lo : lo + chunk])
        total = total + (checkpoint(part, *args, use_reentrant=False) if torch.is_grad_enabled() else part(*args))
    return total / rows.shape[0]


def removed_neighbours(removed: list[int], num_blocks: int, unit: str = "block") -> list[int]:
    """Indices, in the pruned model, of the blocks a heal trains near the removals (`lora`, `neighbours`).

    A block is touched when a removal takes it whole or takes one of its branches (`sleb.units`; a unit id
    counts for its block). The blocks near the removals are every touched block still in the pruned model
    (one that lost a branch: its other branch remains) and the kept blocks just before and just after each
    maximal run of consecutive touched blocks. With whole blocks this is the kept block on each side of
    every removed run; `[3.attn]` of 6 blocks gives blocks 2, 3 and 4."""
    from .compensate import removed_runs

    space = unit_kind(unit).space(num_blocks)
    touched = space.lost_branches(removed)
    survivors = space.surviving_blocks(removed)
    near = {b for b in touched if b in survivors}
    for run in removed_runs(touched):
        near.update(side for side in (run[0] - 1, run[-1] + 1) if 0 <= side < num_blocks)
    return sorted(survivors.index(b) for b in near)


def _norms_outside_blocks(model) -> list[tuple[str, nn.Module]]:
    """Modules outside the blocks with only 1-D parameters (the final norm), found by structure, not by name."""
    block_ids = {id(m) for b in find_blocks(model).modules for m in b.modules()}
    found = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if id(module) not in block_ids and own and all(p.dim() == 1 for p in own):
            found.append((name, module))
    return found


def _linear_names(model, block_indices: list[int]) -> list[str]:
    """Full names of the linear layers (nn.Linear, GPT-2's Conv1D) inside the given blocks."""
    from transformers.pytorch_utils import Conv1D

    blocks = [find_blocks(model).modules[i] for i in block_indices]
    ids = {id(m) for b in blocks for m in b.modules() if isinstance(m, (nn.Linear, Conv1D))}
    return [name for name, m in model.named_modules() if id(m) in ids]


def _block_parts(name: str, block: nn.Module, lost: tuple[str, ...]) -> dict[str, nn.Module]:
    """A block by its name, or, when it lost a branch, its other children (what the lost branch left behind
    does not run: `sleb.units.lost_parts`)."""
    if not lost:
        return {name: block}
    return {f"{name}.{child}": module for child, module in block.named_children() if child not in lost}


def trainable_modules(model, params: str, near: list[int], *, last_blocks: int = Healing.last_blocks,
                      compensation: dict | None = None, removed: list[int] | None = None,
                      lost: dict[int, tuple[str, ...]] | None = None) -> dict[str, nn.Module]:
    """The modules whose parameters `params` trains, by name in the (pruned) model. `lost`: for the pruned
    blocks that lost a branch, the children left behind by it (`sleb.units.lost_parts`), never trained."""
    blocks = find_blocks(model).modules
    names = {id(m): n for n, m in model.named_modules()}
    lost = lost or {}

    def parts(indices) -> dict[str, nn.Module]:
        return {name: module for i in indices
                for name, module in _block_parts(names[id(blocks[i])], blocks[i], lost.get(i, ())).items()}

    if params in ("neighbours", "lora"):  # lora: the blocks whose linear layers get adapters
        return parts(near)
    if params == "tail":
        chosen = parts(range(max(0, len(blocks) - last_blocks), len(blocks)))
        chosen.update(dict(_norms_outside_blocks(model)))
        head = model.get_output_embeddings()
        if head is not None:
            chosen[names[id(head)]] = head
        return chosen
    if params == "maps":
        runs = [r for r in (compensation or {}).get("runs", []) if r.get("projection") and r.get("fold_block") is not None]
        if not runs:
            raise SlebError("--heal maps trains the maps --compensate folded; no map was folded")
        # The fold unit is kept, so its block is in the pruned model (compensation counts units as the search).
        space = unit_kind((compensation or {}).get("unit", "block")).space(0)
        gone = set(space.gone_blocks(removed or []))
        survivors = [b for b in range(len(blocks) + len(gone)) if b not in gone]
        chosen = {}
        for run in runs:
            block = blocks[survivors.index(space.block_of(run["fold_block"]))]
            chosen[f"{names[id(block)]}.{run['projection']}"] = block.get_submodule(run["projection"])
        return chosen
    raise SlebError(f"no modules for parameter set {params!r}")


@torch.no_grad()
def heldout_scores(model, windows: torch.Tensor, teacher: TeacherTargets, batch_size: int) -> tuple[float, float]:
    """KL to the teacher (mean per position) and perplexity of `model` on `windows`, from one forward pass
    (the logits `HEAD_CHUNK_ROWS` positions at a time).

    Under torchrun each rank scores every world_size-th batch and the sums are all-reduced (then rank 0's
    taken by all), so every rank gets the same numbers and takes the same early-stopping decisions."""
    device = input_device(model)
    kl = nll = 0.0
    positions = 0
    world, rank = distributed.world_size(), distributed.rank()
    for index, start in enumerate(range(0, windows.shape[0], batch_size)):
        if index % world != rank:
            continue
        rows = torch.arange(start, min(start + batch_size, windows.shape[0]))
        ids = windows[rows].to(device)
        hidden = final_hidden(model, ids)
        kl += chunked_distillation_loss(model, hidden, *teacher.batch(rows, device)).item() * len(rows)
        flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        labels = ids[:, 1:].reshape(-1).to(flat.device)
        for lo in range(0, flat.shape[0], HEAD_CHUNK_ROWS):
            logits = head_logits(model, flat[lo : lo + HEAD_CHUNK_ROWS]).float()
            nll += torch.nn.functional.cross_entropy(logits, labels[lo : lo + HEAD_CHUNK_ROWS], reduction="sum").item()
        positions += labels.numel()
    if world > 1:
        sums = torch.tensor([kl, nll, positions], dtype=torch.float64)
        sums = distributed.all_reduce_sum(sums, device).to(device)
        torch.distributed.broadcast(sums, 0)
        kl, nll, positions = sums.tolist()
    return kl / windows.shape[0], math.exp(nll / positions)


@contextlib.contextmanager
def checkpointed_blocks(model, first: int):
    """Gradient checkpointing over blocks `first`.. (those the gradient passes through): each keeps only its
    input during the forward pass and is recomputed in the backward pass (torch.utils.checkpoint,
    use_reentrant=False, so parameters that need gradients, LoRA's included, get them whatever the inputs).

    Why not transformers' `activation_checkpointing_enable`: its layers checkpoint only in training mode,
    and the heal runs the model in eval mode (no dropout, so a seed gives the same weights); wrapping the
    blocks found by `find_blocks` also covers every family alike. The blocks' own `forward` is back after."""
    blocks = list(find_blocks(model).modules)[first:]
    saved = []
    for block in blocks:
        own = block.__dict__.get("forward")  # a forward set on the instance (accelerate's hooks) stays under ours
        inner = block.forward

        def wrapped(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        saved.append((block, own))
        block.forward = wrapped
    try:
        yield
    finally:
        for block, own in saved:
            if own is None:
                del block.forward
            else:
                block.forward = own


def autocast_dtype(model) -> torch.dtype | None:
    """The half precision the heal's training passes autocast to: bf16 on a CUDA device that has it, else fp16
    on CUDA (with a gradient scaler); None on CPU (float32 stays float32: CPU autocast is slower there and
    not exact) and for a model already in half precision."""
    device = input_device(model)
    if device.type != "cuda" or next(model.parameters()).dtype != torch.float32:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _first_trained_block(model) -> int:
    for i, block in enumerate(find_blocks(model).modules):
        if any(p.requires_grad for p in block.parameters()):
            return i
    return len(find_blocks(model).modules)  # only the head trains: no block needs its activations


def heal(model, train: torch.Tensor, heldout: torch.Tensor, teacher: TeacherTargets, heldout_teacher: TeacherTargets,
         settings: Healing, *,
         near: list[int], removed: list[int] | None = None, compensation: dict | None = None,
         lost: dict[int, tuple[str, ...]] | None = None, seed: int = 0,
         text: str | None = None, teacher_seconds: float = 0.0, progress: bool = True,
         checkpoint: str | os.PathLike | None = None, identity: dict | None = None,
         on_status: Callable[[str], None] | None = None) -> HealRecord:
    """Distil the pruned `model` toward `teacher` on `train`, in place, within `settings`' budget.

    `heldout` windows (with the dense model's targets `heldout_teacher`) are never trained on: the
    KL to the dense model there chooses the state kept, and their perplexity is reported.

    `near` are the pruned model's blocks next to the removed runs (`removed_neighbours`); with branch units,
    `lost` names what each block's removed branch left behind (`sleb.units.lost_parts`), which is not trained.
    `teacher_seconds`, the dense model's passes (`teacher_targets`), count towards `settings.minutes`;
    whatever ran between them and this call (compensation, removal) does not. The state with the
    lowest held-out KL (the untrained model included) is the one left in `model`; LoRA adapters are
    merged into its weights. A SlebWarning says so when that is the untrained state (no step ran, or
    none improved on it).

    Memory (docs/healing.md): with `settings.checkpointing` the blocks from the first trained one on are
    checkpointed (`checkpointed_blocks`); the loss is computed `HEAD_CHUNK_ROWS` positions at a time;
    on CUDA the training passes autocast to half precision (`autocast_dtype`), on CPU they stay as is.

    Under torchrun (`sleb.distributed`) every rank holds the model and all the windows; each step's
    batch of `settings.batch_size` windows (the global batch, drawn as in one process) is split
    between the ranks (`rank_share`), their gradients are averaged by DistributedDataParallel, and
    the held-out slice is scored data-parallel and summed, so every rank takes the same steps and
    decisions and the result is one process's within float rounding.

    `checkpoint`: a file (`heal_checkpoint_path`) where the heal's state is saved after every held-out
    scoring (rank 0 writes, atomically); a heal started with an existing one of the same `identity`
    (settings, known before the model loads; the model's fingerprint and the windows' tokens are
    added here) resumes from it and ends with the weights of an uninterrupted run. `on_status` is
    told from which step.
    """
    started = time.perf_counter() - teacher_seconds  # the heal's clock, as if the teacher pass had just ended
    lr = settings.learning_rate()
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None:
        identity = {"settings": dict(identity or {}), "model": model_fingerprint(model),
                    "tokens": data.token_sha256(torch.cat([train, heldout]))}
    saved = _read_heal_state(path, identity) if path is not None and path.exists() else None
    torch.manual_seed(seed)
    modules = trainable_modules(model, settings.params, near, last_blocks=settings.last_blocks,
                                compensation=compensation, removed=removed, lost=lost)
    was_training = model.training
    model.eval()  # no dropout: the heal is deterministic for a seed
    for p in model.parameters():
        p.requires_grad_(False)
    lora_model = None
    if settings.params == "lora":
        lora_model, trained = _add_lora(model, near, settings.lora_rank)
        names = _linear_names(model, near)
    else:
        trained = [p for m in modules.values() for p in m.parameters()]
        names = sorted(modules)
        for p in trained:
            p.requires_grad_(True)
    unique = {id(p): p for p in trained}
    trained = list(unique.values())
    world = distributed.world_size()
    record = HealRecord(params=settings.params, trained=names, trained_parameters=sum(p.numel() for p in trained),
                        text=text, windows=train.shape[0], heldout_windows=heldout.shape[0], seqlen=train.shape[1],
                        batch_size=settings.batch_size, lr=lr, top_k=teacher.logprobs.shape[-1], seed=seed,
                        budget={"minutes": settings.minutes, "steps": settings.steps}, teacher_seconds=teacher_seconds,
                        world_size=world)
    device = input_device(model)
    half = autocast_dtype(model)
    record.checkpointing, record.autocast = settings.checkpointing, None if half is None else str(half).split(".")[-1]
    # fp16 gradients underflow without a scale; bf16 has float32's range and needs none.
    scaler = torch.amp.GradScaler("cuda", enabled=half == torch.float16)
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    warmup = 10
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    generator = torch.Generator().manual_seed(seed)
    deadline = math.inf if settings.minutes is None else settings.minutes * 60

    def measure(step: int, train_kl: float | None) -> float:
        kl, ppl = heldout_scores(model, heldout, heldout_teacher, settings.batch_size)
        record.curve.append({"step": step, "seconds": round(time.perf_counter() - started, 3),
                             "train_kl": train_kl, "heldout_kl": kl, "heldout_ppl": ppl})
        return kl

    since_best, running, order, cursor, step = 0, [], torch.empty(0, dtype=torch.long), 0, 0
    stopped_by = None
    if saved is None:
        best_kl = measure(0, None)
        best_state = _snapshot(trained)
    else:
        state = saved["state"]
        _restore(trained, state["trained"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if state["scaler"]:  # (empty from a heal without fp16: a resume on another device may start one)
            scaler.load_state_dict(state["scaler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        best_state = [t.to(p.device) for t, p in zip(state["best_state"], trained)]
        best_kl, record.best_step, since_best = state["best_kl"], state["best_step"], state["since_best"]
        order, cursor, step, stopped_by = state["order"], state["cursor"], state["step"], state["stopped_by"]
        record.curve = list(state["curve"])
        started = time.perf_counter() - state["seconds"]  # the time spent before the interruption counts
        record.resumed_from = step
    # Every rank reads the checkpoint: on several nodes it must be a file they all see.
    distributed.agree({"the heal step resumed from --checkpoint": record.resumed_from},
                      "put --checkpoint where every rank reads it")
    if saved is not None and on_status is not None:
        on_status(f"resuming the heal from {path}: step {step}"
                  + (f" (it had ended: stopped by {stopped_by})" if stopped_by else ""))

    def save(finished: str | None = None) -> None:
        if path is None or not distributed.is_main():
            return
        state = {"trained": _snapshot(trained, "cpu"), "optimizer": optimizer.state_dict(),
                 "schedule": schedule.state_dict(), "scaler": scaler.state_dict(), "generator": generator.get_state(),
                 "torch_rng": torch.get_rng_state(), "best_state": _snapshot(best_state, "cpu"), "best_kl": best_kl,
                 "best_step": record.best_step, "since_best": since_best, "order": order, "cursor": cursor,
                 "step": step, "stopped_by": finished, "curve": record.curve,
                 "seconds": time.perf_counter() - started}
        _write_heal_state(path, identity, state)

    total = settings.steps if settings.minutes is None else None
    # With a time budget the bar counts seconds of it (the teacher pass included), so its ETA is the budget's.
    bar = progress_bar(total=total or round(settings.minutes * 60),
                       initial=step if total else round(time.perf_counter() - started),
                       desc=f"heal ({settings.params})",
                       unit="step" if total else "s", disable=not progress or not distributed.is_main(), leave=False)
    memory = contextlib.ExitStack()  # the blocks' checkpointing, undone however training ends
    if settings.checkpointing:
        memory.enter_context(checkpointed_blocks(model, _first_trained_block(model)))
    student = _Student(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        student = DistributedDataParallel(student, device_ids=[device] if device.type == "cuda" else None,
                                          **_no_broadcast(DistributedDataParallel))
    try:
        while stopped_by is None:
            if settings.steps is not None and step >= settings.steps:
                stopped_by = "steps"
                break
            # Rank 0's clock decides, so that every rank stops at the same step.
            if settings.minutes is not None and _from_rank_0(time.perf_counter() - started >= deadline, device):
                stopped_by = "minutes"
                break
            if cursor >= order.numel():  # a new pass over the windows, in a fresh seeded order
                order, cursor = torch.randperm(train.shape[0], generator=generator), 0
            rows, weight = rank_share(order[cursor : cursor + settings.batch_size], world, distributed.rank())
            cursor += settings.batch_size
            ids = train[rows].to(device)
            t_logprobs, t_tokens = teacher.batch(rows, device)
            with torch.autocast(device.type, dtype=half, enabled=half is not None):
                loss = student(ids, t_logprobs, t_tokens)
                if weight != 1.0:
                    loss = loss * weight
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            step += 1
            running.append(loss.item() / world)  # this rank's part of the batch's mean KL
            bar.update(1 if total else min(bar.total, round(time.perf_counter() - started)) - bar.n)
            if step % settings.eval_every == 0 or (settings.steps is not None and step == settings.steps):
                kl = measure(step, _summed(sum(running), device) / len(running))
                running = []
                bar.set_postfix(kl=f"{record.curve[-1]['train_kl']:.4f}", heldout_kl=f"{kl:.4f}",
                                heldout_ppl=f"{record.curve[-1]['heldout_ppl']:.2f}")
                if kl < best_kl:
                    best_kl, best_state, record.best_step, since_best = kl, _snapshot(trained), step, 0
                else:
                    since_best += 1
                    if since_best >= settings.patience:
                        stopped_by = "early stopping"
                        break
                save()
        if running:  # the steps since the last measurement
            kl = measure(step, _summed(sum(running), device) / len(running))
            running = []
            if kl < best_kl:
                best_kl, best_state, record.best_step = kl, _snapshot(trained), step
        save(finished=stopped_by)
    finally:
        bar.close()
        memory.close()
    _restore(trained, best_state)
    for p in trained:
        p.requires_grad_(False)
    if lora_model is not None:
        lora_model.merge_and_unload()
    model.train(was_training)
    record.steps, record.stopped_by = step, stopped_by
    first, kept = record.curve[0], next(c for c in record.curve if c["step"] == record.best_step)
    record.heldout_kl_before, record.heldout_ppl_before = first["heldout_kl"], first["heldout_ppl"]
    record.heldout_kl_after, record.heldout_ppl_after = kept["heldout_kl"], kept["heldout_ppl"]
    record.seconds = time.perf_counter() - started
    if record.best_step == 0:  # the untrained state: nothing ran, or nothing improved on it
        warnings.warn(_unhealed_reason(record), SlebWarning, stacklevel=2)
    return record


def heal_removal(model, removed: list[int], unit: str, teacher: Teacher, settings: Healing, *,
                 compensation: dict | None = None, seed: int = 0, text: str | None = None, progress: bool = True,
                 on_status: Callable[[str], None] | None = None) -> HealRecord:
    """Take `removed` (units of kind `unit`) out of `model` in place (`remove_units`) and heal what is left
    toward `teacher` as `sleb prune --heal` does: the same blocks trained, the same budget (the teacher's
    passes count towards `settings.minutes`). `compensation`: the fit already folded into `model`
    (`Compensation.to_dict`), which `--heal maps` trains."""
    num_before = len(find_blocks(model).modules)
    lost = lost_parts(model, removed, unit)  # found before removal: what a removed branch leaves is not trained
    remove_units(model, removed, unit)
    with torch.enable_grad():  # callers that evaluate under no_grad (the frontier) still train here
        return heal(model, teacher.train, teacher.heldout, teacher.targets, teacher.heldout_targets, settings,
                    near=removed_neighbours(removed, num_before, unit), removed=removed, compensation=compensation,
                    lost=lost, seed=seed, text=text, teacher_seconds=teacher.seconds, progress=progress,
                    on_status=on_status)


class _Student(nn.Module):
    """The pruned model's distillation loss on a batch as one module's forward, so DistributedDataParallel
    sees a forward that returns (`final_hidden` cuts the model's own forward short with an exception, which
    would skip DDP's preparation for the backward pass and leave the gradients unsynchronised)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, teacher_logprobs, teacher_tokens):
        return chunked_distillation_loss(self.model, final_hidden(self.model, ids), teacher_logprobs, teacher_tokens)


def _no_broadcast(ddp) -> dict:
    """DDP's arguments that skip its broadcasts of weights and buffers: every rank already holds the same
    weights (agreed by fingerprint), adapters (the same seed) and buffers. Newer torch renamed
    broadcast_buffers and added init_sync (the first broadcast of everything, 28 GB for a 7B model)."""
    known = inspect.signature(ddp).parameters
    kwargs = {"forward_sync_buffers" if "forward_sync_buffers" in known else "broadcast_buffers": False}
    if "init_sync" in known:
        kwargs["init_sync"] = False
    return kwargs


def rank_share(rows: torch.Tensor, world: int, rank: int) -> tuple[torch.Tensor, float]:
    """This rank's part of a global batch `rows` and the weight of its mean loss, such that DDP's average
    of the ranks' weighted gradients is the gradient of the whole batch's mean loss.

    The parts are contiguous and differ by at most one window; a rank left without one (a last batch
    with fewer windows than ranks) runs a stand-in window whose loss weighs zero, since every rank
    must take part in each step's all-reduce."""
    if world == 1:
        return rows, 1.0
    mine = torch.tensor_split(rows, world)[rank]
    if mine.numel() == 0:
        return rows[:1], 0.0
    return mine, mine.numel() * world / rows.numel()


def _summed(value: float, device: torch.device) -> float:
    """`value` summed over the ranks (itself in one process)."""
    if distributed.world_size() == 1:
        return value
    return float(distributed.all_reduce_sum(torch.tensor([value], dtype=torch.float64), device)[0])


def _from_rank_0(flag: bool, device: torch.device) -> bool:
    """Rank 0's `flag` on every rank (itself in one process): a decision every rank must take alike."""
    if distributed.world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    torch.distributed.broadcast(value, 0)
    return bool(value.item())


def _unhealed_reason(record: HealRecord) -> str:
    if record.steps == 0:
        budget = " and ".join(f"{v:g} {k}" for k, v in record.budget.items() if v is not None)
        return (f"--heal trained 0 steps: the budget ({budget}) was spent before the first (the dense model's pass "
                f"took {record.teacher_seconds:.0f} s); the model is left unhealed")
    return (f"--heal trained {record.steps} steps but none lowered the held-out KL to the dense model "
            f"({record.heldout_kl_before:.4f} untrained); the untrained state is kept, so the model is not healed")


def heal_summary(record: HealRecord) -> str:
    """One line on what a heal did, for the log."""
    done = "healed" if record.best_step > 0 else "not healed (the untrained state was kept):"
    return (f"{done} {record.params} ({record.trained_parameters:,} parameters) for {record.steps} steps in "
            f"{record.seconds:.0f} s (stopped by {record.stopped_by}; kept step {record.best_step}): on the held-out "
            f"slice, KL to the dense model {record.heldout_kl_before:.4f} -> {record.heldout_kl_after:.4f}, "
            f"perplexity {record.heldout_ppl_before:.3f} -> {record.heldout_ppl_after:.3f}")


def check_trainable_placement(model) -> None:
    """BadInput unless every weight of `model` sits in a device's memory. With `--device auto` a model too big
    for the GPUs is spread onto them and, past their memory, onto the CPU or disk through accelerate's
    offload, which keeps those weights outside the modules (on the meta device) and copies them in for
    each call: they cannot train, and no optimizer would see them. Spread over GPUs only, or on one
    device, a model heals (the logits and loss follow the devices)."""
    if any(p.device.type == "meta" for p in model.parameters()):
        raise BadInput("--heal trains weights in memory, and --device auto put some of this model's weights off the "
                       "GPUs (accelerate's CPU offload): give it more GPU memory, a smaller --dtype, or --device cpu")


HEAL_CHECKPOINT_FORMAT = "sleb-heal-checkpoint/1"


def heal_checkpoint_path(checkpoint: str | os.PathLike) -> Path:
    """Where `--checkpoint PATH` keeps the heal's state: PATH.heal, beside the search's own file PATH (so a
    search's checkpoint and a heal's never overwrite each other, and either can be deleted alone)."""
    return Path(f"{os.fspath(checkpoint)}.heal")


def _load_heal_state(path: Path) -> dict:
    import pickle

    if not path.is_file():
        raise BadInput(f"heal checkpoint {path} is not a file")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or saved.get("format") != HEAL_CHECKPOINT_FORMAT:
            raise ValueError("not a sleb heal checkpoint")
        saved["settings"].items(), saved["state"]["step"]  # noqa: B018 (the parts a resume reads first)
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, TypeError, AttributeError,
            pickle.UnpicklingError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        raise BadInput(f"heal checkpoint {path} is empty, corrupt or not a sleb heal checkpoint ({reason}); delete it "
                       "or give another --checkpoint path to heal from the start") from err
    return saved


def _check_heal_settings(path: Path, saved: dict, ours: dict) -> None:
    shown = differing_settings(saved["settings"], ours)
    if shown:
        raise BadInput(f"heal checkpoint {path} belongs to another heal ({shown}); use another --checkpoint file")


def check_heal_checkpoint(path: str | os.PathLike, settings: dict) -> None:
    """Before any model loads: refuse an existing heal checkpoint written with other `settings`."""
    path = Path(path)
    if path.exists():
        _check_heal_settings(path, _load_heal_state(path), settings)


def _read_heal_state(path: Path, identity: dict) -> dict:
    """The saved state of a heal with this `identity` (settings, model fingerprint, windows' tokens); a
    checkpoint of another heal is refused in one line."""
    saved = _load_heal_state(path)
    _check_heal_settings(path, saved, identity["settings"])
    if not same_model(saved.get("model") or {}, identity["model"]):
        raise BadInput(f"heal checkpoint {path} was written by a heal of another model (its pruned weights differ); "
                       "use another --checkpoint file")
    if saved.get("tokens") != identity["tokens"]:
        raise BadInput(f"heal checkpoint {path} was written by a heal on other windows (their tokens differ); "
                       "use another --checkpoint file")
    return saved


def _write_heal_state(path: Path, identity: dict, state: dict) -> None:
    """Write the heal's state through a temporary file renamed into place: a kill leaves the last whole one."""
    atomic_write(path, lambda tmp: torch.save({"format": HEAL_CHECKPOINT_FORMAT, **identity, "state": state}, tmp))


def _snapshot(params: list[torch.Tensor], device=None) -> list[torch.Tensor]:
    return [p.detach().clone() if device is None else p.detach().to(device, copy=True) for p in params]


@torch.no_grad()
def _restore(params: list[torch.Tensor], state: list[torch.Tensor]) -> None:
    for p, saved in zip(params, state):
        p.copy_(saved)


def _add_lora(model, near: list[int], rank: int):
    """Wrap the linear layers of the `near` blocks with LoRA adapters (peft); returns the peft model and
    the adapter parameters."""
    import logging

    # peft imports bitsandbytes when it is installed, which logs about 4-bit kernels LoRA does not use here.
    quiet = [logging.getLogger(name) for name in ("bitsandbytes", "kernels")]
    levels = [logger.level for logger in quiet]
    try:
        for logger in quiet:
            logger.setLevel(logging.ERROR)
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel
    except ImportError as err:
        raise SlebError("--heal lora needs peft: pip install 'sleb[heal]'") from err
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    targets = _linear_names(model, near)
    if not targets:
        raise SlebError("--heal lora found no linear layer in the blocks next to the removed runs")
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets, bias="none")
    lora = LoraModel(model, config, "sleb-heal")
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in adapters:
        p.requires_grad_(True)
    return lora, adapters

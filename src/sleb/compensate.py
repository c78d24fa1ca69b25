"""Linear compensation of removed blocks, folded into the kept weights (ReplaceMe-style).

After blocks are removed, the hidden state entering the first kept block after a removed run is
no longer what the dense model had there. ReplaceMe (Shopkhoev et al., NeurIPS 2025, arXiv
2505.02819) fits a linear map T on calibration activations and folds it into the block before
the run, so the pruned model keeps its shapes, its FLOPs and a vanilla checkpoint.

For every maximal run of consecutive removed blocks s..e, with fold block f = s - 1 (the last
kept block before the run):

* M: the output of f's MLP output projection (found structurally, `sleb.arch.residual_writer`),
  Y: the rest of f's output (the residual stream M is added to: f's output is Y + M),
  both on the current pruned model, with earlier runs already compensated;
* L: the dense model's hidden state leaving block e (entering the first kept block after the run);
* objective ``linear``: T minimising ||M T + Y - L||^2 + mu ||T - I||^2, from the normal equations
  (M^T M + mu I) T = M^T (L - Y) + mu I, accumulated in float64 over window batches (memory
  O(d^2), any number of tokens). The ridge pulls towards T = I (plain removal) and is relative:
  mu = ridge * trace(M^T M) / d; by default it is chosen per run by 4-fold cross-validation over
  the calibration windows (the residual on held-out windows, from per-fold sums: no extra pass);
* objective ``linear-cosine``: from that solution, `cosine_steps` full-batch Adam steps on the mean
  cosine distance between M T + Y and L per token (ReplaceMe's second objective), on a seeded
  uniform subsample of at most `cosine_tokens` tokens kept in memory (all tokens when fewer);
  the step with the lowest distance is kept;
* the fold: the projection's output y becomes y T (nn.Linear: W <- T^T W, b <- b T).

With branch units (`unit="sublayer"` or `"attention"`, `sleb.units`), the same holds one level
down: the residual stream is a sequence of branches (block i's attention is unit 2i, its MLP unit
2i + 1), a run is a maximal run of consecutive removed units, and the map is folded into the output
projection of the last kept branch before it (an attention output projection when that branch is an
attention, `sleb.arch.residual_writer` on the branch). `RunFit.blocks` and `fold_block` then hold
unit ids; `Compensation.unit` says which.

A run that starts at block 0 has no kept block before it: it is skipped (removed without
compensation) and the report says so. Families whose MLP output passes through a norm before the
residual add (Gemma-2/3, OLMo-2) cannot take the fold exactly and are refused with one line;
parallel-residual blocks (GPT-NeoX, Phi) add the MLP output straight to the block output, which is
exactly what the probe checks, so Y there includes the attention branch.

Choosing the blocks with their compensation fitted (`--compensate-aware`) is a search:
`sleb.compensated_search`, which uses the `Fitter` here.
"""

from __future__ import annotations

import contextlib
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch

from .arch import ResidualWriter, residual_writer
from .data import token_sha256
from .errors import BadInput, SlebError
from .distributed import world_size
from .progress import progress_bar
from .scoring import variant_losses, window_batches
from .units import unit_kind, unit_runner

OBJECTIVES = ("linear", "linear-cosine")
# ridge="auto": candidates (relative to trace(M^T M) / d) and folds of window batches for cross-validation.
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)
CV_FOLDS = 4


def removed_runs(removed) -> list[list[int]]:
    """Maximal runs of consecutive block indices, in order: [5, 3, 4, 9] -> [[3, 4, 5], [9]]."""
    runs: list[list[int]] = []
    for b in sorted(set(removed)):
        if runs and runs[-1][-1] == b - 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    return runs


@dataclass
class RunFit:
    """What compensating one removed run did (residuals are ||M T + Y - L|| / ||L|| over all
    calibration tokens; cosine distances are means over the kept token sample)."""

    blocks: list[int]  # the removed run (unit ids when `Compensation.unit` is not "block")
    fold_block: int | None
    projection: str | None  # the folded layer's path inside the fold block
    objective: str
    skipped: str | None = None
    tokens: int = 0
    ridge: float | None = None
    ridge_cv_residuals: dict | None = None  # ridge="auto": held-out-fold residual of each candidate ridge
    residual_before: float | None = None  # T = I: plain removal
    residual_after: float | None = None
    cosine_before: float | None = None
    cosine_after: float | None = None
    sample_tokens: int = 0
    seconds: float = 0.0
    heldout_ppl_before: float | None = None
    heldout_ppl_after: float | None = None


@dataclass
class Compensation:
    """The result of `compensate`: one RunFit per removed run, and the calibration effect."""

    removed: list[int]
    objective: str
    ridge: float | str
    runs: list[RunFit]
    nsamples: int
    seqlen: int
    calibration_sha256: str
    settings: dict = field(default_factory=dict)
    calibration_ppl_plain: float | None = None
    calibration_ppl: float | None = None
    heldout: dict | None = None
    seconds: float = 0.0
    unit: str = "block"  # what `removed` and the runs count (`sleb.units`)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Stats:
    """Normal equations of one run, accumulated over window batches in float64."""

    a: torch.Tensor  # M^T M
    b: torch.Tensor  # M^T (L - Y)
    dd: float = 0.0  # ||L - Y||^2
    ll: float = 0.0  # ||L||^2
    tokens: int = 0

    def residual(self, t: torch.Tensor) -> float:
        """||M T - (L - Y)|| / ||L|| for any T, from the accumulated sums."""
        t = t.to(self.a)
        sq = self.dd - 2 * (t * self.b).sum().item() + (t * (self.a @ t)).sum().item()
        return math.sqrt(max(sq, 0.0) / max(self.ll, 1e-30))


def _sum_stats(parts: list[_Stats]) -> _Stats:
    return _Stats(sum(p.a for p in parts), sum(p.b for p in parts), sum(p.dd for p in parts),
                  sum(p.ll for p in parts), sum(p.tokens for p in parts))


def _accumulator_device(device: torch.device) -> torch.device:
    return torch.device("cpu") if device.type == "mps" else device  # MPS has no float64


def _cosine_distance(m: torch.Tensor, y: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 1 - torch.nn.functional.cosine_similarity(m @ t + y, target, dim=-1).mean()


def check_ridge(ridge: float | str) -> None:
    """Refuse a ridge no fit can use (negative, NaN, infinite); run before any model loads."""
    if ridge != "auto" and not (isinstance(ridge, (int, float)) and not isinstance(ridge, bool)
                                and math.isfinite(ridge) and ridge >= 0):
        raise BadInput(f"--compensate-ridge must be a finite number >= 0 or 'auto', got {ridge!r}")


class Fitter:
    """Fits and folds compensation for removal sets on one model, restoring originals on demand.

    Fits are memoised by the runs up to and including the fitted one (a run's fit depends only on
    the runs before it), so re-fitting a set that shares its first runs with an earlier one (as
    `sleb.compensated_search` does) only fits the runs that changed.
    """

    def __init__(self, model, calib: torch.Tensor, *, objective: str, ridge: float, batch_size: int,
                 cosine_steps: int, cosine_lr: float, cosine_tokens: int, seed: int, progress: bool,
                 unit: str = "block"):
        if objective not in OBJECTIVES:
            raise SlebError(f"unknown compensation {objective!r}; available: {', '.join(OBJECTIVES)}")
        check_ridge(ridge)
        if objective == "linear-cosine" and cosine_tokens < 1:
            raise SlebError(f"linear-cosine needs cosine_tokens >= 1, got {cosine_tokens}")
        if objective == "linear-cosine" and world_size() > 1:
            raise SlebError("linear-cosine compensation fits on one process; run it without torch.distributed")
        self.model = model
        self.unit = unit
        self.runner = unit_runner(model, unit)
        self.calib = calib
        self.objective, self.ridge, self.batch_size = objective, ridge, batch_size
        self.cosine_steps, self.cosine_lr, self.cosine_tokens = cosine_steps, cosine_lr, cosine_tokens
        self.seed, self.progress = seed, progress
        self.num_units = self.runner.num_units
        self.writers: dict[int, ResidualWriter] = {}
        self.originals: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.memo: dict[tuple, tuple[torch.Tensor, RunFit]] = {}

    # -- structure --------------------------------------------------------------------------------
    def writer(self, f: int) -> ResidualWriter:
        """Unit f's output projection (a block's MLP, or the branch's), proven by a probe on the first
        calibration window."""
        if f not in self.writers:
            ids = self.calib[:1]
            with self.original_weights():
                h = self.runner.embed(ids)
                for b in range(f):
                    h = self.runner.block(b, h, ids)
                self.writers[f] = residual_writer(self.runner, f, h, ids)
        return self.writers[f]

    def check(self, removed) -> None:
        """Raise the one-line refusal before any fitting when a fold block cannot take the fold."""
        for run in removed_runs(removed):
            if run[0] > 0:
                self.writer(run[0] - 1)

    # -- weights ----------------------------------------------------------------------------------
    def _remember(self, f: int) -> None:
        if f not in self.originals:
            module = self.writers[f].module
            bias = getattr(module, "bias", None)
            self.originals[f] = (module.weight.detach().clone(), None if bias is None else bias.detach().clone())

    @torch.no_grad()
    def restore(self) -> None:
        """Put every folded projection back to its original weights."""
        for f, (weight, bias) in self.originals.items():
            module = self.writers[f].module
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)

    @contextlib.contextmanager
    def original_weights(self) -> Iterator[None]:
        """Run the dense model: the original weights swapped in (no copies), the folded ones back after."""
        current = {}
        for f, (weight, bias) in self.originals.items():
            module = self.writers[f].module
            current[f] = (module.weight.data, None if bias is None else module.bias.data)
            module.weight.data = weight
            if bias is not None:
                module.bias.data = bias
        try:
            yield
        finally:
            for f, (weight, bias) in current.items():
                module = self.writers[f].module
                module.weight.data = weight
                if bias is not None:
                    module.bias.data = bias

    def fold(self, f: int, t: torch.Tensor) -> None:
        self._remember(f)
        self.writers[f].fold(t)

    # -- fitting ----------------------------------------------------------------------------------
    def _sample_index(self) -> torch.Tensor | None:
        """Flat indices (window-major) of the tokens kept for the cosine objective and its report."""
        total = self.calib.numel()
        if self.cosine_tokens <= 0:
            return None
        if total <= self.cosine_tokens:
            return torch.arange(total)
        g = torch.Generator().manual_seed(self.seed)
        return torch.randperm(total, generator=g)[: self.cosine_tokens].sort().values

    @torch.no_grad()
    def _collect(self, run: list[int], removed_before: list[int]) -> tuple[_Stats, tuple]:
        """Stream the calibration windows once: the run's normal equations and the token sample."""
        runner = self.runner
        f, e = run[0] - 1, run[-1]
        writer = self.writers[f]
        gone = set(removed_before)
        # Blocks before the first removed or folded block are the same in the dense and current model.
        shared = min([max(b - 1, 0) for b in removed_before] + [f])
        hidden_size = writer.module.weight.shape[0 if not writer.transposed else 1]
        device = _accumulator_device(writer.module.weight.device)
        def zeros() -> _Stats:
            return _Stats(torch.zeros(hidden_size, hidden_size, dtype=torch.float64, device=device),
                          torch.zeros(hidden_size, hidden_size, dtype=torch.float64, device=device))

        # With ridge="auto", the sums are kept per fold of windows (window i goes to fold i % k).
        folds = [zeros() for _ in range(CV_FOLDS if self.ridge == "auto" else 1)]
        window = 0
        sample_index = self._sample_index()
        samples: tuple[list, list, list] = ([], [], [])
        offset = 0
        captured = {}

        def grab(module, args, output):
            captured["m"] = output

        for batch in window_batches(self.calib, self.batch_size):
            h = runner.embed(batch)
            for b in range(shared):
                h = runner.block(b, h, batch)
            current = h
            handle = writer.module.register_forward_hook(grab)
            try:
                for b in range(shared, f + 1):
                    if b not in gone:
                        current = runner.block(b, current, batch)
            finally:
                handle.remove()
            m = captured.pop("m")
            y = current - m
            if removed_before:
                dense = h
                with self.original_weights():
                    for b in range(shared, e + 1):
                        dense = runner.block(b, dense, batch)
            else:  # nothing before f differs and f is not folded yet: continue from f's output
                dense = current
                for b in range(f + 1, e + 1):
                    dense = runner.block(b, dense, batch)
            for j in range(batch.shape[0]):
                stats = folds[(window + j) % len(folds)]
                mf = m[j].reshape(-1, hidden_size).to(device=device, dtype=torch.float64)
                diff = (dense[j] - y[j]).reshape(-1, hidden_size).to(device=device, dtype=torch.float64)
                stats.a += mf.T @ mf
                stats.b += mf.T @ diff
                stats.dd += diff.pow(2).sum().item()
                stats.ll += dense[j].reshape(-1, hidden_size).to(device=device, dtype=torch.float64).pow(2).sum().item()
                stats.tokens += mf.shape[0]
            window += batch.shape[0]
            if sample_index is not None:
                # Window batches are contiguous runs of windows, so flat token offsets follow the batches.
                lo, hi = offset, offset + batch.numel()
                pick = sample_index[(sample_index >= lo) & (sample_index < hi)] - lo
                for store, tensor in zip(samples, (m, y, dense)):
                    store.append(tensor.reshape(-1, hidden_size)[pick.to(tensor.device)].float())
            offset += batch.numel()
        if world_size() > 1:
            for stats in folds:
                scalars = torch.tensor([stats.dd, stats.ll, float(stats.tokens)], dtype=torch.float64, device=device)
                for tensor in (stats.a, stats.b, scalars):
                    torch.distributed.all_reduce(tensor)
                stats.dd, stats.ll, stats.tokens = scalars[0].item(), scalars[1].item(), int(scalars[2].item())
        sample = tuple(torch.cat(store) for store in samples) if samples[0] else ()
        return folds, sample

    @staticmethod
    def _solve(stats: _Stats, ridge: float) -> torch.Tensor:
        d = stats.a.shape[0]
        eye = torch.eye(d, dtype=torch.float64, device=stats.a.device)
        mu = ridge * stats.a.diagonal().sum().item() / d
        return torch.linalg.solve(stats.a + mu * eye, stats.b + mu * eye)

    def _choose_ridge(self, folds: list[_Stats]) -> tuple[float, dict]:
        """The ridge of RIDGE_GRID with the lowest held-out residual, fitting on k - 1 folds at a time."""
        if self.ridge != "auto":
            return float(self.ridge), {}
        used = [f for f in folds if f.tokens]
        if len(used) < 2:  # one window: nothing to validate on, take the smallest ridge
            return RIDGE_GRID[0], {}
        errors = {}
        for ridge in RIDGE_GRID:
            total = 0.0
            for i, held in enumerate(used):
                rest = _sum_stats([f for j, f in enumerate(used) if j != i])
                t = self._solve(rest, ridge)
                total += held.residual(t) ** 2 * held.ll
            errors[ridge] = total
        best = min(errors, key=lambda r: (errors[r], -r))
        return best, {str(r): math.sqrt(e / max(sum(f.ll for f in used), 1e-30)) for r, e in errors.items()}

    def _cosine(self, t0: torch.Tensor, sample: tuple) -> torch.Tensor:
        m, y, target = sample
        t = t0.to(device=m.device, dtype=torch.float32).clone().requires_grad_(True)
        optimizer = torch.optim.Adam([t], lr=self.cosine_lr)
        best, best_t = float("inf"), t0
        with torch.enable_grad():
            for _ in range(self.cosine_steps + 1):
                loss = _cosine_distance(m, y, target, t)
                if loss.item() < best:
                    best, best_t = loss.item(), t.detach().double().clone()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return best_t.to(t0.device)

    def fit_run(self, run: list[int], removed_before: list[int]) -> tuple[torch.Tensor, RunFit]:
        started = time.perf_counter()
        f = run[0] - 1
        writer = self.writers[f]
        folds, sample = self._collect(run, removed_before)
        ridge, cv = self._choose_ridge(folds)
        stats = _sum_stats(folds)
        t = self._solve(stats, ridge)
        identity = torch.eye(t.shape[0], dtype=torch.float64, device=t.device)
        fit = RunFit(blocks=list(run), fold_block=f, projection=writer.path, objective=self.objective,
                     tokens=stats.tokens, residual_before=stats.residual(identity), ridge=ridge,
                     ridge_cv_residuals=cv or None, sample_tokens=len(sample[0]) if sample else 0)
        if self.objective == "linear-cosine":
            t = self._cosine(t, sample)
        fit.residual_after = stats.residual(t)
        if sample:
            with torch.no_grad():
                m, y, target = sample
                fit.cosine_before = _cosine_distance(m, y, target, identity.to(m)).item()
                fit.cosine_after = _cosine_distance(m, y, target, t.to(m)).item()
        fit.seconds = time.perf_counter() - started
        return t.cpu(), fit

    def apply(self, removed, on_run: Callable[[RunFit], None] | None = None) -> list[RunFit]:
        """Compensate `removed` on the original weights: fit (or recall) and fold every run, in order."""
        self.restore()
        self.check(removed)
        runs = removed_runs(removed)
        fits: list[RunFit] = []
        done: list[int] = []
        bar = progress_bar(runs, desc=f"compensate ({self.objective})", unit="run", disable=not self.progress,
                   dynamic_ncols=True)
        for i, run in enumerate(bar):
            if run[0] == 0:
                fit = RunFit(blocks=list(run), fold_block=None, projection=None, objective=self.objective,
                             skipped=f"the run starts at {unit_kind(self.unit).short_noun} 0: no kept "
                                     "unit before it to fold into; removed without compensation")
            else:
                key = tuple(tuple(r) for r in runs[: i + 1])
                if key not in self.memo:
                    self.memo[key] = self.fit_run(run, list(done))
                t, fit = self.memo[key]
                fit = RunFit(**asdict(fit))
                self.fold(run[0] - 1, t)
            fits.append(fit)
            if on_run is not None:
                on_run(fit)
            done.extend(run)
        return fits

    def loss(self, removed, **kwargs) -> float:
        """Calibration loss (sum over windows of mean CE) of the model with `removed` skipped, as it stands."""
        kept = [b for b in range(self.num_units) if b not in set(removed)]
        return float(variant_losses(self.runner, self.calib, [kept], batch_size=self.batch_size, **kwargs)[0])


def compensate(
    model,
    calib: torch.Tensor,
    removed: list[int],
    *,
    objective: str = "linear",
    ridge: float | str = "auto",
    batch_size: int = 1,
    cosine_steps: int = 300,
    cosine_lr: float = 1e-4,
    cosine_tokens: int = 65536,
    seed: int = 0,
    measure: bool = True,
    calibration_ppl_plain: float | None = None,
    heldout: Callable[[], float] | None = None,
    heldout_plain: float | None = None,
    progress: bool = True,
    unit: str = "block",
) -> Compensation:
    """Fit a linear map per removed run and fold it into the kept block before the run, in place.

    Call it on the model *before* `sleb.remove_blocks(model, removed)`: the removed blocks stay in
    place (skipped while fitting), only the fold blocks' MLP output projections change, so the
    pruned model keeps its shapes and saves as a vanilla checkpoint.

    Args:
        model: the dense model (any device or dtype); fold blocks are edited in place.
        calib: LongTensor [nsamples, seqlen] of calibration windows (`sleb.calibration`).
        removed: block indices of `model` to remove (any order: runs are found by sorting).
        objective: ``linear`` (least squares) or ``linear-cosine`` (Adam on the cosine distance,
            started from the least-squares solution).
        ridge: relative ridge towards T = I (mu = ridge * trace(M^T M) / d), or ``"auto"`` (the
            default): per run, the value of RIDGE_GRID with the lowest residual on held-out windows
            (4-fold cross-validation over windows, from the same streamed sums; with a single
            window, the smallest value).
        batch_size: windows per forward pass (speed only).
        cosine_steps, cosine_lr: Adam steps and learning rate of ``linear-cosine``.
        cosine_tokens: at most this many calibration tokens (seeded uniform sample) are kept in
            memory for ``linear-cosine`` and for the reported cosine distances.
        seed: seed of that sample and of the structural probe.
        measure: also measure the calibration loss of the pruned model without and with
            compensation (two passes over the windows; one when `calibration_ppl_plain` is given).
        heldout: called with no arguments after each run is folded; should return a held-out
            perplexity of the pruned model as it stands (recorded per run).
        heldout_plain: that perplexity before any fold, if already known (else `heldout` is called).
        unit: what `removed` counts (`sleb.units`): ``block``, or ``sublayer``/``attention`` for branch
            ids (2i block i's attention, 2i + 1 its MLP); runs are then runs of consecutive branches.

    Raises:
        SlebError: in one line, for a family whose MLP output is normed before the residual add.
    """
    started = time.perf_counter()
    fitter = Fitter(model, calib, objective=objective, ridge=ridge, batch_size=batch_size, cosine_steps=cosine_steps,
                     cosine_lr=cosine_lr, cosine_tokens=cosine_tokens, seed=seed, progress=progress, unit=unit)
    removed = list(removed)
    if len(set(removed)) != len(removed) or not all(isinstance(b, int) and 0 <= b < fitter.num_units for b in removed):
        raise SlebError(f"{unit}s to remove must be distinct indices in [0, {fitter.num_units}), got {removed}")
    fitter.check(removed)
    result = Compensation(removed=removed, objective=objective, ridge=ridge, runs=[], nsamples=calib.shape[0],
                          seqlen=calib.shape[1], calibration_sha256=token_sha256(calib),
                          settings={"batch_size": batch_size, "seed": seed, "cosine_steps": cosine_steps,
                                    "cosine_lr": cosine_lr, "cosine_tokens": cosine_tokens}, unit=unit)
    if measure:
        result.calibration_ppl_plain = calibration_ppl_plain or math.exp(fitter.loss(removed) / calib.shape[0])
    previous = heldout_plain if heldout_plain is not None or heldout is None else heldout()

    def on_run(fit: RunFit) -> None:
        nonlocal previous
        if heldout is not None and fit.skipped is None:
            fit.heldout_ppl_before = previous
            previous = fit.heldout_ppl_after = heldout()

    result.runs = fitter.apply(removed, on_run=on_run)
    if measure:
        result.calibration_ppl = math.exp(fitter.loss(removed) / calib.shape[0])
    result.seconds = time.perf_counter() - started
    return result


@contextmanager
def compensated(model, calib: torch.Tensor, removed: list[int], **fit) -> Iterator[Compensation]:
    """`compensate` for the duration of a `with` block, then the fold blocks' weights put back.

    For comparisons that evaluate several removal sets on one model (`sleb compare --compensate`):
    only the kept unit before each removed run changes, so only the blocks holding those are saved.
    """
    runner = unit_runner(model, fit.get("unit", "block"))
    fold = {id(runner.unit_module(run[0] - 1)): runner.unit_module(run[0] - 1)
            for run in removed_runs(removed) if run[0] > 0}
    saved = {(block, name): p.detach().clone() for block in fold.values() for name, p in block.named_parameters()}
    try:
        yield compensate(model, calib, removed, **fit)
    finally:
        with torch.no_grad():
            for (block, name), value in saved.items():
                block.get_parameter(name).copy_(value)


__all__ = ["OBJECTIVES", "compensate", "removed_runs", "Compensation", "RunFit"]

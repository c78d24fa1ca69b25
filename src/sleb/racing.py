"""Racing: one SLEB step that stops scoring candidates which cannot (or almost surely do not) win.

The exact step scores every candidate on every calibration window. A racing step scores the
windows batch by batch, all still-live candidates in one prefix-tree walk per batch (so the tree,
and the cost of a batch, shrinks as candidates leave), and after each batch removes candidates
from the race by two rules. Both compare against a *reference* candidate that is scored on every
window first: the best of the caller's guesses (the search passes two, chosen without this step's
scores: in its first step the blocks with the most similar input and output, SLEB's Metric1; then
the previous step's longest-surviving remaining candidates), or else the leader after the first
``min_windows // 2`` windows.

**The free exact cut.** Window losses are non-negative, so a candidate's partial sum over the
windows scored so far is a lower bound on its complete score. Once it exceeds the smallest
*complete* score of any candidate it can never be the argmin, and it is cut. The cut never changes
the pick: with ``confidence=1`` the race uses only this rule and returns the exact search's argmin
(ties still go to the lowest block index), with lower bounds instead of scores for the cut
candidates.

**The sequential paired test** (``confidence < 1``). What racing estimates is the exact search's
pick: the candidate with the smallest *total* over these N windows. The windows are random draws
of the calibration text in random order, so the first n windows a candidate c has been scored on
are a simple random sample, without replacement, of the N (or of the N - s windows after the s
that chose the reference, when the race chose it). With the paired differences
``d_i = loss_c,i - loss_r,i`` on the m sampled windows of those M, c's total excess over r is
``D = K + M * mean_M(d)`` (K: the known excess on the s windows), and c is dropped when, at a
look, the one-sided lower confidence bound of D is above minus the tolerance::

    K + M * (mean(d) - t_{1 - a, m - 1} * sd(d) / sqrt(m) * sqrt((M - m) / (M - 1))) > -tolerance * R

with ``a = (1 - confidence) / T`` and R the reference's complete score. The last factor is the
finite-population correction: the closer m is to M, the less is unknown, and at m = M nothing
is. Pairing removes what the two share (how hard a window is), which is most of the variance:
candidates differ far less than windows do. Looks are few and fixed in advance: the first batch
end with at least ``min_windows`` windows, then each batch end at least 1.5 times further (T
looks), and the Bonferroni split over them makes the chance that a candidate is dropped while its
total is more than ``tolerance * R`` below the reference's at most ``1 - confidence`` per step, as
far as the t approximation holds for a mean of m paired differences (the central limit theorem;
per-window losses have light tails). This is an indifference-zone guarantee: with the stated
confidence the pick's calibration score is within the tolerance of the best one's; a tolerance of
0 asks for the best itself, which near-ties make expensive. No correction over candidates is
needed: only the best one's survival matters, and it is only ever tested against r. Candidates
whose score is already complete are never dropped, and the candidate that wins is always scored on
every window, so the removed block's score -- the calibration loss of the pruned model -- is exact.

Racing needs the windows in one process: it refuses `torch.distributed` sharding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .arch import BlockRunner
from .settings import Racing
from .errors import SlebError
from .distributed import world_size
from .scoring import StateCache, batch_losses

# Defaults of the racing search, defined once in `sleb.settings.Racing` (with what they were measured on).
CONFIDENCE, TOLERANCE, MIN_WINDOWS = Racing.confidence, Racing.tolerance, Racing.min_windows

# Status of a candidate's score in a step record.
COMPLETE, LOWER_BOUND, ESTIMATE = "complete", "lower-bound", "estimate"


@dataclass
class RaceOutcome:
    """What one racing step found, keyed by candidate block (original index)."""

    scores: dict[int, float]  # complete sum, partial sum (lower bound) or extrapolated estimate
    windows: dict[int, int]  # windows each candidate was scored on
    kinds: dict[int, str]  # COMPLETE, LOWER_BOUND (free cut) or ESTIMATE (dropped by the test)
    always: list[float]  # complete scores of the `always` variants
    best: int  # the pick: lowest complete score, ties to the lowest block


# How many likely leaders a step scores completely before the race (`sleb.settings.Racing.guesses`).
REFERENCE_GUESSES = Racing.guesses


def likeliest(prior: dict, cands: Sequence[int], count: int = REFERENCE_GUESSES) -> list[int]:
    """The `count` candidates with the lowest prior score (ties to the lowest block): the reference guesses."""
    return sorted((c for c in cands if c in prior), key=lambda c: (prior[c], c))[:count]


def survival_prior(scores: dict[int, float], windows: dict[int, int]) -> dict[int, tuple[int, float]]:
    """A previous race's candidates ranked for the next step: those scored on more windows first, then by score.

    A race keeps near-leaders longest, and they tend to stay near the lead after one more removal; the
    extrapolated score of a candidate dropped after a few windows is too noisy to rank by (on SmolLM2
    it often made the next step's reference a worse block: the 4-step search replayed at 24 windows ran
    2.41x instead of 2.68x at 0.95 / 0.001). An exact step (no `windows`) ranks by score alone.
    """
    return {c: (-windows.get(c, 0), score) for c, score in scores.items()}


def threshold(confidence: float, looks: int, n: int) -> float:
    """The t multiplier of the drop rule with n paired differences (inf: never drop)."""
    if confidence >= 1.0 or n < 2:
        return math.inf
    from scipy.stats import t

    return float(t.ppf(1.0 - (1.0 - confidence) / max(1, looks), n - 1))


def look_schedule(ends: Sequence[int], total: int, min_windows: int, growth: float = 1.5) -> list[int]:
    """Window counts (batch ends) after which the test looks: from min_windows, each >= growth x the last."""
    looks, target = [], min_windows
    for end in ends:
        if target <= end < total:
            looks.append(end)
            target = max(end + 1, math.ceil(end * growth))
    return looks


def check_racing(racing: Racing) -> None:
    """Settings a race can run with (BadInput), in one process."""
    racing.validate()
    if world_size() > 1:
        raise SlebError("racing scores all windows in one process; run the exact search under torch.distributed")


@torch.no_grad()
def race_step(
    runner: BlockRunner,
    calib: torch.Tensor,
    variants: dict[int, Sequence[int]],
    *,
    always: Sequence[Sequence[int]] = (),
    batch_size: int = 1,
    confidence: float = CONFIDENCE,
    min_windows: int = MIN_WINDOWS,
    tolerance: float = TOLERANCE,
    reference: int | Sequence[int] | None = None,
    cache: StateCache | None = None,
    on_scored: Callable[[int], None] | None = None,
) -> RaceOutcome:
    """Race the candidates' variants (candidate block -> block sequence) over the windows.

    `always` variants (the dense model) are scored on every window and never race. `reference`
    is a candidate to score completely first and test the others against; it must be chosen
    without this step's scores (None: the race picks the early leader). `tolerance` is the
    indifference zone of the test, relative to the reference's score. `on_scored` is called with
    a candidate each time one of its window batches has been scored.
    """
    check_racing(Racing(confidence, tolerance, min_windows))
    batches = list(torch.split(calib, max(1, batch_size)))
    total = calib.shape[0]
    ends = [int(x) for x in torch.tensor([len(x) for x in batches]).cumsum(0)]  # windows after each batch
    looks = look_schedule(ends, total, min_windows)
    cands = list(variants)
    guesses = [] if reference is None else [reference] if isinstance(reference, int) else list(dict.fromkeys(reference))
    for guess in guesses:
        if guess not in variants:
            raise SlebError(f"the racing reference {guess} is not a candidate of this step")
    losses = {c: torch.zeros(total, dtype=torch.float64) for c in cands}
    done = {c: 0 for c in cands}  # windows scored (always a prefix: batches run in order)
    status = {c: "live" for c in cands}  # live, cut or dropped
    always_totals = [0.0] * len(always)
    chosen_on = 0  # windows the reference was chosen on (0: chosen without this step's scores)

    def total_of(c: int) -> float:
        # Correctly rounded, so a prefix's sum never exceeds the whole's: the free cut stays exact.
        return math.fsum(losses[c][: done[c]].tolist())

    def score(b: int, chosen: list[int], extra: Sequence[Sequence[int]] = ()) -> None:
        if not chosen and not extra:
            return
        out = batch_losses(runner, batches[b], b, [variants[c] for c in chosen] + list(extra), cache=cache)
        start = ends[b] - len(batches[b])
        for row, c in enumerate(chosen):
            losses[c][start:ends[b]] = out[row]
            done[c] = ends[b]
            if on_scored is not None:
                on_scored(c)
        for j in range(len(extra)):
            always_totals[j] += float(out[len(chosen) + j].sum())

    def complete(chosen: list[int], after: int) -> None:
        for later in range(after, len(batches)):
            score(later, chosen)

    if guesses:
        # Every guess is scored on every window; the best complete one is the reference. That choice
        # depends on no other candidate's scores, so the test may use every window.
        complete(guesses, 0)
        reference = min(guesses, key=lambda c: (total_of(c), c))
    for b in range(len(batches)):
        live = [c for c in cands if status[c] == "live" and done[c] < ends[b]]
        score(b, live, always)
        if reference is None and ends[b] >= max(1, min_windows // 2):
            # Complete the leader so far now, so the free cut has a complete score to cut against.
            reference, chosen_on = min(live, key=lambda c: (total_of(c), c)), ends[b]
            complete([reference], b + 1)
        if reference is None:
            continue
        best_complete = min(total_of(c) for c in cands if status[c] == "live" and done[c] == total)
        for c in cands:
            if status[c] == "live" and done[c] < total and total_of(c) > best_complete:
                status[c] = "cut"
        n = ends[b]
        if n in looks and math.isfinite(q := threshold(confidence, len(looks), n - chosen_on)):
            population = total - chosen_on
            shrink = math.sqrt((total - n) / max(1, population - 1))  # finite-population correction
            margin = tolerance * total_of(reference)
            for c in cands:
                if status[c] != "live" or done[c] == total:
                    continue
                known = math.fsum((losses[c][:chosen_on] - losses[reference][:chosen_on]).tolist())
                d = losses[c][chosen_on:n] - losses[reference][chosen_on:n]
                low = float(d.mean()) - q * float(d.std()) / math.sqrt(len(d)) * shrink
                if known + population * low > -margin:
                    status[c] = "dropped"
        if not always and not any(status[c] == "live" and done[c] < total for c in cands):
            break

    scores, kinds = {}, {}
    for c in cands:
        partial = total_of(c)
        if done[c] == total:
            scores[c], kinds[c] = partial, COMPLETE
        elif status[c] == "cut":
            scores[c], kinds[c] = partial, LOWER_BOUND
        else:
            scores[c], kinds[c] = partial / done[c] * total, ESTIMATE
    finalists = [c for c in cands if kinds[c] == COMPLETE and status[c] == "live"]
    best = min(finalists, key=lambda c: (scores[c], c))
    return RaceOutcome(scores, dict(done), kinds, always_totals, best)

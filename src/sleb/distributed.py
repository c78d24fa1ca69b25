"""Running under torchrun: one process per device (or per CPU share), windows sharded across them.

`torchrun --nproc-per-node N -m sleb prune ...` sets RANK, WORLD_SIZE and LOCAL_RANK; `init_from_env`
turns them into a process group (NCCL when the ranks run on CUDA, gloo on CPU) and pins each rank
to its own GPU. Every rank loads the model and reads the same windows; the scorer
(`sleb.scoring.window_batches`) gives each rank every world_size-th window batch and sums the
scores with an all-reduce, so every rank reaches the same removal order. Only rank 0 writes
(checkpoints, outputs, reports) and prints; the others print nothing but errors.

Ranks must be started with the same command: multi-node users type it once per node, and a rank
with another --remove, --nsamples or calibration text would otherwise run a different number of
collectives (a hang) or sum scores of different windows (a wrong order, exit 0). `agree` compares
every rank's settings, and then its calibration tokens and model fingerprint, before any work and
refuses a mismatch on every rank in one line naming the setting.

No collective waits longer than SLEB_DIST_TIMEOUT seconds (default 7200, two hours) for the other
ranks, so a rank that is stuck or took another path ends the job instead of holding every device
forever. The longest legitimate waits are one rank loading the model (a download on a slow node),
one greedy step: scoring every candidate on a rank's share of the windows (the step time of a
single-process run divided by the world size, which grows with model size, --nsamples and
--seqlen), and the others waiting at the end while rank 0 saves the pruned model. Raise it when
one of those takes longer; torch's own defaults (10 minutes for NCCL, 30 for gloo) are shorter
than a large model's step. When a rank exits with an error, torchrun ends the others.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import timedelta
from typing import Any, Callable

import torch

from .errors import BadInput


def launched() -> bool:
    """Whether torchrun (or any launcher setting WORLD_SIZE > 1) started this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def is_main() -> bool:
    """Rank 0, the only process that writes files and prints."""
    return rank() == 0


def init_from_env(device: str | None = "auto") -> str | None:
    """Start the process group from torchrun's environment (if launched) and return the device for this rank.

    `device` auto or cuda: each rank takes GPU LOCAL_RANK (NCCL); cpu: gloo. Outside torchrun the
    device is returned unchanged.
    """
    if not launched() or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return device
    if not torch.distributed.is_available():
        raise BadInput("this torch build has no torch.distributed; run without torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_cuda = device in (None, "auto", "cuda") and torch.cuda.is_available()
    if on_cuda:
        if local_rank >= torch.cuda.device_count():
            raise BadInput(f"rank {os.environ.get('RANK', '?')}: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) are "
                           "visible; use --nproc-per-node at most the GPU count")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    torch.distributed.init_process_group(backend="nccl" if on_cuda else "gloo", timeout=timeout())
    return device


DEFAULT_TIMEOUT_S = 7200  # see the module docstring


def timeout() -> timedelta:
    """How long a collective waits for the other ranks: SLEB_DIST_TIMEOUT seconds, or two hours."""
    text = os.environ.get("SLEB_DIST_TIMEOUT", "").strip()
    if not text:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise BadInput(f"SLEB_DIST_TIMEOUT must be a number of seconds above 0, got {text!r}")
    return timedelta(seconds=seconds)


def describe(agreed_on=()) -> dict:
    """World size and backend for the run file, and under torchrun what every rank was checked to share."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return {"world_size": 1, "backend": None}
    return {"world_size": torch.distributed.get_world_size(), "backend": torch.distributed.get_backend(),
            "ranks_agreed_on": list(dict.fromkeys(agreed_on))}


def _equal(a: Any, b: Any) -> bool:
    return a == b or repr(a) == repr(b)  # repr: a NaN equals itself here


def agree(settings: dict, hint: str = "start every rank with the same command",
          same: Callable[[Any, Any], bool] = _equal) -> list[str]:
    """Check that every rank holds the same `settings` (name -> value); return the names checked.

    Every rank gathers every rank's dict, so all of them see a mismatch and raise the same
    BadInput, naming each differing setting and the ranks' values, e.g. `ranks disagree on
    --remove (rank 0 has 2, rank 1 has 1); start every rank with the same command`. Raising on
    one rank only would leave the others waiting in their next collective. `same` compares two
    values (exact by default; model fingerprints compare within rounding). A no-op in one process.
    """
    if world_size() == 1:
        return []
    gathered: list = [None] * world_size()
    torch.distributed.all_gather_object(gathered, dict(settings))
    message = disagreement(gathered, same)
    if message:
        raise BadInput(f"{message}; {hint}")
    return list(settings)


def disagreement(gathered: list[dict], same: Callable[[Any, Any], bool] = _equal) -> str | None:
    """`ranks disagree on ...` for the settings that differ between ranks (gathered[r] is rank r's), or None."""
    missing = object()
    names = list(dict.fromkeys(name for settings in gathered for name in settings))
    parts = []
    for name in names:
        groups: list[tuple[Any, list[int]]] = []  # (value, ranks holding it), rank 0's first
        for r, settings in enumerate(gathered):
            value = settings.get(name, missing)
            for held, ranks in groups:
                if (held is missing) == (value is missing) and (value is missing or same(held, value)):
                    ranks.append(r)
                    break
            else:
                groups.append((value, [r]))
        if len(groups) > 1:
            held = [(f"rank {ranks[0]} has " if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))} have ")
                    + ("nothing" if value is missing else _shown(value)) for value, ranks in groups]
            parts.append(f"{name} ({', '.join(held)})")
    return "ranks disagree on " + " and ".join(parts) if parts else None


def _shown(value: Any) -> str:
    """A setting's value in one short piece of a line (hashes and fingerprints by their first digits)."""
    if value is None:
        return "none"
    if isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, sort_keys=True, default=str)
        if len(text) <= 40:
            return text
        return "sha256 " + hashlib.sha256(text.encode()).hexdigest()[:12]
    text = str(value)
    return text if len(text) <= 40 else text[:12] + "..."


def agree_on_model(model, name: str = "the model weights") -> list[str]:
    """Check that every rank loaded the same weights (by `sleb.fingerprint`), not just the same path."""
    if world_size() == 1:
        return []
    from .fingerprint import model_fingerprint, same_model

    return agree({name: model_fingerprint(model)}, hint="give every rank the same model files", same=same_model)


def all_reduce_sum(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum a (CPU) tensor over ranks on `device` (NCCL needs CUDA tensors); a no-op in one process."""
    if world_size() == 1:
        return tensor
    reduced = tensor.to(device)
    torch.distributed.all_reduce(reduced)
    return reduced.cpu()


def is_peer_failure(err: BaseException) -> bool:
    """Whether an error is a collective that broke because another rank went away (not this rank's fault)."""
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(err)
    return isinstance(err, dist_error) or "Connection closed by peer" in text or "Connection reset by peer" in text


def waited_too_long(err: BaseException) -> str | None:
    """The one line for a collective that gave up waiting for another rank, else None (a download's timeout, say)."""
    text = str(err).lower()
    from_torch = isinstance(err, getattr(torch.distributed, "DistError", ())) or "gloo" in text  # gloo: RuntimeError
    if not from_torch or ("timed out" not in text and "timeout" not in text):
        return None
    return (f"stopped: waited {timeout().total_seconds():g} s (SLEB_DIST_TIMEOUT) for another rank; it is stuck, "
            "failed (see its error) or is slower than that (then raise SLEB_DIST_TIMEOUT)")


def finish() -> None:
    """Wait for every rank (rank 0 may still be writing) and close the process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

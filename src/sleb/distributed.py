"""Running under torchrun: one process per device (or per CPU share), windows sharded across them.

`torchrun --nproc-per-node N -m sleb prune ...` sets RANK, WORLD_SIZE and LOCAL_RANK; `init_from_env`
turns them into a process group (NCCL when the ranks run on CUDA, gloo on CPU) and pins each rank
to its own GPU. Every rank loads the model and reads the same windows; the scorer
(`sleb.scoring.window_batches`) gives each rank every world_size-th window batch and sums the
scores with an all-reduce, so every rank reaches the same removal order. Only rank 0 writes
(checkpoints, outputs, reports) and prints; the others print nothing but errors.
"""

from __future__ import annotations

import os

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
    torch.distributed.init_process_group(backend="nccl" if on_cuda else "gloo")
    return device


def describe() -> dict:
    """World size and backend, for the run file."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return {"world_size": 1, "backend": None}
    return {"world_size": torch.distributed.get_world_size(), "backend": torch.distributed.get_backend()}


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


def finish() -> None:
    """Wait for every rank (rank 0 may still be writing) and close the process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()

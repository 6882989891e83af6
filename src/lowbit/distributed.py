"""Calibration split across processes with ``torch.distributed`` (launched by ``torchrun``).

Each rank runs its share of the calibration sequences (every ``world``-th one, from its
rank) through the layer; the statistics GPTQ needs — XᵀX and the row count, see
`lowbit.algorithms.hessian` — are sums, so one all-reduce makes every rank's accumulator
the whole calibration set's (up to the order of the float32 additions: the ranks' partial
sums are added last — enough to reorder GPTQ's act-order columns where the Hessian's diagonal
nearly ties, so the codes can differ widely from a one-process run's for an equally good model;
see bench/results/distributed.md). The forward passes, most of the statistics phase, are what is
divided first. GPTQ's solves are divided too: its rows are independent given the Hessian, so each
rank solves a contiguous block of every weight's rows (`row_block`) — the factorisation of H, the
same on every rank, is done by each — and the blocks' codes, scales and zero points are gathered
(`gather_rows`) into the whole weight, which every rank then holds. gloo on CPU, NCCL on GPU; no
networking of our own.

``lowbit quantize`` under ``torchrun --nproc-per-node N`` (or any code calling `lowbit.quantize`
with WORLD_SIZE > 1 in its environment) initialises the process group itself; only rank 0
writes checkpoints (`lowbit.api.save`).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

from lowbit.algorithms.hessian import HessianAccumulator
from lowbit.errors import LowbitError


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def init_from_environment() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment); True if distributed."""
    if active():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return active()


def shard(calib: torch.Tensor) -> torch.Tensor:
    """This rank's calibration sequences: rows rank, rank + world, …; every rank gets at least one."""
    world = world_size()
    if world == 1:
        return calib
    if calib.shape[0] < world:
        raise LowbitError(f"{calib.shape[0]} calibration sequences cannot be split across {world} processes; use at "
                          f"least {world}.")
    return calib[rank()::world]


def all_reduce(acc: HessianAccumulator) -> HessianAccumulator:
    """``acc`` summed over every rank, in place (XᵀX and the row count)."""
    if world_size() == 1:
        return acc
    dist.all_reduce(acc.xtx)
    count = torch.tensor([acc.count], dtype=torch.int64, device=acc.xtx.device)
    dist.all_reduce(count)
    acc.count = int(count.item())
    return acc


def total(value: int) -> int:
    """An integer summed over every rank."""
    return value if world_size() == 1 else int(sum_floats([value])[0])  # exact below 2⁵³


def row_block(rows: int) -> slice:
    """This rank's contiguous block of ``rows`` rows (the first ``rows % world`` ranks get one more)."""
    world, me = world_size(), rank()
    base, extra = divmod(rows, world)
    start = me * base + min(me, extra)
    return slice(start, start + base + (me < extra))


def gather_rows(parts: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each named tensor's row blocks from every rank (in rank order, as `row_block` hands them out)
    concatenated along dim 0. Blocks may differ in rows, so they travel as objects (pickled)."""
    if world_size() == 1:
        return parts
    cpu = {k: v.cpu() for k, v in parts.items()}
    gathered: list[dict[str, Tensor] | None] = [None] * world_size()
    dist.all_gather_object(gathered, cpu)
    device = next(iter(parts.values())).device if parts else torch.device("cpu")
    return {k: torch.cat([g[k] for g in gathered if g is not None]).to(device) for k in parts}


def sum_floats(values: list[float]) -> list[float]:
    """Numbers summed over every rank (in float64)."""
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()

"""How a global batch splits over ranks and gradient-accumulation micro-steps.

The user sets the global batch G (samples per optimizer step, the recipe's number); the world size W is
whatever the allocation gives; the accumulation A is set or chosen. Each rank loads G / W images per step
and runs them through A micro-steps of G / (W * A) images. A plan that cannot split evenly is refused with
the numbers, at submit time (the launcher builds the same plan) and again on the node.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass

import torch

log = logging.getLogger(__name__)

AUTO = "auto"
AccumSetting = int | str
"""An accumulation setting: a positive int, or "auto" (the fewest micro-steps whose micro-batch fits)."""


def check_accum_setting(name: str, value: AccumSetting) -> None:
    """Raise a ValueError unless `value` is a positive int or "auto"."""
    if value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer or {AUTO!r}")


@dataclass(frozen=True)
class BatchPlan:
    """One optimizer step's samples: `global_batch` = `world_size` x `accum_steps` x `micro_batch`."""

    global_batch: int
    world_size: int
    accum_steps: int

    @property
    def per_rank(self) -> int:
        """Images one rank loads per optimizer step."""
        return self.global_batch // self.world_size

    @property
    def micro_batch(self) -> int:
        """Images one rank runs through one forward/backward."""
        return self.per_rank // self.accum_steps

    def as_dict(self) -> dict:
        """The plan with its derived sizes, for logs, metrics and the job record."""
        return {**asdict(self), "per_rank": self.per_rank, "micro_batch": self.micro_batch}

    def __str__(self) -> str:
        return (
            f"global batch {self.global_batch} = {self.world_size} rank(s) x {self.accum_steps} micro-step(s) "
            f"x {self.micro_batch} images"
        )


def divisors(n: int) -> list[int]:
    """The positive divisors of n, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_batch(
    global_batch: int,
    world_size: int,
    accum_steps: AccumSetting = 1,
    *,
    max_micro_batch: int | None = None,
    batch_key: str = "optim.batch_size",
    accum_key: str = "optim.accum_steps",
) -> BatchPlan:
    """The split of `global_batch` over `world_size` ranks and `accum_steps` micro-steps.

    "auto" takes the fewest micro-steps whose micro-batch is at most `max_micro_batch` (1 when no budget is
    known). Raises ValueError naming the keys, the numbers and values that would work.
    """
    check_accum_setting(accum_key, accum_steps)
    if global_batch % world_size:
        near = max(world_size, global_batch - global_batch % world_size)
        raise ValueError(
            f"{batch_key}={global_batch} is not divisible by the {world_size} ranks; use a multiple of "
            f"{world_size}, e.g. {batch_key}={near}"
        )
    per_rank = global_batch // world_size
    if accum_steps == AUTO:
        return BatchPlan(global_batch, world_size, _auto_accum(per_rank, max_micro_batch))
    if per_rank % accum_steps:
        raise ValueError(
            f"{batch_key}={global_batch} over {world_size} rank(s) is {per_rank} images per rank, which "
            f"{accum_key}={accum_steps} does not split into equal micro-batches; use one of {divisors(per_rank)}"
        )
    return BatchPlan(global_batch, world_size, accum_steps)


def _auto_accum(per_rank: int, max_micro_batch: int | None) -> int:
    if max_micro_batch is None:
        return 1
    return next(a for a in divisors(per_rank) if per_rank // a <= max_micro_batch)


def split_batch(plan: BatchPlan, batch_len: int) -> list[slice]:
    """The micro-steps' row ranges of a rank's batch of `batch_len` rows (the plan's per-rank batch, or a
    handed batch that the plan's accumulation divides)."""
    if batch_len % plan.accum_steps:
        raise ValueError(f"a batch of {batch_len} does not split into {plan.accum_steps} equal micro-batches")
    micro = batch_len // plan.accum_steps
    return [slice(i * micro, (i + 1) * micro) for i in range(plan.accum_steps)]


MEMORY_HEADROOM = 0.9
"""Share of a GPU's memory a trial step may fill, with the optimizer's state still to come."""


def largest_fitting_micro_batch(
    per_rank: int, trial_step: Callable[[int], None], device: torch.device, optimizer: torch.optim.Optimizer
) -> int:
    """The largest micro-batch (a divisor of `per_rank`) whose trial forward + backward fits on `device`, with room
    left for `optimizer`'s state (two fp32 moments per parameter when it has none yet); the smallest over ranks,
    so that all ranks plan alike. `trial_step(n)` runs n images and leaves no state behind."""
    total = torch.cuda.get_device_properties(device).total_memory
    state_bytes = 2 * sum(p.numel() * 4 for group in optimizer.param_groups for p in group["params"])
    fits = 1
    for micro in reversed(divisors(per_rank)):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            trial_step(micro)
        except torch.OutOfMemoryError:
            continue
        if torch.cuda.max_memory_allocated(device) + state_bytes <= MEMORY_HEADROOM * total:
            fits = micro
            break
    torch.cuda.empty_cache()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        agreed = torch.tensor([fits], device=device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
        fits = int(agreed.item())
    log.info("accum_steps=auto: a trial step fits %d images per micro-step on %s", fits, device)
    return fits


def plan_batch_on_device(
    global_batch: int,
    world_size: int,
    accum_steps: AccumSetting,
    *,
    max_micro_batch: int | None,
    device: torch.device,
    trial_step: Callable[[int], None],
    optimizer: torch.optim.Optimizer,
    batch_key: str,
    accum_key: str,
) -> BatchPlan:
    """`plan_batch`, except that accum_steps=auto on a GPU without `max_micro_batch` first measures the largest
    micro-batch that `trial_step` fits (see `largest_fitting_micro_batch`); a CPU without a budget takes 1 step."""
    keys = {"batch_key": batch_key, "accum_key": accum_key}
    budget = max_micro_batch
    if accum_steps == AUTO and budget is None and device.type == "cuda":
        per_rank = plan_batch(global_batch, world_size, 1, **keys).per_rank  # the ranks' split, checked first
        budget = largest_fitting_micro_batch(per_rank, trial_step, device, optimizer)
    return plan_batch(global_batch, world_size, accum_steps, max_micro_batch=budget, **keys)


def gradient_sync(net: torch.nn.Module, sync: bool) -> AbstractContextManager:
    """A micro-step's context: DDP's gradient all-reduce only where `sync` (the optimizer step's last micro-step),
    `no_sync()` on the others (their gradients only add up locally); nothing to do without DDP."""
    if sync or not isinstance(net, torch.nn.parallel.DistributedDataParallel):
        return nullcontext()
    return net.no_sync()

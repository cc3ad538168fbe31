"""The EMA teacher update, a separate step after `optimizer.step()`."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, over matching parameters, with fused foreach ops.

    The student may be a superset (it also holds the predictor): parameters are matched by name.
    """
    student_params = dict(student.named_parameters())
    t_params, s_params = [], []
    for name, t in teacher.named_parameters():
        t_params.append(t)
        s_params.append(student_params[name].detach())
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)

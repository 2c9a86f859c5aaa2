"""Optimizers and learning-rate schedules with the defaults that train the zoo's models well from scratch.

:func:`make_optimizer` (SGD with Nesterov momentum 0.9, Adam, AdamW) and :func:`make_scheduler` (a linear warm-up
then cosine, or constant): what ``cnnperf doctor`` trains with and ``cnnperf profile`` measures.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

OPTIMIZERS = ("sgd", "adam", "adamw")
# Learning rates that train the doctor's models well from scratch at batch sizes 32..256: SGD with momentum
# takes ~50x Adam's (Adam's steps are normalised per element; SGD's scale with the gradient).
DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}
# Weight decay: the usual 5e-4 for SGD; none for Adam, whose L2 term is rescaled per element and then acts
# unevenly (use AdamW for decay); AdamW's own default 0.01 (decoupled, multiplied by lr).
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adam": 0.0, "adamw": 1e-2}
SGD_MOMENTUM = 0.9

SCHEDULES = ("cosine", "constant")
# "cosine": a linear warm-up over the first 5 % of the steps (the first steps of an untrained net are the
# unstable ones: gradient spikes, dying ReLUs), then cosine annealing to 0, so the last epochs settle instead
# of bouncing around the minimum at full lr. "constant": the lr as given, every step.
WARMUP_FRACTION = 0.05


def make_optimizer(name: str, params: Iterable, *, lr: float | None = None,
                   weight_decay: float | None = None) -> torch.optim.Optimizer:
    """``name`` (one of :data:`OPTIMIZERS`) over ``params``; ``lr``/``weight_decay`` default per optimizer."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}.")
    lr = DEFAULT_LR[name] if lr is None else float(lr)
    weight_decay = DEFAULT_WEIGHT_DECAY[name] if weight_decay is None else float(weight_decay)
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"the learning rate must be a positive number, got {lr}.")
    if not weight_decay >= 0 or not math.isfinite(weight_decay):
        raise ValueError(f"the weight decay must be a non-negative number, got {weight_decay}.")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, nesterov=True, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int):
    """The per-step lr schedule ``name`` (one of :data:`SCHEDULES`) over ``total_steps``; None for constant."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}.")
    if name == "constant":
        return None
    total = max(1, int(total_steps))
    warmup = max(1, round(WARMUP_FRACTION * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

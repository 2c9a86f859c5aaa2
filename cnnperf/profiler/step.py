"""The training step the profiler measures and :class:`cnnperf.Optimized` runs, defined once for both: a batch
split into inputs and targets (:func:`split_batch`) and moved to the device (:func:`to_device`), the forward pass
and the loss under the variant's autocast (:func:`forward_loss`), the backward pass, scaled for fp16
(:func:`backward`), the optimizer step with the GradScaler if any and the gradients set to None
(:func:`optimizer_step`); a batch or loss it cannot use raises :class:`BatchError`. Each takes a
:class:`cnnperf.profiler.variants.Prepared`. Imports torch and :mod:`cnnperf.profiler.variants` only.
"""

from __future__ import annotations

from typing import Callable

import torch

from cnnperf.profiler.variants import Prepared


class BatchError(ValueError):
    """A batch the profiler cannot feed: one sentence naming what was expected and what came."""


def split_batch(batch, what: str = "batch") -> tuple[torch.Tensor, object]:
    """``(inputs, targets)`` of a batch: a pair (tuple/list) whose first element is a tensor."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not isinstance(batch[0], torch.Tensor):
        got = type(batch).__name__ + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        raise BatchError(f"{what} must be a pair (inputs, targets) with inputs a tensor, got {got}")
    return batch[0], batch[1]


def to_device(obj, device: torch.device, non_blocking: bool = True):
    """Tensors (also inside tuples, lists and dicts) moved to ``device``; everything else as it is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device, non_blocking) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    return obj


def forward_loss(prep: Prepared, loss_fn: Callable, x: torch.Tensor, y) -> torch.Tensor:
    x = prep.inputs(x)
    y = to_device(y, prep.device)
    with prep.autocast():
        loss = loss_fn(prep.model(x), y)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise BatchError(f"loss_fn must return a scalar tensor, got "
                         f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")
    return loss


def backward(prep: Prepared, loss: torch.Tensor) -> None:
    (prep.scaler.scale(loss) if prep.scaler is not None else loss).backward()


def optimizer_step(prep: Prepared) -> None:
    if prep.scaler is not None:
        prep.scaler.step(prep.optimizer)
        prep.scaler.update()
    else:
        prep.optimizer.step()
    prep.optimizer.zero_grad(set_to_none=True)

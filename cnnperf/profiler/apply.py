"""``cnnperf.optimize``: apply a variant (chosen, or the one a profile recommends) to a model and its optimizer.
The model is copied (then fused, converted to channels_last, wrapped in DDP, compiled, as the variant says); the
optimizer is rebuilt on the copy's parameters with the same class, parameter groups and state; neither of the
user's objects is changed. TF32 and cudnn.benchmark are process-wide switches, not copies: set when the variant
names them and put back by :meth:`Optimized.restore_switches`. :class:`Optimized` steps with
:mod:`cnnperf.profiler.step`, the step the profile measured. Imports torch, the profiler's step and variants
(and core, for :class:`~cnnperf.profiler.core.ProfileResult`, when called).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from cnnperf.profiler.step import backward, forward_loss, optimizer_step
from cnnperf.profiler.variants import Prepared, parse_variant, prepare, restore_switches, set_switches, unwrap_ddp


@dataclass
class Optimized(Prepared):
    """The ready training setup: ``model`` (call it), ``optimizer``, ``scaler`` (a GradScaler for fp16, else
    None), ``autocast()`` (the context for forward and loss), ``inputs(x)`` (moves and converts a batch's
    inputs), ``loader`` (rebuilt with the variant's worker settings, when one was given), ``variant``."""

    variant: str = "eager"
    switches: list = field(default_factory=list, repr=False)

    def step(self, inputs: torch.Tensor, targets, loss_fn: Callable) -> torch.Tensor:
        """One training step as the profile measured it: forward and loss under autocast, backward (scaled for
        fp16), optimizer step, gradients set to None. Returns the loss (not synchronised)."""
        loss = forward_loss(self, loss_fn, inputs, targets)
        backward(self, loss)
        optimizer_step(self)
        return loss.detach()

    def restore_switches(self) -> None:
        """Put TF32 and cudnn.benchmark back as they were before :func:`optimize` (idempotent)."""
        restore_switches(self.switches)
        self.switches = []


def optimize(model: nn.Module, optimizer: torch.optim.Optimizer, variant, *, loader=None, device=None,
             ddp: dict | None = None) -> Optimized:
    """Apply ``variant`` to copies of ``model`` and ``optimizer``.

    - ``variant``: a name ("bf16+channels_last", "eager") or a :class:`cnnperf.ProfileResult` (its
      recommendation).
    - ``loader``: a DataLoader to rebuild with the variant's worker settings (else ``Optimized.loader`` is None).
    - ``device``: where the model runs (default: where its parameters are).
    - ``ddp``: keyword arguments of DistributedDataParallel to wrap the copy in (before torch.compile, as
      recommended); a model passed already wrapped in DDP is unwrapped, transformed and wrapped the same way.

    Returns an :class:`Optimized`; the user's model and optimizer are left as they were.
    """
    from cnnperf.profiler.core import ProfileResult

    name = variant.recommended if isinstance(variant, ProfileResult) else variant
    options = parse_variant(name)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    inner, wrapped = unwrap_ddp(model)
    ddp = ddp if ddp is not None else wrapped
    params = list(inner.parameters())
    if not params:
        raise ValueError("model has no parameters to optimize")
    device = torch.device(device) if device is not None else params[0].device
    if "workers" in options and loader is None:
        raise ValueError(f"variant {name!r} tunes the DataLoader: pass loader=")

    switches = set_switches(options, device)
    try:
        # The optimizer is rebuilt once the copy exists, matching parameters by name: a fused model (an fx
        # GraphModule) lists its parameters in the order of use, not of registration.
        prep = prepare(options, inner, _placeholder_optimizer, device, loader=loader, ddp=ddp)
        prep.optimizer = _rebuild_optimizer(optimizer, dict(inner.named_parameters()),
                                            dict(prep.module.named_parameters()))
    except BaseException:
        restore_switches(switches)
        raise
    fields = {k: getattr(prep, k) for k in Prepared.__dataclass_fields__}
    return Optimized(**fields, variant=prep.name, switches=switches)


def _placeholder_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.0)


def _rebuild_optimizer(optimizer: torch.optim.Optimizer, old: dict[str, torch.Tensor],
                       new: dict[str, torch.Tensor]) -> torch.optim.Optimizer:
    """``optimizer``'s class, parameter groups (hyperparameters included), defaults and a copy of its state,
    on the parameters ``new`` (name -> parameter of the copy) in place of ``old`` (name -> the user's)."""
    if old.keys() != new.keys() or any(old[n].shape != new[n].shape for n in old):
        missing = sorted(set(old) ^ set(new))[:3]
        raise ValueError("the variant changed the model's parameters (names or shapes"
                         + (f", e.g. {', '.join(missing)}" if missing else "")
                         + "): the optimizer's state cannot be carried over")
    name_of = {id(p): n for n, p in old.items()}
    groups = []
    for group in optimizer.param_groups:
        foreign = [p for p in group["params"] if id(p) not in name_of]
        if foreign:
            raise ValueError(f"optimizer param_groups hold {len(foreign)} tensor(s) that are not parameters of "
                             "the model: optimize() can only rebuild an optimizer over the model's parameters")
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [new[name_of[id(p)]] for p in group["params"]]})
    # Every group carries all its hyperparameters, so the constructor needs no defaults (AdamW's defaults hold
    # a key its constructor rejects); they are copied after, for a later add_param_group.
    rebuilt = type(optimizer)(groups)
    rebuilt.defaults = copy.deepcopy(optimizer.defaults)
    rebuilt.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # its own state, not the user's tensors
    return rebuilt

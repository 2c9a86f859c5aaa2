"""The training loop behind ``cnnperf doctor``, its evaluation and metrics, and the LR range test.

- :func:`fit`: epochs of training with a :class:`~cnnperf.doctor.monitor.Doctor` watching every step, a
  validation pass after each epoch, optional gradient clipping with :func:`cnnperf.clip_grad_norm_`. It
  keeps what it has done in a :class:`FitState`, so a caller that catches ``KeyboardInterrupt`` can still
  report the epochs that finished.
- :func:`evaluate`, :func:`classification_metrics`: validation loss/accuracy, macro precision/recall/F1 and
  the confusion matrix (scikit-learn).
- :func:`lr_range_test`: the LR range test (exponentially rising learning rate, smoothed loss, stop when it
  explodes) on deep copies of the model and the optimizer: the model trained afterwards is untouched, and so
  are the random generators (the training run is the same with or without the test).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cnnperf.doctor.monitor import Doctor
from cnnperf.ops.grad_norm import clip_grad_norm_

# LR range test (Smith 2015, "Cyclical learning rates"; the fast.ai lr_find recipe).
LR_FINDER_START, LR_FINDER_END, LR_FINDER_STEPS = 1e-7, 10.0, 100
LR_FINDER_SMOOTHING = 0.98  # exponential moving average of the loss, bias-corrected
LR_FINDER_DIVERGE = 4.0  # stop when the smoothed loss exceeds this multiple of the best smoothed loss
LR_FINDER_SKIP_START = 0.1  # the first 10 % of the points are the average warming up: no suggestion there
LR_FINDER_MIN_POINTS = 10  # fewer recorded points than this: no slope worth reading, use min-loss / 10


# ---------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Evaluation:
    """A validation pass: mean loss, accuracy (0..1), and the true and predicted class of every image."""

    loss: float | None
    accuracy: float | None
    targets: list[int]
    predictions: list[int]


def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str,
             loss_fn: Callable = F.cross_entropy) -> Evaluation:
    """Mean loss and accuracy of ``model`` over ``loader`` in eval mode (training mode restored after)."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    targets, predictions = [], []
    try:
        with torch.no_grad():
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                logits = model(x)
                loss_sum += loss_fn(logits, y, reduction="sum").double()
                targets.append(y)
                predictions.append(logits.argmax(dim=1))
    finally:
        model.train(was_training)
    if not targets:
        return Evaluation(None, None, [], [])
    y_true, y_pred = torch.cat(targets).cpu(), torch.cat(predictions).cpu()
    n = len(y_true)
    return Evaluation(float(loss_sum) / n, float((y_true == y_pred).sum()) / n, y_true.tolist(), y_pred.tolist())


def classification_metrics(targets: Sequence[int], predictions: Sequence[int],
                           class_names: Sequence[str]) -> dict | None:
    """Accuracy, macro precision/recall/F1 and the confusion matrix (rows true, columns predicted) over all
    ``len(class_names)`` classes, as the record's ``metrics`` section; None without any prediction."""
    if len(targets) == 0:
        return None
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    labels = list(range(len(class_names)))
    precision, recall, f1, _ = precision_recall_fscore_support(targets, predictions, labels=labels,
                                                               average="macro", zero_division=0)
    return {"accuracy": float(accuracy_score(targets, predictions)), "precision_macro": float(precision),
            "recall_macro": float(recall), "f1_macro": float(f1),
            "confusion_matrix": confusion_matrix(targets, predictions, labels=labels).tolist(),
            "classes": [str(c) for c in class_names]}


# ---------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------

@dataclass
class FitState:
    """What :func:`fit` has done so far; still valid after a ``KeyboardInterrupt``."""

    epochs_done: int = 0
    last_eval: Evaluation | None = None
    stop_reason: str | None = None  # why training stopped before the planned epochs (None: it did not)
    rows: list[dict] = field(default_factory=list)  # the doctor's epoch rows


def fit(model: nn.Module, train_loader: Iterable, val_loader: Iterable | None, optimizer: torch.optim.Optimizer,
        doctor: Doctor, *, epochs: int, device: torch.device | str, clip: float | None = None,
        loss_fn: Callable = F.cross_entropy, limit_batches: int | None = None, scheduler=None, progress=None,
        on_epoch: Callable[[dict], None] | None = None, state: FitState | None = None) -> FitState:
    """Train ``model`` for ``epochs`` epochs with ``doctor`` watching; validate after each epoch.

    ``clip``: the max total gradient norm (:func:`cnnperf.clip_grad_norm_`, after the doctor read the raw
    norms). ``limit_batches``: at most this many training batches per epoch. ``scheduler``: stepped after every
    optimizer step (see :func:`cnnperf.zoo.optim.make_scheduler`). ``progress``: a
    :class:`rich.progress.Progress` (or None). ``on_epoch``: called with each epoch's row. Training stops
    early when the loss is NaN/inf (checked on the doctor's sampled steps): nothing more can be learned.
    """
    state = FitState() if state is None else state
    sampler = getattr(train_loader, "sampler", None)
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        if callable(getattr(sampler, "set_epoch", None)):  # a DistributedSampler: a new shuffle each epoch
            sampler.set_epoch(epoch)
        total = len(train_loader) if hasattr(train_loader, "__len__") else None
        if limit_batches is not None and total is not None:
            total = min(total, limit_batches)
        task = progress.add_task(f"epoch {epoch}/{epochs}", total=total, loss=math.nan) if progress else None
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        for i, (x, y) in enumerate(doctor.watch_loader(train_loader)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sampled = (doctor.step % doctor.sample_every) == 0  # the step about to run is a sampled one
            logits = model(x)
            doctor.watch_loss_input(logits, y)
            loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            doctor.after_backward(loss)
            if clip is not None:
                clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            doctor.after_step(optimizer)
            if scheduler is not None:
                scheduler.step()
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.detach().argmax(dim=1) == y).sum()
            seen += len(y)
            if sampled:  # the only synchronisation in the loop, every sample_every steps
                value = float(loss.detach())
                if progress is not None:
                    progress.update(task, loss=value)
                if not math.isfinite(value):
                    state.stop_reason = (f"the training loss became {value} at step {doctor.step} (epoch {epoch}); "
                                         "training stopped there, as nothing more can be learned")
            if progress is not None:
                progress.advance(task)
            if state.stop_reason is not None or (limit_batches is not None and i + 1 >= limit_batches):
                break
        if progress is not None:
            progress.remove_task(task)
        train_loss = float(loss_sum) / seen if seen else None
        train_acc = float(correct) / seen if seen else None
        evaluation = evaluate(model, val_loader, device, loss_fn) if val_loader is not None else None
        state.last_eval = evaluation
        row = doctor.end_epoch(train_loss=train_loss, train_acc=train_acc,
                               val_loss=evaluation.loss if evaluation else None,
                               val_acc=evaluation.accuracy if evaluation else None,
                               lr=optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - start)
        state.rows.append(row)
        state.epochs_done = epoch
        if on_epoch is not None:
            on_epoch(row)
        if state.stop_reason is not None:
            break
    return state


# ---------------------------------------------------------------------------------------------------------
# LR range test
# ---------------------------------------------------------------------------------------------------------

def lr_range_test(model: nn.Module, optimizer: torch.optim.Optimizer, loader: Iterable, *,
                  device: torch.device | str, loss_fn: Callable = F.cross_entropy,
                  start_lr: float = LR_FINDER_START, end_lr: float = LR_FINDER_END, steps: int = LR_FINDER_STEPS,
                  smoothing: float = LR_FINDER_SMOOTHING, diverge: float = LR_FINDER_DIVERGE,
                  progress=None) -> dict:
    """The LR range test on deep copies of ``model`` and ``optimizer`` (same class and settings).

    The learning rate rises exponentially from ``start_lr`` to ``end_lr`` over ``steps`` training steps
    (cycling through ``loader`` as often as needed); the loss is smoothed by a bias-corrected exponential
    average; the test stops early when the smoothed loss exceeds ``diverge`` times its minimum or is not
    finite. Suggested lr: where the smoothed loss falls fastest against log(lr) before its minimum
    ("steepest descent"), or, with too few points for a slope, a tenth of the lr at the minimum
    ("min loss / 10"). Returns the record's ``lr_finder`` section: ``lrs``, ``losses`` (smoothed),
    ``raw_losses``, ``suggested_lr``, ``method``, ``stopped_early``.
    """
    if not 0 < start_lr < end_lr or steps < 2:
        raise ValueError(f"lr_range_test: need 0 < start_lr < end_lr and steps >= 2, "
                         f"got {start_lr}, {end_lr}, {steps}")
    trial = copy.deepcopy(model).to(device)
    trial.train()
    trial_optimizer = type(optimizer)(trial.parameters(), **optimizer.defaults)
    ratio = (end_lr / start_lr) ** (1.0 / (steps - 1))
    generators = [g for g in {id(g): g for g in _loader_generators(loader)}.values()]
    generator_states = [g.get_state() for g in generators]
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    lrs, losses, raw = [], [], []
    average, best, stopped_early = 0.0, math.inf, False
    task = progress.add_task("LR range test", total=steps, loss=math.nan) if progress is not None else None
    try:
        with torch.random.fork_rng(devices=devices):
            batches = _cycle(loader)
            for i in range(steps):
                lr = start_lr * ratio ** i
                for group in trial_optimizer.param_groups:
                    group["lr"] = lr
                x, y = next(batches)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = loss_fn(trial(x), y)
                trial_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                trial_optimizer.step()
                value = float(loss.detach())  # the test needs each loss to decide whether to stop
                if progress is not None:
                    progress.update(task, advance=1, loss=value)
                if not math.isfinite(value):
                    stopped_early = True
                    break
                average = smoothing * average + (1 - smoothing) * value
                smoothed = average / (1 - smoothing ** (i + 1))
                lrs.append(lr)
                losses.append(smoothed)
                raw.append(value)
                best = min(best, smoothed)
                if i > 0 and smoothed > diverge * best:
                    stopped_early = True
                    break
    finally:
        for g, s in zip(generators, generator_states):
            g.set_state(s)
        if progress is not None:
            progress.remove_task(task)
    suggested, method = suggest_lr(lrs, losses)
    return {"lrs": lrs, "losses": losses, "raw_losses": raw, "suggested_lr": suggested, "method": method,
            "stopped_early": stopped_early, "start_lr": start_lr, "end_lr": end_lr, "steps": steps}


def suggest_lr(lrs: Sequence[float], losses: Sequence[float]) -> tuple[float | None, str | None]:
    """(suggested lr, method) from an LR range test's smoothed losses; see :func:`lr_range_test`."""
    if not lrs:
        return None, None
    import numpy as np

    loss = np.asarray(losses, dtype=float)
    log_lr = np.log10(np.asarray(lrs, dtype=float))
    best = int(np.argmin(loss))
    start = int(len(loss) * LR_FINDER_SKIP_START)
    if len(loss) >= LR_FINDER_MIN_POINTS and best - start >= 2:
        slope = np.gradient(loss, log_lr)
        steepest = start + int(np.argmin(slope[start:best + 1]))
        if slope[steepest] < 0:
            return float(lrs[steepest]), "steepest descent"
    return float(lrs[best]) / 10, "min loss / 10"


def _cycle(loader: Iterable):
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("lr_range_test: the loader yields no batches")


def _loader_generators(loader) -> list[torch.Generator]:
    """The generators a DataLoader's shuffling draws from (restored after the LR range test)."""
    found = []
    for owner in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None),
                  getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator):
            found.append(g)
    return found


def describe_row(row: dict, epochs: int) -> str:
    """One line for an epoch's row, for logs when there is no progress bar."""
    def pct(x):
        return "-" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"

    def num(x):
        return "-" if x is None else f"{x:.4g}"

    return (f"epoch {row['epoch']}/{epochs}: train loss {num(row['train_loss'])}, acc {pct(row['train_acc'])}; "
            f"val loss {num(row['val_loss'])}, acc {pct(row['val_acc'])} ({row['seconds']:.1f} s)")


__all__ = ["Evaluation", "evaluate", "classification_metrics", "FitState", "fit", "lr_range_test", "suggest_lr",
           "describe_row"]

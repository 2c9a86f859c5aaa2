"""The :class:`Doctor`: a few calls placed in any training loop record what the detectors need.

Where the calls go (the numbers are the order within one step)::

    doctor = Doctor(model)                                  # before training; or `with Doctor(model) as doctor:`
    for epoch in range(epochs):
        for x, y in doctor.watch_loader(train_loader):      # times the wait for each batch (or doctor.data_wait(s))
            logits = model(x)
            doctor.watch_loss_input(logits, y)              # 1. optional: what goes into cross_entropy: logits?
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(); loss.backward()
            doctor.after_backward(loss)                     # 2. one cnnperf.grad_norms call; before any clipping
            cnnperf.clip_grad_norm_(model.parameters(), 1.0)   # (optional)
            optimizer.step()
            doctor.after_step(optimizer)                    # 3. update-to-weight ratio, lr, step time
        doctor.end_epoch(train_loss=..., train_acc=..., val_loss=..., val_acc=..., lr=...)
    findings, record = doctor.report(run={"data": "my data", "augment": False, "num_classes": 10})
    doctor.save("doctor-out", run={...})                     # or: doctor.json and report.html, as the CLI writes
    doctor.close()                                           # removes the hooks (the `with` block does it too)

Variations: ``loss_fn = doctor.wrap_loss(F.cross_entropy)`` calls ``watch_loss_input`` for you. With fp16 and a
``torch.amp.GradScaler``, call ``doctor.after_backward(loss, scaler=scaler)`` after ``scaler.scale(loss).backward()``
and before ``scaler.unscale_``: the norms are unscaled on the device, and the scaler's skipped steps (inf/NaN
gradients) are not reported as a problem unless they are frequent. ``doctor.report()`` returns
``(findings, record)``: the :class:`~cnnperf.doctor.findings.Finding` list and the doctor.json dict
(:meth:`Doctor.save` writes it with report.html).

What each step costs (the doctor never synchronises with the device inside a step):

- every step: the total and per-parameter gradient norms (one :func:`cnnperf.grad_norms` pass on a GPU; on
  the CPU torch's fp32 foreach norm, 3 ops against the reference path's 20), the loss kept as a device tensor,
  two host clock reads;
- sampled steps (steps 1, 1 + ``sample_every``, ...): the weight norms (one foreach call) and a copy of the
  weights taken in ``after_backward``, i.e. before ``optimizer.step()``, so ``after_step`` needs no
  ``before_step`` call to measure ``||w_after - w_before|| / ||w_before||`` (the copy lives from
  ``after_backward`` to ``after_step``: one model's worth of memory; ``track_updates=False`` skips it);
  forward hooks armed for that one
  step only: a pre-hook on the model for the input's mean/std/min/max, a hook on the model for whether its
  outputs are probabilities (rows >= 0 summing to 1: a softmax before ``cross_entropy``, checked on what
  ``watch_loss_input`` is given instead where it is called), and forward hooks on every activation module
  (``ACTIVATION_TYPES``) for how much its output varies between the batch's inputs (the root mean square over
  units of the standard deviation over the batch: the signal the layer passes on) and, on
  every ``nn.ReLU`` and :class:`cnnperf.nn.FusedConv2dBiasReLU` (whose output is post-ReLU), the dead-unit
  fraction;
- once per epoch (``end_epoch``) and in ``report()``: everything recorded moves to the host in a few copies.

The hooks only read the tensors they see (in-place ReLUs included: a forward hook sees the output after the
ReLU wrote it); they never change the model, and ``close()`` removes them. Hooks record only the first forward
pass of a sampled step that runs in training mode with gradients enabled, so validation passes in between are
ignored. All parameters must be on one device (the gradient norms are one pass over all of them).
"""

from __future__ import annotations

import datetime as _dt
import functools
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import torch
from torch import nn

from cnnperf._env import versions
from cnnperf.doctor import findings as _findings
from cnnperf.nn import FusedConv2dBiasReLU
from cnnperf.ops.grad_norm import grad_norms

SCHEMA = "cnnperf.doctor/1"

# A unit (channel and position) counts as dead when it is zero for the whole batch. With few samples a healthy
# unit is often zero for all of them by chance (1 in 2^N for a symmetric pre-activation), so batches smaller
# than this are not measured.
MIN_RELU_BATCH = 8

# The activation hooks look at up to this many units per module (every k-th channel of a larger one): the
# statistics of 8,192 units (x the batch) are as telling as all, and reading all of a ConvNet's two ReLU outputs
# twice (3.7M values each) cost 8 ms per sampled step on a 14 ms step here.
MAX_HOOK_UNITS = 8192

# The spread between inputs is measured on this many pairs of the batch's images (the first against the next):
# with thousands of units per layer, 8 pairs estimate the units' mean variance as well as 32 do, at a quarter of
# the reads (LeNet-BN's first ReLU hook: 358 us per sampled step with 32 pairs, a 4.2 ms forward here).
SPREAD_PAIRS = 8

# The input's mean, std, min and max (raw 0-255 pixels vs normalised ones) are taken over this many images of
# the batch: std_mean over a 64-image digits batch took 200 us here, over 8 images 70 us.
INPUT_STAT_IMAGES = 8

# Softmax check: a row of the loss input "sums to 1" within this tolerance (fp32 softmax rows are within
# ~1e-6 of 1; logits essentially never are).
PROB_ROW_TOLERANCE = 1e-3

RELU_TYPES = (nn.ReLU, FusedConv2dBiasReLU)  # modules whose output is post-ReLU
SATURATING_TYPES = (nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.Hardtanh, nn.Softsign)
# Modules whose output scale is recorded (the signal's size along depth).
ACTIVATION_TYPES = RELU_TYPES + SATURATING_TYPES + (nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU,
                                                    nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Softplus)
DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


class Report(NamedTuple):
    """What :meth:`Doctor.report` returns: the findings, and the doctor.json record (SCHEMA.md) that holds them."""

    findings: list  # list[cnnperf.doctor.findings.Finding], most severe first
    record: dict


class Doctor:
    """Watches one model's training and explains, with evidence, what is wrong and what to change.

    ``model``: the ``nn.Module`` being trained (only its trainable parameters are watched; all on one device).
    ``sample_every``: steps 1, 1 + k, 1 + 2k, ... are sampled (per-layer statistics, weight snapshot, hooks).
    ``track_updates``: measure the update-to-weight ratio (costs one copy of the weights on sampled steps).
    ``watch_relu`` / ``watch_inputs``: arm the activation hooks (dead ReLUs, the output scale of every
    activation module) and the model-input pre-hook on sampled steps.
    ``writer``: a :class:`torch.utils.tensorboard.SummaryWriter` (or anything with its ``add_scalar(tag, value,
    global_step)`` and ``add_text(tag, text, global_step)``): each :meth:`end_epoch` writes what was recorded
    since the last one under ``doctor/`` (per step: ``loss``, ``grad_norm``; per sampled step and layer:
    ``grad_norm/<parameter>``, ``update_to_weight/<parameter>``, ``dead_relu/<module>``,
    ``activation_spread/<module>``; per epoch: ``epoch/<metric>``), and :meth:`report` the findings as text
    (``doctor/findings``). The x axis is the training step.
    ``process_group``: under torch.distributed (torchrun, DDP), the ranks whose records are combined (default:
    the default group, when one is initialised). Every rank runs its own Doctor; the per-rank numbers are
    combined where they are moved to the host (``end_epoch``, ``report``, ``save``: call them on every rank, at
    the same points): losses, activation and input statistics and the epoch metrics given to ``end_epoch`` are
    averaged over the ranks, waits and step times take the slowest rank's; gradient norms need nothing (DDP's
    gradients are the same on every rank; FSDP2's sharded ones are all-reduced by :func:`cnnperf.grad_norms`).
    So every rank gets the same findings; :meth:`save` writes on rank 0 only.
    """

    def __init__(self, model: nn.Module, *, sample_every: int = 10, track_updates: bool = True,
                 watch_relu: bool = True, watch_inputs: bool = True, writer=None, process_group=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Doctor: model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(sample_every, bool) or not isinstance(sample_every, int) or sample_every < 1:
            raise ValueError(f"Doctor: sample_every must be a positive integer, got {sample_every!r}")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"Doctor: {type(model).__name__} has no trainable parameters to watch")
        devices = {p.device for _, p in named}
        if len(devices) > 1:
            raise ValueError(f"Doctor: the parameters are on several devices ({sorted(map(str, devices))}); "
                             "the doctor watches models on one device")
        self.model = model
        self.sample_every = sample_every
        self.track_updates = track_updates
        self.param_names = [n for n, _ in named]
        self._params = [p for _, p in named]
        acts = [(n, m) for n, m in model.named_modules() if isinstance(m, ACTIVATION_TYPES)] if watch_relu else []
        self.activation_names = [n for n, _ in acts]
        self._act_modules = [m for _, m in acts]
        self._relu_index = [i for i, (_, m) in enumerate(acts) if isinstance(m, RELU_TYPES)]
        self._nan_value: torch.Tensor | None = None  # a device NaN for what a sampled step could not measure
        self.relu_names = [self.activation_names[i] for i in self._relu_index]
        self._watch_inputs = watch_inputs
        if writer is not None and not all(callable(getattr(writer, m, None)) for m in ("add_scalar", "add_text")):
            raise TypeError(f"Doctor: writer must have add_scalar and add_text (a torch.utils.tensorboard "
                            f"SummaryWriter), got {type(writer).__name__}")
        self.writer = writer
        self._written = {"steps": 0, "layers": 0, "relu": 0, "activations": 0, "epochs": 0}
        dist = torch.distributed
        self._group = process_group
        on = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(process_group) if on else 1
        self.rank = dist.get_rank(process_group) if on else 0
        self._timed = 0  # steps whose data and step times are combined over the ranks
        self._sharded = [_shard_group(p) is not None for p in self._params]  # FSDP2's DTensor parameters
        self._shard_group = next((_shard_group(p) for p in self._params if _shard_group(p) is not None), None)
        self._started = _dt.datetime.now(_dt.timezone.utc)
        self._started_clock = time.perf_counter()

        # step state
        self._step = 0  # steps finished (after_backward calls)
        self._epoch = 1  # the epoch the next step belongs to (1-based)
        self._mark: float | None = None  # host time the current step began (previous step end, or loader start)
        self._epoch_start: float | None = None
        self._pending_data = 0.0
        self._data_reported = False
        self._last_lr: float | None = None
        self._optimizer_facts: dict = {}
        self._grad_scaler = False
        self._snapshot: list[torch.Tensor] | None = None
        self._sample: dict | None = None  # the sampled step waiting for after_step

        # hooks, armed on sampled steps only
        self._hooks: list = []
        self._armed = False
        self._capturing = False  # inside the first training-mode forward after arming
        self._captured = False
        self._act_acc: dict[int, dict] = {}  # per activation module: the hooks' device-side sums
        self._input_stats: torch.Tensor | None = None
        self._loss_input_stats: torch.Tensor | None = None
        self._output_stats: torch.Tensor | None = None  # the model's output on a sampled step
        self._closed = False

        # device-side buffers, moved to the host by _flush()
        self._dev_loss: list = []
        self._dev_total: list = []
        self._dev_samples: list[dict] = []
        self._dev_relu: list[tuple[int, torch.Tensor, list[int]]] = []  # (step, alive units, units) per ReLU
        self._dev_acts: list[tuple[int, torch.Tensor, list[int]]] = []  # (step, |a - b|, its n) per activation
        self._dev_inputs: list[tuple[int, torch.Tensor]] = []
        self._dev_loss_inputs: list[tuple[int, torch.Tensor, str]] = []

        # host-side history
        self.steps: dict[str, list] = {k: [] for k in ("step", "epoch", "loss", "lr", "data_time", "step_time",
                                                       "grad_norm")}
        self.layers: dict[str, Any] = {"names": list(self.param_names),
                                       "shapes": [list(p.shape) for p in self._params], "steps": [],
                                       "grad_norm": [], "grad_to_weight": [], "update_to_weight": [],
                                       "weight_norm": []}
        self.relu: dict[str, Any] = {"names": list(self.relu_names), "steps": [], "dead_fraction": []}
        self.activations: dict[str, Any] = {"names": list(self.activation_names), "steps": [], "spread": []}
        self.inputs: dict[str, list] = {"steps": [], "mean": [], "std": [], "min": [], "max": []}
        self.loss_inputs: dict[str, list] = {"steps": [], "min": [], "prob_rows": [], "source": []}
        self.epochs: list[dict] = []
        self._arm()  # step 1 is always sampled

    # ---------------------------------------------------------------------------------------------------
    # the calls in the training loop
    # ---------------------------------------------------------------------------------------------------

    def watch_loader(self, loader: Iterable) -> "_TimedLoader":
        """``loader`` wrapped so that the time spent waiting for each batch is recorded (``len()`` kept)."""
        return _TimedLoader(self, loader)

    def data_wait(self, seconds: float) -> None:
        """Record ``seconds`` spent waiting for the data of the current step (adds up until the step ends)."""
        self._pending_data += float(seconds)
        self._data_reported = True

    def watch_loss_input(self, logits: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        """Look at what is fed to a cross-entropy-style loss (``(N, C, ...)`` scores) on sampled steps: rows
        that are non-negative and sum to 1 are probabilities, i.e. a softmax before ``cross_entropy``."""
        if not self._is_sampled(self._step + 1) or self._loss_input_stats is not None:
            return
        self._loss_input_stats = _prob_stats(logits)

    def wrap_loss(self, loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``loss_fn(input, target, ...)`` that calls :meth:`watch_loss_input` on its input first."""
        def loss(input, target, *args, **kwargs):
            self.watch_loss_input(input, target)
            return loss_fn(input, target, *args, **kwargs)
        return loss

    def after_backward(self, loss: torch.Tensor | float | None = None, *, scaler=None) -> None:
        """After ``loss.backward()`` (and before clipping or ``optimizer.step()``): the gradient norms of this
        step, the loss, and on sampled steps the per-layer ratios and a snapshot of the weights.

        ``loss``: the unscaled loss (a tensor is kept on the device). ``scaler``: the
        :class:`torch.amp.GradScaler` whose scale the gradients still carry (call this before
        ``scaler.unscale_``); the norms are divided by its scale, on the device, and steps with inf/NaN
        gradients are counted as the scaler's skipped steps.
        """
        now = time.perf_counter()
        step = self._step + 1
        sampled = self._is_sampled(step)
        self._sample, self._snapshot = None, None  # a previous sampled step whose after_step never came
        with torch.no_grad():
            grads = [p.grad for p in self._params]  # each .grad once: 1 us a read here, after a backward
            has_grad = [g is not None for g in grads]
            if not all(has_grad):
                with_grad = [p for p, h in zip(self._params, has_grad) if h]
                grads = [g for g in grads if g is not None]
            else:
                with_grad = self._params
            if self._params[0].device.type == "cpu" and all(type(g) is torch.Tensor for g in grads):
                total, per_param = _cpu_norms(grads)
            else:  # one fused pass (and the all-reduce of sharded DTensor gradients): the total and each norm
                total, per_param, _ = grad_norms(with_grad)
            if scaler is not None and scaler.is_enabled():
                self._grad_scaler = True
                scale = getattr(scaler, "_scale", None)  # a device tensor; get_scale() would synchronise
                if scale is not None:
                    inv = 1.0 / scale.to(device=total.device, dtype=torch.float32).reshape(())
                    total = total * inv
                    per_param = per_param * inv if per_param is not None else None
            self._dev_total.append(total)
            if isinstance(loss, torch.Tensor):
                self._dev_loss.append(loss.detach())  # made a float scalar when moved to the host
            else:
                self._dev_loss.append(math.nan if loss is None else float(loss))
            if sampled:
                self._sample_layers(step, per_param, has_grad)
        self.steps["step"].append(step)
        self.steps["epoch"].append(self._epoch)
        self.steps["lr"].append(self._last_lr)
        self.steps["data_time"].append(self._pending_data if self._data_reported else math.nan)
        self.steps["step_time"].append(math.nan if self._mark is None else now - self._mark)
        if self._epoch_start is None:
            self._epoch_start = self._mark if self._mark is not None else now
        self._pending_data, self._data_reported = 0.0, False
        self._mark = now
        self._step = step
        if sampled:
            self._collect(step)
        if self._is_sampled(step + 1) and not self._closed:
            self._arm()

    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """After ``optimizer.step()``: the update-to-weight ratio on sampled steps, the lr, the step's end time."""
        now = time.perf_counter()
        if self._sample is not None and self._snapshot is not None:
            with torch.no_grad():
                delta = torch._foreach_sub([_local(p.detach()) for p in self._params], self._snapshot)
                self._sample["update_norm"] = self._param_norms(delta)
            self._snapshot = None
        self._sample = None
        if optimizer is not None:
            self._read_optimizer(optimizer)
            if self.steps["lr"]:
                self.steps["lr"][-1] = self._last_lr
        if self.steps["step_time"] and self._mark is not None:
            self.steps["step_time"][-1] += now - self._mark
        self._mark = now

    def end_epoch(self, *, train_loss: float | None = None, train_acc: float | None = None,
                  val_loss: float | None = None, val_acc: float | None = None, lr: float | None = None,
                  seconds: float | None = None) -> dict:
        """Close the epoch; values may be floats or 0-dim tensors. ``train_loss`` defaults to the mean of the
        epoch's step losses, ``lr`` to the optimizer's last lr, ``seconds`` to the time since the epoch began.
        Returns the epoch's row of the history (host floats)."""
        now = time.perf_counter()
        self._flush()
        epoch = self._epoch
        losses = [loss for loss, e in zip(self.steps["loss"], self.steps["epoch"]) if e == epoch]
        if train_loss is None and losses:
            train_loss = sum(losses) / len(losses)
        if lr is not None:
            self._last_lr = _float(lr)
            for i in range(len(self.steps["lr"]) - 1, -1, -1):  # steps of this epoch that saw no optimizer
                if self.steps["epoch"][i] != epoch:
                    break
                if self.steps["lr"][i] is None:
                    self.steps["lr"][i] = self._last_lr
        if seconds is None:
            seconds = now - self._epoch_start if self._epoch_start is not None else math.nan
        row = {"epoch": epoch, "train_loss": _float(train_loss), "train_acc": _float(train_acc),
               "val_loss": _float(val_loss), "val_acc": _float(val_acc),
               "lr": _float(lr) if lr is not None else self._last_lr, "seconds": float(seconds)}
        if self.world_size > 1:  # each rank's metrics of its shard: their mean (None stays None everywhere)
            keys = ("train_loss", "train_acc", "val_loss", "val_acc")
            mean = self._reduce(torch.tensor([math.nan if row[k] is None else row[k] for k in keys]), "avg")
            row.update({k: None if math.isnan(v) else v for k, v in zip(keys, mean.tolist())})
            row["seconds"] = float(self._reduce(torch.tensor([row["seconds"]]), "max"))
        self.epochs.append(row)
        if self.writer is not None:
            self._write()
        self._epoch += 1
        self._epoch_start = None
        self._mark = None  # the next step's clock starts with the next loader iteration (or the next step)
        return row

    @property
    def step(self) -> int:
        """Steps finished so far (``after_backward`` calls)."""
        return self._step

    @property
    def epoch(self) -> int:
        """The 1-based epoch the next step belongs to."""
        return self._epoch

    # ---------------------------------------------------------------------------------------------------
    # the result
    # ---------------------------------------------------------------------------------------------------

    def history(self) -> dict:
        """The recorded history (host lists), as the record's ``history`` section."""
        self._flush(pending=True)
        return {"epochs": [dict(e) for e in self.epochs],
                "steps": {k: list(v) for k, v in self.steps.items()},
                "layers": {k: list(v) for k, v in self.layers.items()},
                "relu": {k: list(v) for k, v in self.relu.items()},
                "activations": {k: list(v) for k, v in self.activations.items()},
                "inputs": {k: list(v) for k, v in self.inputs.items()},
                "loss_inputs": {k: list(v) for k, v in self.loss_inputs.items()}}

    def model_facts(self) -> dict:
        """What the detectors' advice depends on, read from the model and the optimizer seen."""
        counts: dict[str, int] = {}
        for m in self.model.modules():
            if isinstance(m, SATURATING_TYPES + RELU_TYPES + DROPOUT_TYPES + NORM_TYPES):
                counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
        return {"parameters": sum(p.numel() for p in self._params),
                "dropout": any(isinstance(m, DROPOUT_TYPES) and getattr(m, "p", 0) > 0 for m in self.model.modules()),
                "normalization": any(isinstance(m, NORM_TYPES) for m in self.model.modules()),
                "saturating_activations": sum(isinstance(m, SATURATING_TYPES) for m in self.model.modules()),
                "layer_types": counts, "sample_every": self.sample_every, "grad_scaler": self._grad_scaler,
                **self._optimizer_facts}

    def report(self, run: Mapping | None = None, *, metrics: Mapping | None = None,
               lr_finder: Mapping | None = None, interrupted: bool | None = None) -> Report:
        """The findings and the doctor.json record (see SCHEMA.md) of what was recorded so far.

        ``run``: fields of the record's ``run`` section the doctor cannot know (``data``, ``epochs``,
        ``batch_size``, ``augment``, ``seed``, ``train_size``, ``num_classes``, ``val_size``, ...); the rest is
        filled in from the model, the optimizer and the clock. ``run["monitor"]``: the metric that picks the
        best epoch, ``"val_acc"`` (the default where the epochs have it) or ``"val_loss"``;
        ``run["interface"]``: ``"api"`` (the default: advice in Python) or ``"cli"`` (advice in flags).
        ``metrics``: the validation metrics (see :func:`cnnperf.doctor.train.classification_metrics`).
        ``lr_finder``: an LR range test's result.
        """
        history = self.history()
        now = _dt.datetime.now(_dt.timezone.utc)
        facts = self.model_facts()
        lrs = [lr for lr in history["steps"]["lr"] if lr is not None] + [e["lr"] for e in self.epochs
                                                                          if e.get("lr") is not None]
        info: dict[str, Any] = {
            "model": type(self.model).__name__, "data": None, "device": str(self._params[0].device),
            "epochs": len(self.epochs), "epochs_done": len(self.epochs), "batch_size": None,
            "lr": max(lrs) if lrs else None, "optimizer": facts.get("optimizer"), "clip": None,
            "augment": None, "seed": None, "started": self._started.isoformat(timespec="seconds"),
            "finished": now.isoformat(timespec="seconds"), "interrupted": False,
            "seconds": time.perf_counter() - self._started_clock, "parameters": facts["parameters"],
            "train_size": None, "val_size": None, "interface": "api", "monitor": None,
            "world_size": self.world_size, "versions": versions()}
        info.update({k: v for k, v in facts.items() if k not in ("parameters", "lr", "optimizer")})
        info.update(dict(run or {}))
        if interrupted is not None:
            info["interrupted"] = bool(interrupted)
        info["monitor"] = _findings.monitored(history["epochs"], info.get("monitor"))
        found = _findings.diagnose(history, info, lr_finder)
        if self.writer is not None:
            self.writer.add_text("doctor/findings", _findings_markdown(found), self._step)
        best, stop = _findings.early_stopping(history["epochs"], monitor=info["monitor"], run=info)
        record = {"schema": SCHEMA, "run": info, "findings": [f.to_dict() for f in found], "history": history,
                  "metrics": dict(metrics) if metrics is not None else None, "best_epoch": best,
                  "early_stop_epoch": stop, "lr_finder": dict(lr_finder) if lr_finder is not None else None}
        return Report(found, record)

    def save(self, out_dir, run: Mapping | None = None, *, metrics: Mapping | None = None,
             lr_finder: Mapping | None = None, console=None) -> dict:
        """Write doctor.json and report.html of what was recorded so far into ``out_dir`` (created if missing;
        each file replaced atomically, the JSON first) and return ``{"json": path, "html": path}``. ``run``,
        ``metrics``, ``lr_finder``: as for :meth:`report`. ``console``: a :class:`rich.console.Console` to print
        the terminal summary on (e.g. ``cnnperf._terminal.make_console()``); nothing is printed without one.
        Call it at the end of training, or after each epoch to keep a report that survives a crash. Under
        torch.distributed call it on every rank (the records are combined first): rank 0 writes, the others
        return the same paths without touching the files."""
        from cnnperf.doctor.report import write_reports

        record = self.report(run, metrics=metrics, lr_finder=lr_finder).record
        if self.rank != 0:
            out = Path(out_dir)
            return {"json": out / "doctor.json", "html": out / "report.html"}
        return write_reports(record, out_dir, console=console)

    def close(self) -> None:
        """Remove every hook from the model and drop the weight snapshot. The doctor can still report."""
        self._disarm()
        self._snapshot = None
        self._closed = True

    def __enter__(self) -> "Doctor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self._disarm()
        except Exception:  # interpreter shutdown: the hook handles may already be gone
            pass

    # ---------------------------------------------------------------------------------------------------
    # internals
    # ---------------------------------------------------------------------------------------------------

    def _is_sampled(self, step: int) -> bool:
        return (step - 1) % self.sample_every == 0

    def _sample_layers(self, step: int, per_param: torch.Tensor, has_grad: list[bool]) -> None:
        weights = [_local(p.detach()) for p in self._params]  # a sharded parameter: this rank's shard
        weight = self._param_norms(weights)
        if all(has_grad):
            grad = per_param.float()
        else:  # parameters without a gradient this step (frozen, unused) are NaN
            grad = torch.full_like(weight, math.nan)
            index = torch.tensor([i for i, h in enumerate(has_grad) if h], device=weight.device, dtype=torch.long)
            if index.numel():
                grad = grad.index_copy(0, index, per_param.float())
        sample = {"step": step, "grad_norm": grad, "weight_norm": weight, "update_norm": None}  # ratios: _flush
        self._dev_samples.append(sample)
        if self.track_updates:
            self._snapshot = torch._foreach_mul(weights, 1.0)  # a copy, in one call
            self._sample = sample

    # hooks ---------------------------------------------------------------------------------------------

    def _arm(self) -> None:
        if self._armed:
            return
        self._act_acc, self._input_stats, self._capturing, self._captured = {}, None, False, False
        self._hooks.append(self.model.register_forward_pre_hook(_Hook(self._root_pre_hook)))
        self._hooks.append(self.model.register_forward_hook(_Hook(self._root_hook)))
        for i, module in enumerate(self._act_modules):
            self._hooks.append(module.register_forward_hook(_Hook(functools.partial(self._act_hook, i))))
        self._armed = True

    def _disarm(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._armed = False
        self._capturing = False

    def _root_pre_hook(self, module, args):
        if module is not self.model or self._captured or not module.training or not torch.is_grad_enabled():
            return
        self._capturing = True
        if self._watch_inputs and args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            with torch.no_grad():
                x = args[0].detach()[:INPUT_STAT_IMAGES]
                if x.numel() > 1:
                    std, mean = torch.std_mean(x)
                    low, high = torch.aminmax(x)
                    self._input_stats = torch.stack([mean, std, low, high]).float()

    def _root_hook(self, module, args, output):
        if module is self.model and self._capturing:
            self._capturing, self._captured = False, True
            if isinstance(output, torch.Tensor):  # what usually goes into the loss: probabilities?
                self._output_stats = _prob_stats(output)

    def _act_hook(self, index: int, module, args, output):
        if not self._capturing or not isinstance(output, torch.Tensor) or output.dim() < 2:
            return
        # a module called twice in one forward adds up; few ops per call (each costs 10-30 us on a small CPU)
        acc = self._act_acc.setdefault(index, {"norms": [], "n": 0, "alive": [], "units": 0})
        with torch.no_grad():
            x = output.detach()
            units = x[0].numel()
            if units > MAX_HOOK_UNITS:  # every k-th channel (whole maps: contiguous reads, no channel bias)
                x = x[:, ::-(-units // MAX_HOOK_UNITS)] if x.dim() > 2 else x[:, :MAX_HOOK_UNITS]
            pairs = min(x.shape[0] // 2, SPREAD_PAIRS)
            if pairs:  # how much each unit varies between the batch's inputs: the signal carried
                # E[(a - b)^2] = 2 Var for two independent inputs a, b: images against other images give the
                # units' mean variance in one pass, with no cancellation where the spread is small against the
                # mean (var(dim=0)'s Welford pass was 10x slower here)
                a, b = x[:pairs], x[pairs:2 * pairs]
                if a.dtype in (torch.float32, torch.float64):
                    acc["norms"].append(torch.dist(a, b))  # |a - b| in one op
                else:  # half precision: the squares summed in fp32
                    acc["norms"].append(torch.linalg.vector_norm(a - b, dtype=torch.float32))
                acc["n"] += a.numel()
            if isinstance(module, RELU_TYPES) and x.shape[0] >= MIN_RELU_BATCH:
                # post-ReLU values are >= 0: a unit is alive when its max over the batch is not 0
                acc["alive"].append(torch.count_nonzero(x.amax(dim=0)))
                acc["units"] += x[0].numel()

    def _collect(self, step: int) -> None:
        """After a sampled step's backward: keep what the hooks and watch_loss_input saw (device tensors),
        and disarm the hooks."""
        if self._loss_input_stats is not None:  # what the user said goes into the loss, else the model's output
            self._dev_loss_inputs.append((step, self._loss_input_stats, "loss_input"))
        elif self._output_stats is not None:
            self._dev_loss_inputs.append((step, self._output_stats, "model_output"))
        if self._captured:
            if self._act_modules:  # the device sums, stacked; the divisions wait for _flush (one op for all steps)
                empty = {"norms": [], "n": 0, "alive": [], "units": 0}
                norms, counts, alive, units = [], [], [], []
                for i in range(len(self._act_modules)):
                    acc = self._act_acc.get(i, empty)
                    norms.append(self._combined(acc["norms"], torch.linalg.vector_norm))
                    counts.append(acc["n"])
                    if i in self._relu_index:
                        alive.append(self._combined(acc["alive"], torch.sum))
                        units.append(acc["units"])
                if alive:
                    self._dev_relu.append((step, torch.stack(alive), units))
                self._dev_acts.append((step, torch.stack(norms), counts))
            if self._input_stats is not None:
                self._dev_inputs.append((step, self._input_stats))
        self._disarm()
        self._act_acc, self._input_stats, self._loss_input_stats, self._output_stats = {}, None, None, None

    def _combined(self, values: list[torch.Tensor], combine) -> torch.Tensor:
        """One module call's value as it is, several calls' combined (``combine`` of their stack), none a NaN."""
        if len(values) == 1:
            return values[0]
        if values:
            return combine(torch.stack(values))
        if self._nan_value is None or self._nan_value.device != self._params[0].device:
            self._nan_value = torch.tensor(math.nan, device=self._params[0].device)
        return self._nan_value

    def _read_optimizer(self, optimizer) -> None:
        groups = getattr(optimizer, "param_groups", None)
        if not groups:
            return
        group = groups[0]
        self._last_lr = _float(group.get("lr"))
        self._optimizer_facts = {"optimizer": type(optimizer).__name__.lower(), "lr": self._last_lr,
                                 "weight_decay": _float(group.get("weight_decay", 0.0)),
                                 "momentum": _float(group.get("momentum")) if "momentum" in group else None}

    # TensorBoard -----------------------------------------------------------------------------------------

    def _write(self) -> None:
        """What was recorded since the last call, to the writer (host lists only: after a flush)."""
        w, done = self.writer, self._written
        steps = self.steps
        for i in range(done["steps"], len(steps["loss"])):
            for key in ("loss", "grad_norm"):
                _scalar(w, f"doctor/{key}", steps[key][i], steps["step"][i])
        done["steps"] = len(steps["loss"])
        for kind, block, tags in (("layers", self.layers, {"grad_norm": "grad_norm",
                                                            "update_to_weight": "update_to_weight"}),
                                  ("relu", self.relu, {"dead_fraction": "dead_relu"}),
                                  ("activations", self.activations, {"spread": "activation_spread"})):
            for i in range(done[kind], len(block["steps"])):
                for key, tag in tags.items():
                    for name, value in zip(block["names"], block[key][i]):
                        _scalar(w, f"doctor/{tag}/{name}", value, block["steps"][i])
            done[kind] = len(block["steps"])
        for row in self.epochs[done["epochs"]:]:
            for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
                _scalar(w, f"doctor/epoch/{key}", row.get(key), self._step)
        done["epochs"] = len(self.epochs)
        if callable(getattr(w, "flush", None)):
            w.flush()

    # moving to the host ----------------------------------------------------------------------------------

    def _param_norms(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The norms of tensors shaped like the parameters (their local shards where they are sharded
        DTensors, FSDP2): each shard's sum of squares is all-reduced over its shard group."""
        norms = _norms(tensors)
        if self._shard_group is None:
            return norms
        squares = norms.square()
        mask = torch.tensor(self._sharded, device=squares.device)
        summed = squares * mask
        torch.distributed.all_reduce(summed, group=self._shard_group)
        return torch.where(mask, summed.sqrt(), norms)

    def _reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """``t`` combined over the ranks ("avg" or "max"), on the host; ``t`` itself on one process. The
        collective runs on the parameters' device (NCCL takes CUDA tensors only)."""
        if self.world_size == 1:
            return t.cpu()
        dist = torch.distributed
        x = t.detach().to(self._params[0].device, torch.float64 if t.dtype == torch.float64 else torch.float32,
                          copy=True)  # all_reduce writes in place: never into the caller's tensor
        dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self._group)
        if op == "avg":
            x /= self.world_size
        return x.cpu()

    def _flush(self, pending: bool = False) -> None:
        """Move every device-side buffer to the host lists (a few copies; the only synchronisation). The
        sampled step waiting for ``after_step`` stays on the device unless ``pending`` (then it has no update)."""
        if pending:
            self._sample, self._snapshot = None, None
        if self._dev_loss:
            losses = [t if isinstance(t, torch.Tensor) else torch.tensor(t) for t in self._dev_loss]
            self.steps["loss"].extend(self._reduce(_stack(losses), "avg").tolist())
            self.steps["grad_norm"].extend(_stack(self._dev_total).tolist())
            self._dev_loss, self._dev_total = [], []
        if self.world_size > 1 and self._timed < len(self.steps["step"]):  # the slowest rank's times
            for key in ("data_time", "step_time"):
                new = self.steps[key][self._timed:]
                self.steps[key][self._timed:] = self._reduce(torch.tensor(new, dtype=torch.float64), "max").tolist()
            self._timed = len(self.steps["step"])
        done = [s for s in self._dev_samples if s is not self._sample]  # the pending one waits for after_step
        if done:
            self.layers["steps"].extend(s["step"] for s in done)
            grad = torch.stack([s["grad_norm"] for s in done])
            weight = torch.stack([s["weight_norm"] for s in done])
            update = torch.stack([s["update_norm"] if s["update_norm"] is not None  # no after_step: NaN
                                  else torch.full_like(s["weight_norm"], math.nan) for s in done])
            for key, value in (("grad_norm", grad), ("weight_norm", weight),
                               ("grad_to_weight", torch.where(weight > 0, grad / weight, math.nan)),
                               ("update_to_weight", torch.where(weight > 0, update / weight, math.nan))):
                self.layers[key].extend(value.cpu().tolist())
            self._dev_samples = [s for s in self._dev_samples if s is self._sample]
        if self._dev_relu:  # a unit is dead when its max over the batch is 0; no units measured: NaN
            alive = torch.stack([v for _, v, _ in self._dev_relu]).float()
            units = torch.tensor([u for _, _, u in self._dev_relu], dtype=torch.float32, device=alive.device)
            self.relu["steps"].extend(s for s, _, _ in self._dev_relu)
            self.relu["dead_fraction"].extend(self._reduce((units - alive) / units, "avg").tolist())
            self._dev_relu = []
        if self._dev_acts:  # spread = sqrt(mean((a - b)^2) / 2) = |a - b| / sqrt(2 n)
            norms = torch.stack([v for _, v, _ in self._dev_acts]).float()
            counts = torch.tensor([n for _, _, n in self._dev_acts], dtype=torch.float32, device=norms.device)
            self.activations["steps"].extend(s for s, _, _ in self._dev_acts)
            self.activations["spread"].extend(self._reduce(norms / (2 * counts).sqrt(), "avg").tolist())
            self._dev_acts = []
        if self._dev_inputs:
            self.inputs["steps"].extend(s for s, _ in self._dev_inputs)
            for key, column in zip(("mean", "std", "min", "max"),
                                   self._reduce(torch.stack([v for _, v in self._dev_inputs]), "avg").T.tolist()):
                self.inputs[key].extend(column)
            self._dev_inputs = []
        if self._dev_loss_inputs:
            self.loss_inputs["steps"].extend(s for s, _, _ in self._dev_loss_inputs)
            self.loss_inputs["source"].extend(source for _, _, source in self._dev_loss_inputs)
            for key, column in zip(("min", "prob_rows"),
                                   self._reduce(torch.stack([v for _, v, _ in self._dev_loss_inputs]),
                                                "avg").T.tolist()):
                self.loss_inputs[key].extend(column)
            self._dev_loss_inputs = []


class _Hook:
    """A hook that calls back into the doctor. A copy of the model (``copy.deepcopy``, ``torch.save`` of the whole
    module) taken while the hooks are armed gets a no-op in its place, not a copy of the doctor."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)

    def __reduce__(self):
        return (_Hook, (_noop,))


def _noop(*args) -> None:
    return None


class _TimedLoader:
    """A loader that records, for each batch, how long the training loop waited for it."""

    def __init__(self, doctor: Doctor, loader: Iterable):
        self.doctor, self.loader = doctor, loader

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator:
        doctor = self.doctor
        start = time.perf_counter()
        if doctor._epoch_start is None:
            doctor._epoch_start = start
        doctor._mark = start
        iterator = iter(self.loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            doctor.data_wait(time.perf_counter() - t0)
            yield batch


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard; any other tensor itself."""
    return t.to_local() if callable(getattr(t, "to_local", None)) else t


def _shard_group(p: torch.Tensor):
    """The process group a DTensor parameter is sharded over (its first sharded mesh dimension); None for a
    plain or replicated one."""
    placements = getattr(p, "placements", None)
    if placements is None:
        return None
    dims = [i for i, placement in enumerate(placements) if placement.is_shard()]
    return p.device_mesh.get_group(dims[0]) if dims else None


def _scalar(writer, tag: str, value, step: int) -> None:
    if value is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        writer.add_scalar(tag, value, step)


def _findings_markdown(found) -> str:
    """The findings as TensorBoard's text panel shows them (markdown)."""
    if not found:
        return "No findings."
    parts = []
    for f in found:
        advice = "\n".join(f"{i}. {a}" for i, a in enumerate(f.advice, 1))
        parts.append(f"**{f.severity}: {f.title}** (`{f.kind}`)\n\n{f.evidence}\n\n{advice}")
    return "\n\n---\n\n".join(parts)


def _cpu_norms(grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, per-tensor) 2-norms of CPU ``grads`` in fp32 with torch's foreach kernel: 3 ops, where
    ``grad_norms``' reference path (float64 sums, a finite flag, the clip's coefficient) takes about 20 small
    ones, 0.57 ms of a ConvNet's 14 ms step on this CPU. fp32's accuracy is plenty for the doctor."""
    if not grads:
        return torch.zeros(()), torch.zeros(0)
    per = _norms(grads)
    return torch.linalg.vector_norm(per), per


def _prob_stats(scores) -> torch.Tensor | None:
    """(min, fraction of rows summing to 1) of ``(N, C, ...)`` scores, on their device; None for anything else."""
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point() or scores.dim() < 2:
        return None
    with torch.no_grad():
        x = scores.detach().float()
        prob_rows = ((x.sum(dim=1) - 1.0).abs() <= PROB_ROW_TOLERANCE).float().mean()
        return torch.stack([x.amin(), prob_rows])


def _norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of each tensor as one fp32 vector (foreach's fast path when all are fp32)."""
    if all(t.dtype == torch.float32 for t in tensors):
        return torch.stack(torch._foreach_norm(tensors))
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32))


def _float(x) -> float | None:
    """A host float from a float, int, 0-dim tensor or None (None stays None)."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return float(x.detach().float().cpu())
    return float(x)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """0-dim (or 1-element) tensors as one float vector on the first one's device."""
    device = tensors[0].device
    return torch.stack([t.to(device).float().reshape(()) for t in tensors])

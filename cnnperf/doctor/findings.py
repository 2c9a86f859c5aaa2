"""What the doctor finds: the :class:`Finding` record, its kinds, and the detectors.

Each detector is a pure function ``detect_<kind>(history, run) -> Finding | None`` over a recorded history
(the ``history`` section of doctor.json, see SCHEMA.md) and the run's facts (its ``run`` section: optimizer,
lr, weight decay, whether there is dropout, ...). Nothing here touches a model or a tensor, so every detector
is tested on synthetic histories, and a doctor.json can be diagnosed again with :func:`diagnose`.

Each threshold below is a named constant with the reason for its value. They were set so that the planted
pathologies (tests/test_doctor_*.py) are found with a wide margin and healthy runs of the doctor's models on
its data sets raise nothing: a false alarm is a bug, as is a missed pathology.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from cnnperf._format import finite as _finite

KINDS = ("overfitting", "underfitting", "vanishing_gradients", "exploding_gradients", "nonfinite_gradients",
         "dead_relu", "diverging_loss", "softmax_before_cross_entropy", "unnormalized_input", "lr_too_low",
         "slow_data_loading")
SEVERITIES = ("info", "warning", "error")  # least to most severe

# --- per-layer statistics ------------------------------------------------------------------------------
# Per-layer judgements need a few samples: one sampled step can catch a transient.
MIN_SAMPLED_STEPS = 3

# Vanishing gradients: the first third of the weight layers (output layer excluded, see below) have a
# gradient-to-weight ratio at least 100x below the last third's, on at least half of the sampled steps.
# Healthy CNNs (ConvNet, LeNet-5, VGG-11-BN, ResNet-18) stay within ~10x across their hidden layers; a deep
# sigmoid stack loses ~4x per layer, 1e4-1e6x over 8-10 layers. The output layer is left out of the
# comparison: its gradient comes straight from the loss and its weights are small, so its ratio is 10-50x the
# others' in healthy nets too.
VANISHING_RATIO = 1e-2
VANISHING_STEP_FRACTION = 0.5
VANISHING_MIN_WEIGHT_LAYERS = 3  # with fewer, there is no "early" and "late" to compare

# Exploding gradients: a spike is a step whose total gradient norm is more than 10x the median of the (up to)
# 50 steps before it and 10x the median of the (up to) 50 after it. Healthy runs stay within ~4x of their
# running median; an lr that blows up gives 1e2-1e10x. Both sides, because the norm of a healthy net without
# normalisation can rise 20-50x in its first dozen steps and stay there (measured on AlexNet-small with Adam at
# 1e-3): that is a new level, not a spike. A spike near the end, with fewer than 3 steps after it, is judged
# on the steps before it.
EXPLODING_SPIKE = 10.0
EXPLODING_WINDOW = 50
EXPLODING_MIN_HISTORY = 10  # the median of fewer steps before is not a baseline
EXPLODING_MIN_AFTER = 3

# Non-finite gradients under a GradScaler (fp16 mixed precision): the scaler skips steps whose gradients
# overflow and halves its scale, a few times at the start and about once per 2,000 steps after; only more than
# 5 % of the steps, or the last 10 steps in a row, is a problem.
NONFINITE_SCALER_FRACTION = 0.05
NONFINITE_SCALER_TAIL = 10

# Dead ReLU: a unit is dead on a step when it is zero for the whole batch. Healthy nets have 5-45 % of such
# units in a layer (hidden linear layers on small data sets are sparse); a layer where three quarters are
# dead has lost most of its capacity; at 99 % nothing passes through it and nothing before it learns.
DEAD_RELU_WARNING = 0.75
DEAD_RELU_ERROR = 0.99
DEAD_RELU_LATE_FRACTION = 0.5  # judge on the last half of the sampled steps: units die during training

# --- the loss ----------------------------------------------------------------------------------------------
# Loss curves are compared through medians over windows of steps, so that one noisy batch decides nothing.
LOSS_WINDOW_MIN, LOSS_WINDOW_DIVISOR = 5, 20  # window = max(5, steps // 20)
# Diverging: the windowed loss climbs above 3x the loss of the first step (healthy runs never go above it;
# an lr 10-100x too high goes to 1e1-1e10x), or ends 1.5x above its lowest value and above where it started.
DIVERGE_BLOWUP = 3.0
DIVERGE_RISE = 1.5
# Learning rate too low: the loss falls less than 10 % over the run while the median step moves the weights by
# less than 1e-5 of their norm. Healthy training moves them by ~1e-3 per step (1e-3..3e-2 measured with Adam
# and SGD on the doctor's models); an lr 1e4x too small gives 1e-8..1e-6.
LR_LOW_MAX_UPDATE = 1e-5
LR_LOW_MAX_DROP = 0.10
LR_LOW_MIN_GRAD = 1e-12  # gradients at least this big (relative to the weights): zero gradients are not the lr's fault

# --- fitting ----------------------------------------------------------------------------------------------
# Overfitting: the validation loss ends 10 % (and 0.01) above its best, 2 or more epochs after it, while the
# training loss kept falling; or the training accuracy ends 10 points above the validation accuracy. Healthy
# runs end within ~2 points, with the best validation loss in the last epochs.
OVERFIT_VAL_RISE = 0.10
OVERFIT_MIN_ABS_RISE = 0.01
OVERFIT_MIN_EPOCHS_AFTER_BEST = 2
OVERFIT_ACC_GAP = 0.10
# Early stopping: stop when the validation loss has not improved for this many epochs (Keras/Lightning's
# usual patience for short runs).
EARLY_STOP_PATIENCE = 3
# Underfitting: the accuracy ends below chance + half the way from chance to 100 % (55 % for 10 classes) on
# both splits, or the training loss fell by less than 10 % from the first epoch to the last while the
# training accuracy stays below 90 %.
UNDERFIT_ACC_FRACTION = 0.5
UNDERFIT_MIN_DROP = 0.10
UNDERFIT_GOOD_ACC = 0.90
STILL_LEARNING_DROP = 0.05  # the last epoch lowered the training loss by 5 %+: more epochs would help

# --- the data flowing through -------------------------------------------------------------------------------
# Softmax before cross_entropy: on at least half the sampled steps 99 % of the rows of the loss input are
# >= 0 and sum to 1 (within 1e-3): probabilities, never logits.
SOFTMAX_ROW_FRACTION = 0.99
SOFTMAX_STEP_FRACTION = 0.5
SOFTMAX_MIN_VALUE = -1e-6
# Unnormalised input: the input's root mean square (sqrt(mean^2 + std^2), 1 for a normalised input, 0.3-0.6
# for [0, 1] pixels) above 5 (raw 0..255 pixels give ~100, raw 0..16 digits ~8) or below 0.01 (scaled twice,
# or all zero).
UNNORMALIZED_MAX_RMS = 5.0
UNNORMALIZED_MIN_RMS = 0.01
# Slow data loading: the training loop waits for data for more than half of the step time (first step of each
# epoch left out: it starts the loader's workers). Healthy in-memory loaders take 1-5 %.
SLOW_DATA_FRACTION = 0.5
SLOW_DATA_MIN_STEPS = 5


@dataclass(frozen=True)
class Finding:
    """One thing the doctor found: what (``kind``, one of :data:`KINDS`), how bad (``severity``: info,
    warning, error), a one-line ``title``, the ``evidence`` in sentences with the numbers, ``advice`` ordered
    most useful first, and the numbers behind the evidence in ``data`` (JSON-able)."""

    kind: str
    severity: str
    title: str
    evidence: str
    advice: tuple[str, ...] = ()
    data: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Finding: kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"Finding: severity must be one of {', '.join(SEVERITIES)}; got {self.severity!r}")
        if "\n" in self.title:
            raise ValueError("Finding: title must be one line")
        object.__setattr__(self, "advice", tuple(self.advice))
        object.__setattr__(self, "data", dict(self.data))

    def to_dict(self) -> dict:
        """The finding as doctor.json writes it."""
        return {"kind": self.kind, "severity": self.severity, "title": self.title, "evidence": self.evidence,
                "advice": list(self.advice), "data": dict(self.data)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Finding":
        return cls(d["kind"], d["severity"], d["title"], d["evidence"], tuple(d.get("advice") or ()),
                   dict(d.get("data") or {}))


# ---------------------------------------------------------------------------------------------------------
# the whole diagnosis
# ---------------------------------------------------------------------------------------------------------

def diagnose(history: Mapping, run: Mapping | None = None, lr_finder: Mapping | None = None) -> list[Finding]:
    """Every detector over ``history`` and ``run``; the findings ordered error, warning, info, and within a
    severity by cause before symptom. A symptom whose cause is already named is left out: no underfitting
    or lr_too_low next to a diverging or NaN loss, no underfitting next to lr_too_low, a dead layer, or a
    softmax before the loss."""
    run = dict(run or {})
    if lr_finder:
        run.setdefault("lr_finder", lr_finder)
    found = {}
    for kind, detector in DETECTORS.items():
        finding = detector(history, run)
        if finding is not None:
            found[kind] = finding
    if "diverging_loss" in found or "nonfinite_gradients" in found:
        found.pop("lr_too_low", None)
        found.pop("underfitting", None)
    explained = ("lr_too_low", "softmax_before_cross_entropy")
    if any(k in found for k in explained) or (found.get("dead_relu") and found["dead_relu"].severity == "error"):
        found.pop("underfitting", None)
    rank = {s: i for i, s in enumerate(reversed(SEVERITIES))}
    order = {k: i for i, k in enumerate(DETECTORS)}
    return sorted(found.values(), key=lambda f: (rank[f.severity], order[f.kind]))


def early_stopping(epochs: Sequence[Mapping], patience: int = EARLY_STOP_PATIENCE) -> tuple[int | None, int | None]:
    """(best epoch, early-stopping epoch) from the per-epoch validation losses.

    The best epoch has the lowest validation loss of all the epochs run (the earliest of equals). The
    early-stopping epoch is where training with ``patience`` would have stopped: the first epoch that ends
    ``patience`` epochs without a new best (it would have kept the weights of :func:`best_before` it); None if
    that never happened. Both None without validation losses.
    """
    with_val = [r for r in epochs if _finite(r.get("val_loss")) is not None]
    if not with_val:
        return None, None
    best_epoch = int(min(with_val, key=lambda r: _finite(r["val_loss"]))["epoch"])
    best, wait, seen = math.inf, 0, False
    for row in epochs:
        loss = _finite(row.get("val_loss"))
        if loss is not None and loss < best:
            best, wait, seen = loss, 0, True
        elif seen:
            wait += 1
            if wait >= patience:
                return best_epoch, int(row["epoch"])
    return best_epoch, None


def best_before(epochs: Sequence[Mapping], epoch: int) -> int | None:
    """The epoch with the lowest validation loss up to ``epoch`` (what early stopping there would keep)."""
    rows = [r for r in epochs if _finite(r.get("val_loss")) is not None and int(r["epoch"]) <= epoch]
    return int(min(rows, key=lambda r: _finite(r["val_loss"]))["epoch"]) if rows else None


# ---------------------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------------------

def detect_nonfinite_gradients(history: Mapping, run: Mapping) -> Finding | None:
    """Any step whose total gradient norm is NaN or inf (an error: the step poisons the weights)."""
    steps = _steps(history)
    norms = steps.get("grad_norm") or []
    bad = [i for i, g in enumerate(norms) if _finite(g) is None]
    if not bad or len(norms) == 0:
        return None
    if run.get("grad_scaler"):  # a GradScaler skips such steps and lowers its scale: a few are its normal work
        tail = norms[-NONFINITE_SCALER_TAIL:]
        if (len(bad) <= NONFINITE_SCALER_FRACTION * len(norms)
                and not (len(tail) == NONFINITE_SCALER_TAIL and all(_finite(g) is None for g in tail))):
            return None
    step_ids, epochs = steps.get("step") or list(range(1, len(norms) + 1)), steps.get("epoch") or []
    first = bad[0]
    first_step = step_ids[first] if first < len(step_ids) else first + 1
    first_epoch = epochs[first] if first < len(epochs) else None
    layers = _first_nonfinite_layers(history, first_step)
    losses = steps.get("loss") or []
    loss_first_bad = next((step_ids[i] for i, loss in enumerate(losses) if _finite(loss) is None), None)
    finite_before = [g for g in (_finite(x) for x in norms[:first]) if g is not None]
    evidence = (f"The total gradient norm was NaN or inf on {len(bad)} of {len(norms)} steps, first at step "
                f"{first_step}{_in_epoch(first_epoch)}")
    evidence += (f", after reaching {_g(max(finite_before))} (median before: {_g(statistics.median(finite_before))})."
                 if finite_before else ".")
    if layers:
        evidence += f" The first sampled step with a non-finite layer norm shows it in {_names(layers)}."
    if loss_first_bad is not None:
        evidence += f" The loss itself became non-finite at step {loss_first_bad}."
    lr = _finite(run.get("lr"))
    advice = [f"Lower the learning rate (now {_g(lr)}): try {_g(lr / 10)}." if lr else
              "Lower the learning rate 10x: an lr that makes the loss blow up is the usual cause.",
              "Clip the gradient norm (--clip 1.0, or cnnperf.clip_grad_norm_(model.parameters(), 1.0) after "
              "backward) so that one bad batch cannot blow the weights up.",
              "Look for log(0), sqrt(0), division by zero or exp overflow in a custom loss or layer; check the "
              "inputs for NaN.",
              "With fp16 mixed precision, use torch.amp.GradScaler (it skips steps with inf/NaN gradients)."]
    return Finding("nonfinite_gradients", "error", f"Gradients became NaN/inf at step {first_step}", evidence,
                   advice, {"steps_nonfinite": len(bad), "steps": len(norms), "first_step": first_step,
                            "first_epoch": first_epoch, "layers": layers, "loss_nonfinite_step": loss_first_bad})


def detect_exploding_gradients(history: Mapping, run: Mapping) -> Finding | None:
    """Total-norm spikes: steps more than :data:`EXPLODING_SPIKE` times the median of the steps around them."""
    steps = _steps(history)
    norms = [_finite(g) for g in steps.get("grad_norm") or []]
    step_ids = steps.get("step") or list(range(1, len(norms) + 1))
    finite = [(i, g) for i, g in enumerate(norms) if g is not None]
    spikes = []
    for j, (i, g) in enumerate(finite):
        before = [v for _, v in finite[max(0, j - EXPLODING_WINDOW):j]]
        after = [v for _, v in finite[j + 1:j + 1 + EXPLODING_WINDOW]]
        if len(before) < EXPLODING_MIN_HISTORY:
            continue
        median = statistics.median(before)
        if median <= 0 or g <= EXPLODING_SPIKE * median:
            continue
        if len(after) >= EXPLODING_MIN_AFTER and g <= EXPLODING_SPIKE * statistics.median(after):
            continue  # the norm moved to a new level and stayed there
        spikes.append({"step": step_ids[i], "norm": g, "running_median": median, "ratio": g / median})
    if not spikes:
        return None
    worst = max(spikes, key=lambda s: s["ratio"])
    evidence = (f"{len(spikes)} step{'s' if len(spikes) > 1 else ''} had a total gradient norm more than "
                f"{EXPLODING_SPIKE:g}x the median of the {EXPLODING_WINDOW} steps before and after it; the worst, step "
                f"{worst['step']}, reached {_g(worst['norm'])}, {_g(worst['ratio'])}x its running median "
                f"({_g(worst['running_median'])}).")
    clip = _finite(run.get("clip"))
    if clip:
        evidence += (f" Gradients were clipped at {_g(clip)}, so these steps moved the weights by at most that "
                     "norm (the doctor reads the norms before clipping).")
    lr = _finite(run.get("lr"))
    advice = []
    if not clip:
        advice.append("Clip the gradient norm (--clip 1.0, or cnnperf.clip_grad_norm_(model.parameters(), 1.0) "
                      "after backward).")
    advice.append(f"Lower the learning rate (now {_g(lr)}) or warm it up over the first few hundred steps."
                  if lr else "Lower the learning rate or warm it up over the first few hundred steps.")
    if not run.get("normalization"):
        advice.append("Add normalisation layers (BatchNorm2d after the convolutions) to keep activations, and "
                      "so gradients, in range.")
    advice.append("Look at the batches of the spiking steps for outliers or wrong labels.")
    return Finding("exploding_gradients", "warning",
                   f"Gradient norm spikes up to {_g(worst['ratio'])}x the running median", evidence, advice,
                   {"spikes": spikes[:20], "spike_count": len(spikes), "threshold": EXPLODING_SPIKE,
                    "window": EXPLODING_WINDOW})


def detect_vanishing_gradients(history: Mapping, run: Mapping) -> Finding | None:
    """The early weight layers' gradient-to-weight ratio orders of magnitude below the late ones'."""
    layers = history.get("layers") or {}
    names = list(layers.get("names") or [])
    rows = layers.get("grad_to_weight") or []
    weight_idx = _weight_layers(layers)
    if len(weight_idx) < VANISHING_MIN_WEIGHT_LAYERS or len(rows) < MIN_SAMPLED_STEPS:
        return None
    hidden = weight_idx[:-1]  # the output layer's ratio is large in healthy nets too
    k = max(1, len(hidden) // 3)
    early, late = hidden[:k], hidden[-k:]
    ratios = []
    for row in rows:
        early_ratio = _median([_finite(row[i]) for i in early if i < len(row)])
        late_ratio = _median([_finite(row[i]) for i in late if i < len(row)])
        if early_ratio is not None and late_ratio is not None and late_ratio > 0:
            ratios.append((early_ratio / late_ratio, early_ratio, late_ratio))
    if len(ratios) < MIN_SAMPLED_STEPS:
        return None
    low = [r for r in ratios if r[0] <= VANISHING_RATIO]
    if len(low) < VANISHING_STEP_FRACTION * len(ratios):
        return None
    ratio = statistics.median(r[0] for r in ratios)
    e_med = statistics.median(r[1] for r in ratios)
    l_med = statistics.median(r[2] for r in ratios)
    per_layer = {names[i]: _median([_finite(row[i]) for row in rows if i < len(row)]) for i in weight_idx}
    evidence = (f"On {len(low)} of {len(ratios)} sampled steps the first layers' gradient-to-weight ratio "
                f"({_names([names[i] for i in early])}: median {_g(e_med)}) was {_g(1 / VANISHING_RATIO)}x or more "
                f"below the last hidden layers' ({_names([names[i] for i in late])}: median {_g(l_med)}); the median "
                f"drop is {_g(1 / ratio) if ratio > 0 else 'infinite'}x over {len(hidden)} hidden weight layers. "
                "The first layers barely learn.")
    advice = []
    if run.get("saturating_activations"):
        advice.append(f"Replace the sigmoid/tanh activations ({run['saturating_activations']} in the model) by "
                      "ReLU or GELU: a sigmoid passes back at most 1/4 of the gradient per layer.")
    if not run.get("normalization"):
        advice.append("Add BatchNorm (or LayerNorm) after each convolution/linear layer.")
    advice += ["Add residual (skip) connections, as ResNet does, so the gradient has a short path to the first "
               "layers.",
               "Initialise with torch.nn.init.kaiming_normal_ (ReLU) or xavier_normal_ (tanh/sigmoid).",
               "Use fewer layers, or Adam/AdamW, which rescales each parameter's step (a workaround, not a cure)."]
    return Finding("vanishing_gradients", "warning",
                   f"Vanishing gradients: the first layers get {_g(1 / ratio) if ratio > 0 else 'infinitely'}x "
                   "smaller gradients than the last", evidence, advice,
                   {"early_layers": [names[i] for i in early], "late_layers": [names[i] for i in late],
                    "median_ratio": ratio, "steps_below": len(low), "steps": len(ratios),
                    "threshold": VANISHING_RATIO, "grad_to_weight": per_layer})


def detect_dead_relu(history: Mapping, run: Mapping) -> Finding | None:
    """ReLU layers whose units are zero for whole batches, on the later sampled steps."""
    relu = history.get("relu") or {}
    names = list(relu.get("names") or [])
    rows = relu.get("dead_fraction") or []
    if not names or not rows:
        return None
    late = rows[int(len(rows) * (1 - DEAD_RELU_LATE_FRACTION)):] or rows[-1:]
    dead = {}
    for i, name in enumerate(names):
        value = _median([_finite(r[i]) for r in late if i < len(r)])
        if value is not None and value >= DEAD_RELU_WARNING:
            first = _median([_finite(r[i]) for r in rows[:1] if i < len(r)])
            dead[name] = {"dead_fraction": value, "first_sample": first}
    if not dead:
        return None
    worst = max(v["dead_fraction"] for v in dead.values())
    severity = "error" if worst >= DEAD_RELU_ERROR else "warning"
    parts = [f"{name}: {_pct(v['dead_fraction'])}" for name, v in dead.items()]
    evidence = (f"Units that output zero for every image of the batch (median over the last {len(late)} sampled "
                f"steps): {', '.join(parts)}. ")
    from_start = all(v["first_sample"] is not None and v["first_sample"] >= DEAD_RELU_WARNING for v in dead.values())
    if severity == "error":
        evidence += "Nothing passes through such a layer, so no layer before it gets a gradient. "
    evidence += ("They were dead from the first step: the initialisation (or a bias) keeps their input negative."
                 if from_start else "They died during training, the mark of steps too large for them.")
    lr = _finite(run.get("lr"))
    lower = f"Lower the learning rate (now {_g(lr)}), e.g. to {_g(lr / 10)}." if lr else "Lower the learning rate 10x."
    init = ("Check the initialisation of the layers before these ReLUs: default or Kaiming init and zero biases "
            "(a large negative bias, or weights loaded wrong, keeps every unit off).")
    advice = [init, lower] if from_start else [lower, init]
    advice.append("Use LeakyReLU or GELU, which pass a gradient for negative inputs.")
    if not run.get("normalization"):
        advice.append("Put BatchNorm before the ReLUs so their inputs stay centred.")
    worst_name = next(n for n, v in dead.items() if v["dead_fraction"] == worst)
    title = f"Dead ReLUs: {_pct(worst)} of the units of {worst_name} never fire"
    return Finding("dead_relu", severity, title, evidence, advice,
                   {"layers": dead, "threshold": DEAD_RELU_WARNING, "sampled_steps": len(late),
                    "from_start": from_start})


# ---------------------------------------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------------------------------------

def detect_diverging_loss(history: Mapping, run: Mapping) -> Finding | None:
    """The loss becomes NaN/inf, blows up above :data:`DIVERGE_BLOWUP` x its start, or rises and stays up."""
    steps = _steps(history)
    raw = list(steps.get("loss") or [])
    if not raw:
        return None
    step_ids = steps.get("step") or list(range(1, len(raw) + 1))
    epochs = steps.get("epoch") or []
    losses = [_finite(loss) for loss in raw]
    bad = next((i for i, loss in enumerate(losses) if loss is None), None)
    finite = [(i, loss) for i, loss in enumerate(losses[:bad] if bad is not None else losses) if loss is not None]
    start = finite[0][1] if finite else None
    smooth = _window_medians([loss for _, loss in finite])
    peak_at = max(range(len(smooth)), key=lambda j: smooth[j]) if smooth else None
    peak = smooth[peak_at] if smooth else None
    lr = _finite(run.get("lr"))
    lower = (f"Lower the learning rate (now {_g(lr)}): try {_g(lr / 10)}, or run the LR range test (--find-lr)."
             if lr else "Lower the learning rate 10x, or run the LR range test (--find-lr).")
    advice = [lower, "Clip the gradient norm (--clip 1.0) and warm the learning rate up over the first steps.",
              "Check the data for outliers and wrong labels, and the loss for a wrong reduction (sum instead of "
              "mean makes the steps scale with the batch size)."]
    data = {"start_loss": start, "peak_loss": peak, "nonfinite_step": None}
    if bad is not None:
        step = step_ids[bad] if bad < len(step_ids) else bad + 1
        epoch = epochs[bad] if bad < len(epochs) else None
        evidence = f"The training loss became {_word(raw[bad])} at step {step}{_in_epoch(epoch)}"
        if finite:
            top = max(loss for _, loss in finite)
            evidence += f", after going from {_g(start)} at the first step to as high as {_g(top)}."
        else:
            evidence += ", at the very first step: check the data and the loss for NaN."
        data.update(nonfinite_step=step, max_finite_loss=max((loss for _, loss in finite), default=None))
        return Finding("diverging_loss", "error", f"The loss diverged: {_word(raw[bad])} at step {step}",
                       evidence, advice, data)
    if start is None or start <= 0 or len(smooth) < 2:
        return None
    last = smooth[-1]
    low = min(smooth)
    w = _window(len(finite))
    if peak >= DIVERGE_BLOWUP * start:
        at = step_ids[finite[min(peak_at + w // 2, len(finite) - 1)][0]]  # the middle of the peak window
        recovered = last < start
        evidence = (f"The training loss (median over {w} steps) rose from {_g(start)} at the first step to {_g(peak)} "
                    f"around step {at}, {_g(peak / start)}x its start, and ended at {_g(last)}"
                    + (": it recovered, but steps that large throw away what was learned." if recovered else "."))
        data.update(end_loss=last, peak_step=at, ratio=peak / start)
        return Finding("diverging_loss", "warning" if recovered else "error",
                       f"The loss blew up to {_g(peak / start)}x its start", evidence, advice, data)
    if last > DIVERGE_RISE * low and last > start:
        evidence = (f"The training loss (median over {w} steps) fell to {_g(low)}, then rose to {_g(last)} by the "
                    f"end, above its start ({_g(start)}): training is going backwards.")
        data.update(end_loss=last, lowest_loss=low)
        return Finding("diverging_loss", "warning", "The training loss rose back above its start", evidence,
                       advice, data)
    return None


def detect_lr_too_low(history: Mapping, run: Mapping) -> Finding | None:
    """A flat loss while each step moves the weights by a tiny fraction of their norm (gradients present)."""
    steps = _steps(history)
    losses = [loss for loss in (_finite(x) for x in steps.get("loss") or []) if loss is not None]
    layers = history.get("layers") or {}
    weight_idx = _weight_layers(layers)
    updates = [_median([_finite(row[i]) for i in weight_idx if i < len(row)])
               for row in layers.get("update_to_weight") or []]
    updates = [u for u in updates if u is not None]
    grads = [_median([_finite(row[i]) for i in weight_idx if i < len(row)])
             for row in layers.get("grad_to_weight") or []]
    grads = [g for g in grads if g is not None]
    if len(updates) < MIN_SAMPLED_STEPS or len(losses) < 2 * LOSS_WINDOW_MIN or not grads:
        return None
    update = statistics.median(updates)
    grad = statistics.median(grads)
    w = _window(len(losses))
    first, last = statistics.median(losses[:w]), statistics.median(losses[-w:])
    drop = (first - last) / first if first > 0 else 0.0
    if update >= LR_LOW_MAX_UPDATE or drop >= LR_LOW_MAX_DROP or grad <= LR_LOW_MIN_GRAD:
        return None
    lr = _finite(run.get("lr"))
    finder = run.get("lr_finder") or {}
    suggested = _finite(finder.get("suggested_lr")) if isinstance(finder, Mapping) else None
    evidence = (f"Over {len(losses)} steps the training loss went from {_g(first)} to {_g(last)} (median over {w} "
                f"steps; {_pct(max(drop, 0.0))} lower), while each step changed the weights by a median "
                f"{_g(update)} of their norm; healthy training moves them by about 1e-3 per step.")
    advice = []
    if update == 0:
        evidence += " The weights did not move at all."
        advice.append("Check that the optimizer was built from this model's parameters (model.parameters() after "
                      "the model was moved and wrapped), that the lr is not 0 and that the scheduler is not "
                      "decaying it to 0.")
    if suggested:
        advice.append(f"Raise the learning rate to the LR range test's suggestion, {_g(suggested)} "
                      f"({finder.get('method') or 'suggested'}).")
    if lr:
        advice.append(f"Raise the learning rate (now {_g(lr)}) 10-100x: try {_g(lr * 100)} for SGD-style "
                      "steps, or start from Adam's 1e-3.")
    else:
        advice.append("Raise the learning rate 10-100x.")
    if not suggested:
        advice.append("Run the LR range test (--find-lr) to see where the loss starts to fall.")
    return Finding("lr_too_low", "warning", "The learning rate is too low: the loss is flat and the weights "
                   "barely move", evidence, advice,
                   {"update_to_weight": update, "grad_to_weight": grad, "start_loss": first, "end_loss": last,
                    "drop": drop, "threshold": LR_LOW_MAX_UPDATE, "suggested_lr": suggested})


# ---------------------------------------------------------------------------------------------------------
# fitting
# ---------------------------------------------------------------------------------------------------------

def detect_overfitting(history: Mapping, run: Mapping) -> Finding | None:
    """Validation loss rising while the training loss falls, or a wide train/validation accuracy gap."""
    epochs = [e for e in history.get("epochs") or [] if isinstance(e, Mapping)]
    with_val = [e for e in epochs if _finite(e.get("val_loss")) is not None]
    if not with_val:
        return None
    best_epoch, stop_epoch = early_stopping(epochs)
    best = next(e for e in with_val if e["epoch"] == best_epoch)
    last = with_val[-1]
    best_val, last_val = _finite(best["val_loss"]), _finite(last["val_loss"])
    after = sum(1 for e in with_val if e["epoch"] > best_epoch)
    train_best, train_last = _finite(best.get("train_loss")), _finite(last.get("train_loss"))
    rising = (after >= OVERFIT_MIN_EPOCHS_AFTER_BEST and last_val >= best_val * (1 + OVERFIT_VAL_RISE)
              and last_val - best_val >= OVERFIT_MIN_ABS_RISE
              and (train_best is None or train_last is None or train_last < train_best))
    train_acc, val_acc = _finite(last.get("train_acc")), _finite(last.get("val_acc"))
    gap = train_acc - val_acc if train_acc is not None and val_acc is not None else None
    wide = gap is not None and gap >= OVERFIT_ACC_GAP
    if not rising and not wide:
        return None
    sentences = []
    if rising:
        sentences.append(
            f"The validation loss was lowest at epoch {best_epoch} ({_g(best_val)}) and rose to {_g(last_val)} by "
            f"epoch {last['epoch']} (+{_pct(last_val / best_val - 1)}), while the training loss kept falling"
            + (f" ({_g(train_best)} to {_g(train_last)})." if train_best is not None and train_last is not None
               else "."))
    if gap is not None:
        sentences.append(f"At epoch {last['epoch']} the training accuracy is {_pct(train_acc)} and the validation "
                         f"accuracy {_pct(val_acc)}: a {100 * gap:.1f}-point gap.")
    if stop_epoch is not None:
        sentences.append(f"Early stopping with patience {EARLY_STOP_PATIENCE} would have stopped at epoch "
                         f"{stop_epoch} and kept the weights of epoch {best_before(epochs, stop_epoch)}.")
    advice = []
    if rising:
        advice.append(f"Stop at the best epoch: train {best_epoch} epochs (--epochs {best_epoch}), or use early "
                      f"stopping on the validation loss (patience {EARLY_STOP_PATIENCE}) and keep the best "
                      "checkpoint.")
    if run.get("augment") is False:
        advice.append("Turn on data augmentation (--augment): random crops, flips or small affine transforms "
                      "make every epoch see new images.")
    wd = _finite(run.get("weight_decay"))
    if wd == 0:
        advice.append("Add weight decay: --optimizer adamw (decoupled decay 0.01), or --weight-decay 5e-4 with SGD.")
    elif wd is not None:
        advice.append(f"Raise the weight decay (now {_g(wd)}) 2-10x.")
    if run.get("dropout") is False:
        advice.append("Add dropout (p = 0.25-0.5) before the classifier's linear layers.")
    params, train_size = _finite(run.get("parameters")), _finite(run.get("train_size"))
    if params and train_size:
        advice.append(f"Use a smaller model: {int(params):,} parameters for {int(train_size):,} training images "
                      f"({_g(params / train_size)} per image).")
    else:
        advice.append("Use a smaller model (fewer channels or layers).")
    advice.append("Get more training data (or pretrain on a larger data set and fine-tune).")
    title = (f"Overfitting: validation loss rose {_pct(last_val / best_val - 1)} after epoch {best_epoch}" if rising
             else f"Overfitting: {100 * gap:.1f}-point gap between training and validation accuracy")
    return Finding("overfitting", "warning", title, " ".join(sentences), advice,
                   {"best_epoch": best_epoch, "early_stop_epoch": stop_epoch, "best_val_loss": best_val,
                    "last_val_loss": last_val, "val_loss_rising": rising, "train_acc": train_acc, "val_acc": val_acc,
                    "acc_gap": gap, "patience": EARLY_STOP_PATIENCE})


def detect_underfitting(history: Mapping, run: Mapping) -> Finding | None:
    """Low accuracy on both splits, or a training loss that barely falls while the accuracy stays low."""
    epochs = [e for e in history.get("epochs") or [] if isinstance(e, Mapping)]
    if not epochs:
        return None
    last, first = epochs[-1], epochs[0]
    train_acc, val_acc = _finite(last.get("train_acc")), _finite(last.get("val_acc"))
    classes = _finite(run.get("num_classes"))
    chance = 1 / classes if classes and classes > 1 else 0.0
    low_acc = chance + UNDERFIT_ACC_FRACTION * (1 - chance)
    low = (train_acc is not None and train_acc < low_acc and (val_acc is None or val_acc < low_acc))
    t_first, t_last = _finite(first.get("train_loss")), _finite(last.get("train_loss"))
    drop = (t_first - t_last) / t_first if t_first and t_last is not None and t_first > 0 else None
    flat = (len(epochs) >= 2 and drop is not None and drop < UNDERFIT_MIN_DROP
            and (train_acc is None or train_acc < UNDERFIT_GOOD_ACC))
    if not low and not flat:
        return None
    sentences = []
    if train_acc is not None:
        sentences.append(f"After {len(epochs)} epoch{'s' if len(epochs) > 1 else ''} the training accuracy is "
                         f"{_pct(train_acc)}" + (f" and the validation accuracy {_pct(val_acc)}" if val_acc is not None
                                                 else "")
                         + (f" (chance: {_pct(chance)})." if chance else "."))
    if drop is not None and len(epochs) >= 2:
        sentences.append(f"The training loss went from {_g(t_first)} (epoch 1) to {_g(t_last)} "
                         f"({_pct(drop)} lower).")
    prev = _finite(epochs[-2].get("train_loss")) if len(epochs) >= 2 else None
    still = prev is not None and t_last is not None and prev > 0 and (prev - t_last) / prev >= STILL_LEARNING_DROP
    advice = []
    if still or len(epochs) == 1:
        advice.append("Train longer: the loss was still falling in the last epoch (--epochs).")
    if train_acc is not None and chance and train_acc <= chance * 1.5:
        advice.append("Check the data: accuracy near chance often means labels that do not match the images "
                      "(shuffled separately, wrong mapping).")
    if run.get("saturating_activations"):
        advice.append("Replace sigmoid/tanh activations by ReLU.")
    advice.append("Run the LR range test (--find-lr): a learning rate far from the right one trains slowly.")
    advice.append("Use a bigger model (more channels or layers).")
    wd = _finite(run.get("weight_decay"))
    if wd:
        advice.append(f"Lower the regularisation: weight decay {_g(wd)}" + (", dropout" if run.get("dropout") else "")
                      + (", augmentation" if run.get("augment") else "") + ".")
    elif run.get("dropout") or run.get("augment"):
        advice.append("Lower the regularisation (dropout, augmentation).")
    return Finding("underfitting", "warning",
                   f"Underfitting: {_pct(train_acc)} training accuracy" if train_acc is not None else
                   "Underfitting: the training loss barely falls", " ".join(sentences), advice,
                   {"train_acc": train_acc, "val_acc": val_acc, "chance": chance, "threshold_acc": low_acc,
                    "train_loss_drop": drop, "still_learning": still})


# ---------------------------------------------------------------------------------------------------------
# the data flowing through
# ---------------------------------------------------------------------------------------------------------

def detect_softmax_before_cross_entropy(history: Mapping, run: Mapping) -> Finding | None:
    """Rows of the loss input that are non-negative and sum to 1: probabilities fed to cross_entropy."""
    seen = history.get("loss_inputs") or {}
    rows, mins = seen.get("prob_rows") or [], seen.get("min") or []
    pairs = [(_finite(r), _finite(m)) for r, m in zip(rows, mins)]
    pairs = [(r, m) for r, m in pairs if r is not None and m is not None]
    if not pairs:
        return None
    hits = [p for p in pairs if p[0] >= SOFTMAX_ROW_FRACTION and p[1] >= SOFTMAX_MIN_VALUE]
    if len(hits) < SOFTMAX_STEP_FRACTION * len(pairs):
        return None
    evidence = (f"On {len(hits)} of {len(pairs)} sampled steps every row of what went into the loss was >= 0 and "
                f"summed to 1 (within 1e-3): probabilities, not logits. cross_entropy applies log-softmax itself, "
                "so the softmax is applied twice: the outputs are squeezed into a narrow range and the gradients "
                "shrink, so training crawls and stalls.")
    advice = ["Remove the softmax at the end of the model (or before the loss) and pass the raw logits to "
              "nn.CrossEntropyLoss / F.cross_entropy.",
              "If you need probabilities, apply softmax only when predicting; if the model must output "
              "log-probabilities, use log_softmax with nll_loss."]
    return Finding("softmax_before_cross_entropy", "error", "Softmax before cross_entropy: the loss gets "
                   "probabilities instead of logits", evidence, advice,
                   {"steps_with_probabilities": len(hits), "steps": len(pairs)})


def detect_unnormalized_input(history: Mapping, run: Mapping) -> Finding | None:
    """Model inputs far from zero mean and unit scale (raw 0..255 pixels), or nearly zero."""
    seen = history.get("inputs") or {}
    means, stds = seen.get("mean") or [], seen.get("std") or []
    mins, maxs = seen.get("min") or [], seen.get("max") or []
    mean, std = _median([_finite(x) for x in means]), _median([_finite(x) for x in stds])
    if mean is None or std is None:
        return None
    rms = math.sqrt(mean * mean + std * std)
    low, high = _median([_finite(x) for x in mins]), _median([_finite(x) for x in maxs])
    if UNNORMALIZED_MIN_RMS <= rms <= UNNORMALIZED_MAX_RMS:
        return None
    rng = f", range {_g(low)}..{_g(high)}" if low is not None and high is not None else ""
    evidence = (f"The model's input had mean {_g(mean)} and std {_g(std)}{rng} (median over {len(means)} sampled "
                "steps); networks train best on inputs with mean about 0 and std about 1.")
    raw_pixels = low is not None and high is not None and low >= 0 and 100 < high <= 255
    if raw_pixels:
        evidence += " This looks like raw 0..255 pixels."
    if rms > UNNORMALIZED_MAX_RMS:
        evidence += (" Inputs this large make the first layer's pre-activations and gradients huge, so the first "
                     "steps are erratic.")
        title = "Unnormalised input: " + ("raw 0..255 pixels" if raw_pixels else f"scale {_g(rms)} instead of about 1")
    else:
        evidence += " Inputs this small give the first layer almost nothing to learn from."
        title = f"Unnormalised input: scale {_g(rms)} instead of about 1"
    advice = ["Scale to [0, 1] (transforms.ToTensor, or v2.ToDtype(torch.float32, scale=True)) and normalise "
              "with the training set's per-channel mean and std (v2.Normalize(mean, std)).",
              "Apply exactly the same normalisation to the validation data and at inference.",
              "Check that the normalisation is applied once (not twice, not forgotten on one path)."]
    return Finding("unnormalized_input", "warning", title, evidence, advice,
                   {"mean": mean, "std": std, "min": low, "max": high, "rms": rms,
                    "thresholds": [UNNORMALIZED_MIN_RMS, UNNORMALIZED_MAX_RMS]})


def detect_slow_data_loading(history: Mapping, run: Mapping) -> Finding | None:
    """The loop waits for data for more than :data:`SLOW_DATA_FRACTION` of its step time."""
    steps = _steps(history)
    data, total, epochs = steps.get("data_time") or [], steps.get("step_time") or [], steps.get("epoch") or []
    pairs = []
    for i, (d, t) in enumerate(zip(data, total)):
        d, t = _finite(d), _finite(t)
        first_of_epoch = i == 0 or (i < len(epochs) and epochs[i] != epochs[i - 1])
        if d is None or t is None or t <= 0 or first_of_epoch:
            continue
        pairs.append((min(d, t), t))
    if len(pairs) < SLOW_DATA_MIN_STEPS:
        return None
    waited, spent = sum(d for d, _ in pairs), sum(t for _, t in pairs)
    fraction = waited / spent if spent > 0 else 0.0
    if fraction <= SLOW_DATA_FRACTION:
        return None
    per_step = spent / len(pairs)
    evidence = (f"The training loop waited for data {_pct(fraction)} of the time: {1000 * waited / len(pairs):.1f} ms "
                f"of each {1000 * per_step:.1f} ms step on average, over {len(pairs)} steps. The model sits idle "
                "while the next batch is read.")
    workers = run.get("num_workers")
    cpus = run.get("cpu_count")
    advice = []
    if not workers:
        n = min(8, max(1, int(cpus) - 1)) if cpus else 4
        advice.append(f"Load in parallel: DataLoader(num_workers={n}, persistent_workers=True)"
                      + (" (--workers N)" if "num_workers" in run else "") + ".")
    else:
        advice.append(f"Use more loader workers (now {workers}) with persistent_workers=True.")
    advice += ["Do the expensive work once: decode and resize the images ahead of time and keep them as tensors "
               "(in memory or a memory-mapped file); keep only the random augmentation per item.",
               "Profile the Dataset's __getitem__ (time.perf_counter around it, or torch.profiler) for slow "
               "decoding, file access or Python loops.",
               "On a GPU, use pin_memory=True and non_blocking copies; move augmentation to the GPU."]
    return Finding("slow_data_loading", "warning", f"Slow data loading: {_pct(fraction)} of each step waits for data",
                   evidence, advice, {"data_fraction": fraction, "data_time_per_step": waited / len(pairs),
                                      "step_time": per_step, "steps": len(pairs), "threshold": SLOW_DATA_FRACTION})


# cause before symptom: the order findings of one severity are listed in
DETECTORS: dict[str, Callable[[Mapping, Mapping], Finding | None]] = {
    "diverging_loss": detect_diverging_loss,
    "nonfinite_gradients": detect_nonfinite_gradients,
    "softmax_before_cross_entropy": detect_softmax_before_cross_entropy,
    "unnormalized_input": detect_unnormalized_input,
    "dead_relu": detect_dead_relu,
    "vanishing_gradients": detect_vanishing_gradients,
    "exploding_gradients": detect_exploding_gradients,
    "lr_too_low": detect_lr_too_low,
    "overfitting": detect_overfitting,
    "underfitting": detect_underfitting,
    "slow_data_loading": detect_slow_data_loading,
}
assert set(DETECTORS) == set(KINDS)


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------

def _word(x) -> str:
    """How a non-finite loss is named: NaN, inf or -inf (None in JSON: NaN or inf)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "NaN/inf"
    return "NaN" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _median(values: Sequence) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _window(n: int) -> int:
    return max(1, min(n, max(LOSS_WINDOW_MIN, n // LOSS_WINDOW_DIVISOR)))


def _window_medians(values: Sequence[float]) -> list[float]:
    """Medians of consecutive windows (sliding by one) of :func:`_window` steps."""
    w = _window(len(values))
    return [statistics.median(values[i:i + w]) for i in range(0, len(values) - w + 1)]


def _steps(history: Mapping) -> Mapping:
    return history.get("steps") or {}


def _weight_layers(layers: Mapping) -> list[int]:
    """Indices of the weight matrices/kernels (2+ dimensions) among the layers; by name without shapes."""
    names = list(layers.get("names") or [])
    shapes = layers.get("shapes")
    if shapes and len(shapes) == len(names):
        return [i for i, s in enumerate(shapes) if s is not None and len(s) >= 2]
    return [i for i, n in enumerate(names) if n.endswith("weight")]


def _first_nonfinite_layers(history: Mapping, from_step: int) -> list[str]:
    """The layers whose norm is NaN/inf on the first sampled step from ``from_step`` on, among those that had a
    finite norm on an earlier sample (a parameter without a gradient is NaN throughout)."""
    layers = history.get("layers") or {}
    names = list(layers.get("names") or [])
    seen_finite: set[int] = set()
    for step, row in zip(layers.get("steps") or [], layers.get("grad_norm") or []):
        values = [_finite(v) for v in row]
        if step >= from_step:
            bad = [names[i] for i, v in enumerate(values) if i < len(names) and v is None
                   and (i in seen_finite or not seen_finite)]
            if bad:
                return bad
        seen_finite.update(i for i, v in enumerate(values) if v is not None)
    return []


def _in_epoch(epoch) -> str:
    return f" (epoch {epoch})" if epoch is not None else ""


def _names(names: Sequence[str], limit: int = 4) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _g(x) -> str:
    """A number in 3 significant digits."""
    if x is None:
        return "?"
    return f"{x:.3g}"


def _pct(x) -> str:
    return "?" if x is None else f"{100 * x:.1f}%"

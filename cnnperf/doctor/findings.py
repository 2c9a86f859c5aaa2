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
         "slow_data_loading", "no_signal")
SEVERITIES = ("info", "warning", "error")  # least to most severe

# --- per-layer statistics ------------------------------------------------------------------------------
# Per-layer judgements need a few samples: one sampled step can catch a transient.
MIN_SAMPLED_STEPS = 3

# Vanishing gradients: the hidden weight layers' gradient-to-weight ratio grows 100x or more from the first
# to the last along a least-squares line through the log ratios of all of them (so that a collapse spread over
# many layers is not diluted, as comparing the medians of the first and last thirds did: 46x for a 12-layer
# tanh stack whose first and last layers differ 1,000x), on at least half of the sampled steps. Measured over
# 3 epochs on 28x28 digits: healthy nets 0.11-3x (ConvNet 3.0, LeNet-5 0.59, AlexNet-small 1.4, VGG-11-BN 0.11,
# 10 ReLU convs with BatchNorm 1.4, with Kaiming init 1.9); 12 tanh convs 362x, 10 ReLU convs with default init
# 948x, 8 sigmoid convs 4.8e6x. The output layer is left out: its gradient comes straight from the loss and
# its weights are small, so its ratio is 10-50x the others' in healthy nets too.
VANISHING_GROWTH = 100.0
VANISHING_STEP_FRACTION = 0.5
# The forward side of the same collapse: how much each activation layer's output varies between the inputs of
# a batch shrinks 30x or more from the first activation layer to the last (a line through all of them), on at
# least half of the sampled steps; the output then hardly depends on the input. Measured over 3 epochs: healthy
# nets grow or keep it (median 1.6-7.6x: ResNet-18, VGG-11-BN, LeNet-5, ConvNet, AlexNet-small, whose first
# step shrank 300x before Adam recovered it); a 10-layer tanh MLP with default init shrinks it 180x (its
# gradient ratios grow only 5-8x: the layers' weights get small gradients alike), 12 tanh convs 1,070x, 10 ReLU
# convs with default init 5,400x, GELU 1.8e6x, sigmoid 1.6e7x.
SIGNAL_FADE = 30.0
# ... and from the start: the median over the first SIGNAL_FADE_START_STEPS sampled steps fades too. A fade
# that sets in later is the output collapsing to a constant (labels with nothing to learn, dead units), not
# the depth or the initialisation: VGG-11-BN on shuffled labels went 3.2x, 18x, then 15-82x; a 12-layer tanh
# net and AlexNet-small with default init under SGD faded 998x and 249x from the first step.
SIGNAL_FADE_START_STEPS = 2
# An initialisation is "too small" below these gains (weights' rms x sqrt(fan_in)): Kaiming's 1.41 for ReLU
# nets, Xavier/LeCun's 1 for tanh; PyTorch's default init gives 0.58, which shrinks the signal 2.4x per ReLU
# layer (1.7x per tanh layer) without normalisation.
INIT_GAIN_RELU = 1.0
INIT_GAIN_TANH = 0.8
VANISHING_MIN_WEIGHT_LAYERS = 3  # with fewer, there is no "early" and "late" to compare

# Exploding gradients: a spike is a step whose total gradient norm is more than 10x the median of the (up to)
# 50 steps before it and 10x the median of the (up to) 50 after it. Healthy runs stay within ~4x of their
# running median; an lr that blows up gives 1e2-1e10x. Both sides, because the norm of a healthy net without
# normalisation can rise 20-50x in its first dozen steps and stay there (measured on AlexNet-small with Adam at
# 1e-3): that is a new level, not a spike. A spike near the end, with fewer than 3 steps after it, is judged
# on the steps before it.
EXPLODING_SPIKE = 10.0
# ... and larger than the median norm of the run's first 50 steps: late in a run that has fitted its training
# set the norms are tiny (LeNet-5 on 200 images: a running median of 0.022 at step 160), and a batch that brings
# 0.36, 16x that, is a spike of the small, not an explosion.
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
# Units that died during training under steps too large: on one of the first 3 sampled steps, the median weight
# layer moved by 15 % of its norm or more. AlexNet-small at Adam lr 1e-2 moved 46 % on its first step (Adam's
# first step is about lr x sign(grad), the largest of a run), and its ReLUs were dead 10 steps later, on its real
# labels and on shuffled ones alike; at lr 1e-3, 4.6 % on the first step, and on shuffled labels its units still
# died, over hundreds of steps, because a constant output is all that such labels leave to learn. Healthy
# training moves the weights by about 0.1-3 % a step. Then the step size is the cause, whatever the labels.
DEAD_RELU_BIG_STEP = 0.15

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
# training loss kept falling (OVERFIT_MIN_TRAIN_DROP); or the training accuracy ends 10 points above the
# validation accuracy, both above the noise of chance (see chance_level): a model at chance on its own training
# images has fitted nothing to overfit (the ConvNet on shuffled labels ended at 13.5 % and 2.5 %), and one at
# chance on the validation images in every epoch is no_signal's case, or too early to tell (VGG-11-BN after one
# epoch of 10 steps: 58 % and 10 %, its BatchNorm's running statistics 10 updates old). A validation accuracy
# that collapses to chance after rising is still a gap. Healthy runs end within ~2 points, with the best
# validation loss in the last epochs.
OVERFIT_VAL_RISE = 0.10
OVERFIT_MIN_ABS_RISE = 0.01
OVERFIT_MIN_EPOCHS_AFTER_BEST = 2
OVERFIT_ACC_GAP = 0.10
# ... and "kept falling" means by a quarter or more: a model that overfits goes on fitting its training set. A
# healthy VGG-11-BN on digits (Adam, 5 epochs, 97.8 % / 97.5 %) had its validation loss jump 0.084 -> 0.214 ->
# 0.102 in its last epochs while the training loss went 0.083 -> 0.047 -> 0.081 (-2 %): noise, not overfitting.
OVERFIT_MIN_TRAIN_DROP = 0.25
# Early stopping: stop when the monitored metric (validation accuracy for a classifier, else the validation
# loss) has not improved for this many epochs (Keras/Lightning's usual patience for short runs). The validation
# loss is not the default: it rises from overconfidence on the images the model gets wrong while the accuracy
# still improves (VGG-like on 100 digits: loss lowest at epoch 1 of 60, at chance; accuracy best at epoch 60).
EARLY_STOP_PATIENCE = 3
# No signal: the training accuracy rises above chance while the validation accuracy never does by more than 3
# standard errors of a chance-level classifier on the validation set (sqrt(p (1 - p) / n): 1.6 points for 10
# classes on 359 images) and at least 2 points. Shuffled labels give chance +-1 point; the weakest real learner
# among the doctor's tests (lr 20x too low, 6 epochs) reached 26 %, 16 points above chance.
NO_SIGNAL_SIGMAS = 3.0
NO_SIGNAL_MIN_MARGIN = 0.02
NO_SIGNAL_MIN_EPOCHS = 2
# ... or nothing is learned at all: the training accuracy at chance in every epoch, the validation accuracy as
# above (a single epoch above the ceiling is noise: VGG-11-BN on shuffled labels reached 16.2 % once in 10
# epochs, median 11.7 % over the last half, at ln(10) all along), and the training loss never below
# (1 - NO_SIGNAL_LOSS_MARGIN) x ln(classes), the loss of the best constant guess on balanced classes. AlexNet-small
# on shuffled labels stayed within 0.2 % of ln(10) for 10 epochs while its ReLUs died one after the other (a
# constant output is the best a model can do with labels that do not match); on the real labels the same model
# and lr are healthy. Where a cause from the first steps explains it (vanishing gradients without units dying, a
# softmax before the loss, an lr far too low, a diverging loss), that cause is the finding instead. A training
# accuracy still near chance does not mean nothing was learned when the training loss ends 0.5 % or more below a
# constant guess's while the validation loss comes less than a quarter of that distance below it (or stays above
# it): what is learned does not carry over. The ConvNet under SGD on shuffled labels ended at 2.28 and 2.37 (ln 10
# = 2.30), its training accuracy at 13.5 %, its validation accuracy at 2.5 %; LeNet-5 at 2.286 and 2.300. A real
# learner that slow carries it over: the ConvNet at SGD lr 0.001 ended at 2.286 and 2.284 (0.7 % and 0.8 % below).
# An epoch's mean training loss near ln 10 varies by about 0.1 % (1,438 images).
NO_SIGNAL_LOSS_MARGIN = 0.02
NO_SIGNAL_TRAIN_FIT = 0.005
NO_SIGNAL_VAL_SHARE = 0.25
# Underfitting: the accuracy ends below chance + half the way from chance to 100 % (55 % for 10 classes) on
# both splits, or the training loss fell by less than 10 % from the first epoch to the last while the
# training accuracy stays below 90 %.
UNDERFIT_ACC_FRACTION = 0.5
UNDERFIT_MIN_DROP = 0.10
UNDERFIT_GOOD_ACC = 0.90
STILL_LEARNING_DROP = 0.05  # the last epoch lowered the training loss by 5 %+: more epochs would help
# The lr is "far" from the LR range test's suggestion at 3x either way: the steepest-descent point moves about
# 2x between repeated range tests on the same model (seeds 0-4 on the ConvNet), so less is within its noise.
UNDERFIT_LR_OFF = 3.0

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
# Slow data loading: the training loop waits for data for 15 % of the step time or more (a note), 30 % or more (a
# warning); the first step of each epoch is left out (it starts the loader's workers). Healthy in-memory loaders
# take 1-5 % (the doctor's models on digits), so 15 % is 3x the worst healthy share, and a loader that sleeps
# 50 ms per batch measured 16.5 % and 31 % on two models: a third of the step is worth a warning.
SLOW_DATA_FRACTION = 0.15
SLOW_DATA_WARNING = 0.30
# ... and only from 2 ms of waiting per step: a loader's own per-batch cost (collating 64 in-memory digits) is
# 0.1-0.3 ms here, 17 % of an 8-layer MLP's 1.1 ms step, which no loader setting would remove.
SLOW_DATA_MIN_WAIT_S = 0.002
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
    severity by cause before symptom. A symptom whose cause is already named is left out: no lr_too_low,
    no_signal or underfitting next to a diverging or NaN loss; no lr_too_low next to vanishing gradients (the
    steps are small because the gradients are); no no_signal or underfitting next to lr_too_low, a softmax
    before the loss, a dead layer (error), units killed by steps too large (see DEAD_RELU_BIG_STEP) or
    vanishing gradients, except the no_signal of a model that learned nothing while its units died under
    moderate steps (see NO_SIGNAL_LOSS_MARGIN); no underfitting or overfitting next to no_signal (the accuracy
    at chance is the problem, not the fit), nor a dead_relu warning of units that died under moderate steps
    (with nothing to learn, a constant output kills them)."""
    run = dict(run or {})
    if lr_finder:
        run.setdefault("lr_finder", lr_finder)
    found = {}
    for kind, detector in DETECTORS.items():
        finding = detector(history, run)
        if finding is not None:
            found[kind] = finding
    if "diverging_loss" in found or "nonfinite_gradients" in found:
        for kind in ("lr_too_low", "no_signal", "underfitting"):
            found.pop(kind, None)
    if "vanishing_gradients" in found:  # tiny updates from tiny gradients: a higher lr does not fix the collapse
        found.pop("lr_too_low", None)
    causes = ("lr_too_low", "softmax_before_cross_entropy", "vanishing_gradients")
    dead = found.get("dead_relu")
    # Nothing learned while ReLUs died one after the other under moderate steps: dead_relu alone would blame the
    # step size, where labels that do not match their inputs do the same; the no_signal finding says so (and
    # replaces a dead_relu warning, below). Without units dying on the way, underfitting (whose advice names the
    # data too) or the cause from the first steps speaks; after steps too large, dead_relu's lower lr does.
    nothing = "no_signal" in found and found["no_signal"].data.get("learned_nothing")
    if nothing and (dead is None or dead.data.get("from_start") or dead.data.get("big_steps")
                    or any(k in found for k in causes[:2])):
        found.pop("no_signal")
    if any(k in found for k in causes) or (dead and (dead.severity == "error" or dead.data.get("big_steps"))):
        if not nothing:
            found.pop("no_signal", None)
        found.pop("underfitting", None)
    if "no_signal" in found:
        found.pop("underfitting", None)
        found.pop("overfitting", None)
        # Units that died under measured moderate steps while the training accuracy stayed at chance: a constant
        # output is all such labels leave (see DEAD_RELU_BIG_STEP), and dead_relu's "lower the lr" would be a
        # false lead. A dead layer (error), an unmeasured step size and a model that fitted its training
        # labels keep it.
        signal = found["no_signal"].data
        if dead is not None and dead.severity == "warning" and not dead.data.get("big_steps") \
                and not dead.data.get("from_start") and dead.data.get("early_update_to_weight") is not None \
                and signal.get("train_acc", 1.0) <= signal.get("ceiling", 0.0):
            found.pop("dead_relu", None)
    rank = {s: i for i, s in enumerate(reversed(SEVERITIES))}
    order = {k: i for i, k in enumerate(DETECTORS)}
    return sorted(found.values(), key=lambda f: (rank[f.severity], order[f.kind]))


MONITORS = ("val_acc", "val_loss")


def monitored(epochs: Sequence[Mapping], monitor: str | None = None) -> str | None:
    """The metric that picks the best epoch: ``monitor`` if given, else the validation accuracy where the epochs
    have one (what a classifier is judged by), else the validation loss; None without either."""
    if monitor is not None and monitor not in MONITORS:
        raise ValueError(f"monitor must be one of {', '.join(MONITORS)} or None; got {monitor!r}")
    for key in ((monitor,) if monitor else MONITORS):
        if any(_finite(r.get(key)) is not None for r in epochs):
            return key
    return None


def _better(key: str, a: float, b: float) -> bool:
    return a > b if key == "val_acc" else a < b


def chance_level(run: Mapping) -> tuple[float, float] | None:
    """(chance accuracy, the highest validation accuracy still within noise of it) for ``run``'s class count:
    chance + :data:`NO_SIGNAL_SIGMAS` standard errors of a chance-level classifier on ``run["val_size"]``
    images (at least :data:`NO_SIGNAL_MIN_MARGIN` above chance); None without a class count."""
    classes = _finite(run.get("num_classes"))
    if not classes or classes < 2:
        return None
    chance = 1 / classes
    n = _finite(run.get("val_size"))
    noise = NO_SIGNAL_SIGMAS * math.sqrt(chance * (1 - chance) / n) if n and n > 0 else 0.0
    return chance, chance + max(noise, NO_SIGNAL_MIN_MARGIN)


def early_stopping(epochs: Sequence[Mapping], patience: int = EARLY_STOP_PATIENCE, *, monitor: str | None = None,
                   run: Mapping | None = None) -> tuple[int | None, int | None]:
    """(best epoch, early-stopping epoch) by the :func:`monitored` metric (validation accuracy by default).

    The best epoch has the best value of all the epochs run (the earliest of equals). The early-stopping epoch
    is where training with ``patience`` would have stopped: the first epoch that ends ``patience`` epochs without
    a new best (it would have kept the weights of :func:`best_before` it); None if that never happened. A best
    so far that is a chance-level model (validation accuracy within noise of chance, see :func:`chance_level`,
    when ``run`` gives the class count) starts no patience: stopping there would keep a model that has learned
    nothing. Both None without the metric.
    """
    key = monitored(epochs, monitor)
    if key is None:
        return None, None
    rows = [r for r in epochs if _finite(r.get(key)) is not None]
    best_row = rows[0]
    for r in rows[1:]:
        if _better(key, _finite(r[key]), _finite(best_row[key])):
            best_row = r
    level = chance_level(run or {})
    best, wait, seen, learned = None, 0, False, False
    for row in epochs:
        value = _finite(row.get(key))
        acc = _finite(row.get("val_acc"))
        if level is not None and acc is not None and acc > level[1]:
            learned = True
        if value is not None and (best is None or _better(key, value, best)):
            best, wait, seen = value, 0, True
        elif seen and (level is None or learned):
            wait += 1
            if wait >= patience:
                return int(best_row["epoch"]), int(row["epoch"])
    return int(best_row["epoch"]), None


def best_before(epochs: Sequence[Mapping], epoch: int, monitor: str | None = None) -> int | None:
    """The best epoch by the :func:`monitored` metric up to ``epoch`` (what early stopping there would keep)."""
    rows = [r for r in epochs if int(r["epoch"]) <= epoch]
    return early_stopping(rows, patience=len(rows) + 1, monitor=monitored(epochs, monitor))[0] if rows else None


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
              _clip_advice(run),
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
    early = statistics.median(g for _, g in finite[:EXPLODING_WINDOW]) if finite else 0.0
    spikes = []
    for j, (i, g) in enumerate(finite):
        before = [v for _, v in finite[max(0, j - EXPLODING_WINDOW):j]]
        after = [v for _, v in finite[j + 1:j + 1 + EXPLODING_WINDOW]]
        if len(before) < EXPLODING_MIN_HISTORY:
            continue
        median = statistics.median(before)
        if median <= 0 or g <= EXPLODING_SPIKE * median or g <= early:
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
        advice.append(_clip_advice(run, "so that a spike moves the weights by a bounded step"))
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


def _depth_growth(values: Sequence[float | None]) -> float | None:
    """How many times larger the last of ``values`` (positive, in depth order) is than the first, by a
    least-squares line through their logarithms: a collapse spread over many layers counts in full, one odd
    layer barely. None with fewer than 2 usable values."""
    points = [(i, math.log10(v)) for i, v in enumerate(values) if v is not None and v > 0]
    if len(points) < 2:
        return None
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return 10.0 ** (slope * (points[-1][0] - points[0][0]))


def init_gains(layers: Mapping) -> dict[str, float]:
    """Each weight layer's initial scale as a gain: its first sampled weight norm (taken before the first
    update) as the weights' root mean square, times sqrt(fan_in). PyTorch's default init gives 0.58 (1/sqrt(3)),
    Kaiming's for ReLU 1.41, Xavier's about 1."""
    names, shapes = list(layers.get("names") or []), layers.get("shapes") or []
    rows = layers.get("weight_norm") or []
    steps = layers.get("steps") or []
    if not rows or len(shapes) != len(names) or (steps and steps[0] != 1):
        return {}
    gains = {}
    for i in _weight_layers(layers):
        norm, shape = _finite(rows[0][i]) if i < len(rows[0]) else None, shapes[i]
        numel = math.prod(shape) if shape else 0
        if norm is None or not numel or not shape[0]:
            continue
        gains[names[i]] = norm / math.sqrt(numel) * math.sqrt(numel / shape[0])
    return gains


def detect_vanishing_gradients(history: Mapping, run: Mapping) -> Finding | None:
    """A collapse along depth, on at least :data:`VANISHING_STEP_FRACTION` of the sampled steps: the
    gradient-to-weight ratio growing :data:`VANISHING_GROWTH` x or more from the first hidden weight layer to
    the last, or the activations' variation between inputs shrinking :data:`SIGNAL_FADE` x or more from the
    first activation layer to the last, from the first sampled steps on (each a line through all the layers, per
    sampled step). Names the causes it can see: saturating activations, no normalisation, an initialisation too
    small for the activations."""
    layers = history.get("layers") or {}
    names = list(layers.get("names") or [])
    rows = layers.get("grad_to_weight") or []
    weight_idx = _weight_layers(layers)
    hidden = weight_idx[:-1]  # the output layer's ratio is large in healthy nets too
    growths = []
    if len(weight_idx) >= VANISHING_MIN_WEIGHT_LAYERS:
        growths = [g for g in (_depth_growth([_finite(row[i]) if i < len(row) else None for i in hidden])
                               for row in rows) if g is not None]
    steep = [g for g in growths if g >= VANISHING_GROWTH]
    gradients = len(growths) >= MIN_SAMPLED_STEPS and len(steep) >= VANISHING_STEP_FRACTION * len(growths)
    acts = history.get("activations") or {}
    act_names = list(acts.get("names") or [])
    fades = [g for g in (_depth_growth([_finite(v) for v in row]) for row in acts.get("spread") or [])
             if g is not None] if len(act_names) >= VANISHING_MIN_WEIGHT_LAYERS else []
    faded = [g for g in fades if g <= 1 / SIGNAL_FADE]
    at_start = statistics.median(fades[:SIGNAL_FADE_START_STEPS]) if fades else None
    signal = (len(fades) >= MIN_SAMPLED_STEPS and len(faded) >= VANISHING_STEP_FRACTION * len(fades)
              and at_start <= 1 / SIGNAL_FADE)
    if not gradients and not signal:
        return None
    sentences = []
    growth = statistics.median(growths) if growths else None
    per_layer = {names[i]: _median([_finite(row[i]) for row in rows if i < len(row)]) for i in hidden}
    if gradients:
        first, last = per_layer[names[hidden[0]]], per_layer[names[hidden[-1]]]
        sentences.append(
            f"Along the {len(hidden)} hidden weight layers the gradient-to-weight ratio grows {_g(growth)}x from the "
            f"first to the last (median over {len(growths)} sampled steps, a line through every layer; {len(steep)} "
            f"of them {_g(VANISHING_GROWTH)}x or more): {names[hidden[0]]} {_g(first)}, {names[hidden[-1]]} "
            f"{_g(last)}. The first layers barely learn.")
    fade = statistics.median(fades) if fades else None
    spreads = [_median([_finite(row[i]) for row in acts.get("spread") or [] if i < len(row)])
               for i in range(len(act_names))]
    if signal:
        sentences.append(
            f"How much the activations vary between the images of a batch shrinks {_g(1 / fade)}x from the first "
            f"activation layer to the last ({act_names[0]}: {_g(spreads[0])}, {act_names[-1]}: {_g(spreads[-1])}; "
            f"median over {len(fades)} sampled steps, {len(faded)} of them {_g(SIGNAL_FADE)}x or more): the signal "
            "fades before it reaches the output, which then hardly depends on the input, and every layer's gradient "
            "is small.")
    evidence = " ".join(sentences)
    causes, advice = [], []
    saturating = run.get("saturating_activations")
    types = run.get("layer_types") if isinstance(run.get("layer_types"), Mapping) else {}
    relu_like = any(k in types for k in ("ReLU", "FusedConv2dBiasReLU", "LeakyReLU", "GELU"))
    gains = init_gains(layers)
    gain = _median([gains.get(names[i]) for i in hidden])
    small_init = gain is not None and gain < (INIT_GAIN_RELU if relu_like and not saturating else INIT_GAIN_TANH)
    if saturating:
        causes.append(f"{saturating} saturating activation{'s' if saturating > 1 else ''} (sigmoid/tanh), which "
                      "pass back at most 1/4 (sigmoid) or 1 (tanh) of the gradient per layer and less when they "
                      "saturate")
        advice.append(f"Replace the sigmoid/tanh activations ({saturating} in the model) by ReLU or GELU.")
    if small_init:
        want, init = ((math.sqrt(2), "torch.nn.init.kaiming_normal_(w, nonlinearity='relu')")
                      if relu_like and not saturating else (1.0, "torch.nn.init.xavier_normal_(w)"))
        causes.append(f"an initialisation too small for the activations: the weights start at a median gain of "
                      f"{gain:.2f}/sqrt(fan_in) (PyTorch's default init: 0.58) where {want:.2f} keeps the signal's "
                      f"scale, so each layer shrinks it about {want / gain:.1f}x "
                      f"(~{_g((want / gain) ** len(hidden))}x over {len(hidden)} layers)")
        advice.append(f"Initialise the weights for the activation: {init} for each convolution/linear weight, "
                      "zero biases.")
    if not run.get("normalization"):
        causes.append("no normalisation layer to restore the scale between layers")
        advice.append("Add BatchNorm after each convolution (or LayerNorm/GroupNorm), before the activation.")
    if causes:
        evidence += " Causes seen in the model: " + "; ".join(causes) + "."
    advice += ["Add residual (skip) connections, as ResNet does, so the gradient has a short path to the first "
               "layers.",
               "Use fewer layers, or Adam/AdamW, which rescales each parameter's step (a workaround, not a cure)."]
    title = (f"Vanishing gradients: the first layers get {_g(growth)}x smaller gradients (for their weights) than "
             "the last" if gradients else
             f"Vanishing signal: the activations vary {_g(1 / fade)}x less between inputs at the last layer than at "
             "the first")
    return Finding("vanishing_gradients", "warning", title, evidence, advice,
                   {"median_growth": growth, "steps_steep": len(steep), "steps": len(growths),
                    "threshold": VANISHING_GROWTH, "grad_to_weight": per_layer, "signal_fade": fade,
                    "signal_fade_threshold": SIGNAL_FADE, "signal_fade_at_start": at_start,
                    "activation_spread": dict(zip(act_names, spreads)),
                    "init_gain": gain, "small_init": small_init, "causes": causes})


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
    early = _early_update(history)
    big_steps = not from_start and early is not None and early >= DEAD_RELU_BIG_STEP
    if from_start:
        evidence += "They were dead from the first step: the initialisation (or a bias) keeps their input negative."
    elif big_steps:
        evidence += (f"They died during training after steps too large for them: an early step moved the weights "
                     f"by {_pct(early)} of their norm (median layer; healthy training moves them about 0.1-3 % a "
                     "step).")
    else:
        evidence += "They died during training: steps too large for them do this" + (
            f" (the largest early step moved the weights by {_pct(early)} of their norm, median layer; healthy "
            "training moves them about 0.1-3 % a step), and so does a loss that leaves nothing to learn."
            if early is not None else ".")
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
                    "from_start": from_start, "early_update_to_weight": early, "big_steps": big_steps})


def _early_update(history: Mapping) -> float | None:
    """The largest of the median weight layer's update-to-weight ratios on the first MIN_SAMPLED_STEPS sampled
    steps that have one (None without any)."""
    medians = _step_medians(history.get("layers") or {}, "update_to_weight")[:MIN_SAMPLED_STEPS]
    return max(medians) if medians else None


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
    suggested = _suggested_lr(run)
    if suggested and lr and suggested < lr:
        lower = (f"Lower the learning rate (now {_g(lr)}) to the LR range test's suggestion, {_g(suggested)}.")
    elif suggested:
        lower = (f"Lower the learning rate (now {_g(lr)}): try {_g(lr / 10)}; the LR range test suggested "
                 f"{_g(suggested)}, but its short run did not see this blow-up." if lr else
                 "Lower the learning rate 10x.")
    else:
        lower = (f"Lower the learning rate (now {_g(lr)}): try {_g(lr / 10)}, or run the LR range test "
                 f"({_lr_test(run)})." if lr else f"Lower the learning rate 10x, or run the LR range test "
                 f"({_lr_test(run)}).")
    advice = [lower, _clip_advice(run, "and warm the learning rate up over the first steps"),
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
    updates = _step_medians(layers, "update_to_weight")
    grads = _step_medians(layers, "grad_to_weight")
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
    finder = run.get("lr_finder") if isinstance(run.get("lr_finder"), Mapping) else {}
    suggested = _suggested_lr(run)
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
        advice.append(f"Run the LR range test ({_lr_test(run)}) to see where the loss starts to fall.")
    return Finding("lr_too_low", "warning", "The learning rate is too low: the loss is flat and the weights "
                   "barely move", evidence, advice,
                   {"update_to_weight": update, "grad_to_weight": grad, "start_loss": first, "end_loss": last,
                    "drop": drop, "threshold": LR_LOW_MAX_UPDATE, "suggested_lr": suggested})


# ---------------------------------------------------------------------------------------------------------
# fitting
# ---------------------------------------------------------------------------------------------------------

def detect_overfitting(history: Mapping, run: Mapping) -> Finding | None:
    """Validation loss rising while the training loss falls, or a wide train/validation accuracy gap; the stop
    point it advises is the best epoch by the :func:`monitored` metric (validation accuracy by default)."""
    epochs = [e for e in history.get("epochs") or [] if isinstance(e, Mapping)]
    with_val = [e for e in epochs if _finite(e.get("val_loss")) is not None]
    if not with_val:
        return None
    lowest = min(with_val, key=lambda e: _finite(e["val_loss"]))  # the earliest of equals
    last = with_val[-1]
    best_val, last_val = _finite(lowest["val_loss"]), _finite(last["val_loss"])
    after = sum(1 for e in with_val if e["epoch"] > lowest["epoch"])
    train_best, train_last = _finite(lowest.get("train_loss")), _finite(last.get("train_loss"))
    rising = (after >= OVERFIT_MIN_EPOCHS_AFTER_BEST and last_val >= best_val * (1 + OVERFIT_VAL_RISE)
              and last_val - best_val >= OVERFIT_MIN_ABS_RISE
              and (train_best is None or train_last is None
                   or train_last <= (1 - OVERFIT_MIN_TRAIN_DROP) * train_best))
    train_acc, val_acc = _finite(last.get("train_acc")), _finite(last.get("val_acc"))
    gap = train_acc - val_acc if train_acc is not None and val_acc is not None else None
    level = chance_level(run)
    best_acc = max((a for a in (_finite(e.get("val_acc")) for e in epochs) if a is not None), default=None)
    wide = (gap is not None and gap >= OVERFIT_ACC_GAP
            and (level is None or min(train_acc, best_acc) > level[1]))
    if not rising and not wide:
        return None
    key = monitored(epochs, run.get("monitor"))
    best_epoch, stop_epoch = early_stopping(epochs, monitor=key, run=run)
    best = next(e for e in epochs if e["epoch"] == best_epoch)
    metric = "validation accuracy" if key == "val_acc" else "validation loss"
    sentences = []
    if rising:
        sentences.append(
            f"The validation loss was lowest at epoch {lowest['epoch']} ({_g(best_val)}) and rose to {_g(last_val)} "
            f"by epoch {last['epoch']} (+{_pct(last_val / best_val - 1)}), while the training loss kept falling"
            + (f" ({_g(train_best)} to {_g(train_last)})." if train_best is not None and train_last is not None
               else "."))
        acc_then, acc_best = _finite(lowest.get("val_acc")), _finite(best.get("val_acc"))
        if key == "val_acc" and best_epoch > lowest["epoch"] and acc_then is not None and acc_best is not None:
            sentences.append(f"But the validation accuracy kept improving, from {_pct(acc_then)} at epoch "
                             f"{lowest['epoch']} to {_pct(acc_best)} at epoch {best_epoch}: the model grew "
                             "overconfident on the images it gets wrong more than it got worse at classifying.")
    if gap is not None:
        sentences.append(f"At epoch {last['epoch']} the training accuracy is {_pct(train_acc)} and the validation "
                         f"accuracy {_pct(val_acc)}: a {100 * gap:.1f}-point gap.")
    if best_epoch != last["epoch"]:
        sentences.append(f"The best epoch by {metric} is {best_epoch} ({_metrics(best)}); the last, "
                         f"{last['epoch']}, has {_changes(best, last)}.")
    if stop_epoch is not None:
        kept = best_before(epochs, stop_epoch, key)
        sentences.append(f"Early stopping on the {metric} with patience {EARLY_STOP_PATIENCE} would have stopped at "
                         f"epoch {stop_epoch} and kept the weights of epoch {kept}"
                         + (f" ({_metrics(next(e for e in epochs if e['epoch'] == kept))})." if kept else "."))
    advice = []
    if best_epoch != last["epoch"]:
        advice.append(f"Keep the weights of the best epoch by {metric}, {best_epoch}: train {best_epoch} epochs"
                      f"{_epochs(run, best_epoch)}, or stop early on the {metric} (patience "
                      f"{EARLY_STOP_PATIENCE}) and keep the best checkpoint.")
    if run.get("augment") is False:
        advice.append(f"Turn on data augmentation ({_augment(run)}): random crops, flips or small affine transforms "
                      "make every epoch see new images.")
    wd = _finite(run.get("weight_decay"))
    if wd == 0:
        advice.append(f"Add weight decay: {_weight_decay(run)}.")
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
    title = (f"Overfitting: validation loss rose {_pct(last_val / best_val - 1)} after epoch {lowest['epoch']}"
             if rising else f"Overfitting: {100 * gap:.1f}-point gap between training and validation accuracy")
    return Finding("overfitting", "warning", title, " ".join(sentences), advice,
                   {"best_epoch": best_epoch, "monitor": key, "early_stop_epoch": stop_epoch,
                    "val_loss_best_epoch": lowest["epoch"], "best_val_loss": best_val, "last_val_loss": last_val,
                    "val_loss_rising": rising, "train_acc": train_acc, "val_acc": val_acc, "acc_gap": gap,
                    "patience": EARLY_STOP_PATIENCE})


def _metrics(row: Mapping) -> str:
    """An epoch's validation accuracy and loss, in words."""
    parts = [f"validation accuracy {_pct(_finite(row.get('val_acc')))}" if _finite(row.get("val_acc")) is not None
             else None, f"validation loss {_g(_finite(row.get('val_loss')))}"
             if _finite(row.get("val_loss")) is not None else None]
    return ", ".join(p for p in parts if p)


def _changes(base: Mapping, row: Mapping) -> str:
    """How ``row``'s validation accuracy and loss differ from ``base``'s, in words."""
    parts = []
    a0, a1 = _finite(base.get("val_acc")), _finite(row.get("val_acc"))
    if a0 is not None and a1 is not None:
        parts.append(f"validation accuracy {_pct(a1)} ({100 * (a1 - a0):+.1f} points)")
    l0, l1 = _finite(base.get("val_loss")), _finite(row.get("val_loss"))
    if l0 is not None and l1 is not None and l0 > 0:
        parts.append(f"validation loss {_g(l1)} ({100 * (l1 / l0 - 1):+.0f} %)")
    return " and ".join(parts) or "no validation metrics"


def detect_no_signal(history: Mapping, run: Mapping) -> Finding | None:
    """The model fits its training labels (its training accuracy above chance's noise, or its training loss
    below a constant guess's where the validation loss is not: see NO_SIGNAL_TRAIN_FIT) while the validation
    accuracy stays at chance (within noise, see :func:`chance_level`: its median over the later half of the
    epochs and its last value): what it learns does not carry over, the mark of labels that do not match their
    inputs. (Both splits at chance is :func:`detect_underfitting`'s: a model that learns nothing yet.)"""
    epochs = [e for e in history.get("epochs") or [] if isinstance(e, Mapping)]
    accs = [(e, _finite(e.get("val_acc"))) for e in epochs]
    accs = [(e, a) for e, a in accs if a is not None]
    level = chance_level(run)
    train = [a for a in (_finite(e.get("train_acc")) for e in epochs) if a is not None]
    if level is None or len(accs) < NO_SIGNAL_MIN_EPOCHS or not train:
        return None
    chance, ceiling = level
    late = [a for _, a in accs[len(accs) // 2:]]
    typical, last = statistics.median(late), late[-1]
    apart = _splits_apart(epochs[-1], chance)
    # The last epoch above the ceiling means "starting to learn", unless the validation loss says otherwise:
    # the argmax of near-uniform outputs swings (LeNet-5 on shuffled labels: 2.5 % to 18.4 % from epoch to epoch
    # at a validation loss of 2.30, ln 10); then up to twice the noise above chance.
    if typical > ceiling or last > (ceiling if apart is None else 2 * ceiling - chance):
        return None
    if max(train) <= ceiling and apart is None:
        return _learned_nothing(epochs, accs, train, chance, ceiling, typical)
    best_row, best = max(accs, key=lambda p: p[1])
    n = _finite(run.get("val_size"))
    evidence = (f"Over the last {len(late)} of {len(epochs)} epochs the validation accuracy was {_pct(typical)} "
                f"(median; {_pct(last)} at the end, at best {_pct(best)} in epoch {best_row['epoch']}), "
                + ("within noise of" if typical >= 2 * chance - ceiling else "below")
                + f" chance ({_pct(chance)} for {int(round(1 / chance))} classes; up to {_pct(ceiling)} is noise"
                + (f" on {int(n):,} validation images)" if n else ")"))
    if max(train) > ceiling:
        evidence += (f", while the training accuracy reached {_pct(max(train))}: the model fits the training labels "
                     "but learns nothing that carries over, the mark of labels that do not match their inputs.")
    else:
        train_loss, val_loss = apart
        guess = math.log(1 / chance)
        evidence += (f", while the training loss fell to {_g(train_loss)}, {_pct(1 - train_loss / guess)} below a "
                     f"constant guess's (ln {int(round(1 / chance))} = {_g(guess)}), and the validation loss ended at "
                     f"{_g(val_loss)}, " + (f"{_pct(val_loss / guess - 1)} above it" if val_loss >= guess else
                                            f"only {_pct(1 - val_loss / guess)} below it")
                     + ": what the model learns from the training labels does not carry over to the validation "
                     "images, the mark of labels that do not match their inputs.")
    advice = ["Check that every input keeps its label: look at a few (image, label) pairs from the training and "
              "from the validation loader (inputs and labels shuffled separately, a class mapping that differs "
              "between the splits, or labels off by one all look like this).",
              "Check that the validation data goes through the same preprocessing as the training data "
              "(normalisation, channel order, resizing).",
              "Train on one small batch until its accuracy nears 100 %, then check that a held-out batch of the "
              "same data rises above chance too."]
    return Finding("no_signal", "error", f"No signal: validation accuracy {_pct(typical)}, no better than chance "
                   f"({_pct(chance)})",
                   evidence, advice, {"val_acc_late_median": typical, "val_acc_last": last, "best_val_acc": best,
                                      "best_epoch": best_row["epoch"], "chance": chance, "ceiling": ceiling,
                                      "train_acc": max(train), "losses_apart": apart})


def _splits_apart(last: Mapping, chance: float) -> tuple[float, float] | None:
    """(training loss, validation loss) of the ``last`` epoch when the training loss ended NO_SIGNAL_TRAIN_FIT
    or more below a constant guess's (ln of the class count) while the validation loss came less than
    NO_SIGNAL_VAL_SHARE of that distance below it (or stayed above it); else None."""
    train, val = _finite(last.get("train_loss")), _finite(last.get("val_loss"))
    guess = math.log(1 / chance)
    if train is None or val is None or train > (1 - NO_SIGNAL_TRAIN_FIT) * guess:
        return None
    return (train, val) if guess - val < NO_SIGNAL_VAL_SHARE * (guess - train) else None


def _learned_nothing(epochs, accs, train, chance: float, ceiling: float, typical: float) -> Finding | None:
    """The training accuracy at chance and the training loss at a constant guess's in every epoch (see
    NO_SIGNAL_LOSS_MARGIN), the validation accuracy at chance (``typical``: its median over the later half):
    nothing reached the model that it could learn, or it could not learn at all."""
    losses = [_finite(e.get("train_loss")) for e in epochs]
    guess = math.log(1 / chance)
    if any(v is None for v in losses) or min(losses) < (1 - NO_SIGNAL_LOSS_MARGIN) * guess:
        return None
    evidence = (f"In all {len(epochs)} epochs the training accuracy stayed at {_pct(min(train))}-{_pct(max(train))} "
                f"and the validation accuracy at {_pct(min(a for _, a in accs))}-{_pct(max(a for _, a in accs))} "
                f"({_pct(typical)} median over the last {len(accs) - len(accs) // 2}), within noise of chance "
                f"({_pct(chance)}; up to {_pct(ceiling)}), and the training loss at "
                f"{_g(min(losses))}-{_g(max(losses))}, the loss of a constant guess (ln {int(round(1 / chance))} = "
                f"{_g(guess)}): the model learned nothing, not even the training images. Labels that do not match "
                "their inputs give exactly this (the best a model can do is a constant output, and its units die "
                "on the way); so does a model that cannot learn (see the other findings).")
    advice = ["Check that every input keeps its label: look at a few (image, label) pairs from the training "
              "loader (inputs and labels shuffled separately, or a label column read from the wrong place, look "
              "like this).",
              "Train on one small batch (e.g. 32 images) until its accuracy nears 100 %: if it cannot, the model or "
              "the optimisation is the problem (the other findings say where); if it can, the data is."]
    return Finding("no_signal", "warning", f"No signal: nothing learned, accuracy at chance ({_pct(chance)}) on both "
                   "splits", evidence, advice,
                   {"learned_nothing": True, "chance": chance, "ceiling": ceiling, "train_acc": max(train),
                    "best_val_acc": max(a for _, a in accs), "train_loss_min": min(losses), "constant_guess_loss":
                    guess, "loss_margin": NO_SIGNAL_LOSS_MARGIN})


def detect_underfitting(history: Mapping, run: Mapping) -> Finding | None:
    """Low accuracy on both splits, or a training loss that barely falls while the accuracy stays low. Its
    advice follows the evidence: more epochs while the loss still falls, the LR range test's suggestion when
    the lr is far from it, then capacity; a regulariser only where one is on."""
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
    lr, suggested = _finite(run.get("lr")), _suggested_lr(run)
    off = max(lr / suggested, suggested / lr) if lr and suggested else None
    lr_far = off is not None and off >= UNDERFIT_LR_OFF  # then the likelier cause: no capacity or regularisation
    advice = []
    if lr_far:
        sentences.append(f"The LR range test suggested {_g(suggested)}, {_g(off)}x "
                         f"{'above' if suggested > lr else 'below'} the learning rate used ({_g(lr)}).")
        how = f"--lr {_g(suggested)}" if _cli(run) else f"learning rate {_g(suggested)}"
        advice.append(f"Use the LR range test's suggestion: {how} (now {_g(lr)}).")
    level = chance_level(run)
    if level is not None and train_acc is not None and train_acc <= level[1]:
        # At chance on its own training images: a slow learner and labels that do not match look alike in the
        # curves (LeNet-5 at Adam lr 3e-4 on shuffled labels, 8 epochs: 13.6 % / 16.7 %, both losses just below
        # ln 10); the one-batch test tells them apart in a minute.
        advice.append("Check the data and the loss: training accuracy at chance can also mean labels that do not "
                      "match the images, or a loss that does not see this model's outputs. Train on one small "
                      "batch (e.g. 32 images) until its accuracy nears 100 %: if it cannot, the model or the "
                      "optimisation is the problem; if it can, look at a few (image, label) pairs.")
    if still or len(epochs) == 1:
        last_drop = f" ({_pct((prev - t_last) / prev)} in the last epoch)" if still else ""
        advice.append(f"Train longer{_epochs(run, None)}: the training loss was still falling{last_drop}.")
    if off is None and not suggested:
        advice.append(f"Run the LR range test ({_lr_test(run)}): a learning rate far from the right one trains "
                      "slowly.")
    if run.get("saturating_activations"):
        advice.append("Replace sigmoid/tanh activations by ReLU.")
    if not still and not lr_far:
        advice.append("Use a bigger model (more channels or layers): the training loss has levelled off"
                      + (" at a learning rate near the range test's suggestion." if off is not None else "."))
    wd = _finite(run.get("weight_decay"))
    on = ([f"weight decay {_g(wd)}"] if wd else []) + (["dropout"] if run.get("dropout") else []) \
        + (["augmentation"] if run.get("augment") else [])
    if on and not lr_far:
        advice.append(f"Lower the regularisation: {', '.join(on)}.")
    return Finding("underfitting", "warning",
                   f"Underfitting: {_pct(train_acc)} training accuracy" if train_acc is not None else
                   "Underfitting: the training loss barely falls", " ".join(sentences), advice,
                   {"train_acc": train_acc, "val_acc": val_acc, "chance": chance, "threshold_acc": low_acc,
                    "train_loss_drop": drop, "still_learning": still, "lr": lr, "suggested_lr": suggested})


# ---------------------------------------------------------------------------------------------------------
# the data flowing through
# ---------------------------------------------------------------------------------------------------------

def detect_softmax_before_cross_entropy(history: Mapping, run: Mapping) -> Finding | None:
    """Rows of the loss input that are non-negative and sum to 1: probabilities fed to cross_entropy. The loss
    input is what ``watch_loss_input`` saw (an error) or else the model's output (a warning: it usually goes
    into the loss, but a model may output probabilities on purpose)."""
    seen = history.get("loss_inputs") or {}
    rows, mins = seen.get("prob_rows") or [], seen.get("min") or []
    sources = list(seen.get("source") or [])
    pairs = [(_finite(r), _finite(m), sources[i] if i < len(sources) else "loss_input")
             for i, (r, m) in enumerate(zip(rows, mins))]
    pairs = [p for p in pairs if p[0] is not None and p[1] is not None]
    if not pairs:
        return None
    hits = [p for p in pairs if p[0] >= SOFTMAX_ROW_FRACTION and p[1] >= SOFTMAX_MIN_VALUE]
    if len(hits) < SOFTMAX_STEP_FRACTION * len(pairs):
        return None
    told = any(p[2] == "loss_input" for p in hits)
    what = "what went into the loss" if told else "the model's output (what a training loop feeds the loss)"
    evidence = (f"On {len(hits)} of {len(pairs)} sampled steps every row of {what} was >= 0 and summed to 1 "
                "(within 1e-3): probabilities, not logits. cross_entropy applies log-softmax itself, so the softmax "
                "is applied twice: the outputs are squeezed into a narrow range and the gradients shrink, so "
                "training crawls and stalls.")
    if not told:
        evidence += " (If these probabilities go to nll_loss through a log instead, that works but loses precision.)"
    advice = ["Remove the softmax at the end of the model (or before the loss) and pass the raw logits to "
              "nn.CrossEntropyLoss / F.cross_entropy.",
              "If you need probabilities, apply softmax only when predicting; if the model must output "
              "log-probabilities, use log_softmax with nll_loss."]
    return Finding("softmax_before_cross_entropy", "error" if told else "warning",
                   "Softmax before cross_entropy: the loss gets probabilities instead of logits" if told else
                   "Softmax before the loss: the model outputs probabilities instead of logits", evidence, advice,
                   {"steps_with_probabilities": len(hits), "steps": len(pairs),
                    "seen_in": "loss_input" if told else "model_output"})


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
    if fraction < SLOW_DATA_FRACTION or waited / len(pairs) < SLOW_DATA_MIN_WAIT_S:
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
        advice.append(f"Load in parallel: {_workers(run, n)}.")
    else:
        advice.append(f"Use more loader workers (now {workers}) with persistent_workers=True.")
    advice += ["Do the expensive work once: decode and resize the images ahead of time and keep them as tensors "
               "(in memory or a memory-mapped file); keep only the random augmentation per item.",
               "Profile the Dataset's __getitem__ (time.perf_counter around it, or torch.profiler) for slow "
               "decoding, file access or Python loops.",
               "On a GPU, use pin_memory=True and non_blocking copies; move augmentation to the GPU."]
    severity = "warning" if fraction >= SLOW_DATA_WARNING else "info"
    return Finding("slow_data_loading", severity, f"Slow data loading: {_pct(fraction)} of each step waits for data",
                   evidence, advice, {"data_fraction": fraction, "data_time_per_step": waited / len(pairs),
                                      "step_time": per_step, "steps": len(pairs), "threshold": SLOW_DATA_FRACTION})


# ---------------------------------------------------------------------------------------------------------
# how advice names a change: the command's flags to `cnnperf doctor` users (run["interface"] == "cli"), Python
# to users of the Doctor in their own loop (anything else)
# ---------------------------------------------------------------------------------------------------------

def _cli(run: Mapping) -> bool:
    return run.get("interface") == "cli"


def _clip_advice(run: Mapping, then: str = "so that one bad batch cannot blow the weights up") -> str:
    how = ("--clip 1.0" if _cli(run) else
           "cnnperf.clip_grad_norm_(model.parameters(), 1.0) between loss.backward() and optimizer.step()")
    return f"Clip the gradient norm ({how}) {then}."


def _lr_test(run: Mapping) -> str:
    """How to run the LR range test, as a parenthesis."""
    return ("--find-lr" if _cli(run) else
            "cnnperf.doctor.lr_range_test(model, optimizer, train_loader, device=...) on copies of both; pass its "
            "result to doctor.report(lr_finder=...)")


def _epochs(run: Mapping, n: int | None) -> str:
    """How to train ``n`` epochs (None: more) as " (--epochs n)" for the command; nothing in Python."""
    if not _cli(run):
        return ""
    return f" (--epochs {n})" if n else " (--epochs)"


def _augment(run: Mapping) -> str:
    return ("--augment" if _cli(run) else
            "a random transform on the training set only, e.g. v2.RandomResizedCrop or v2.RandomAffine")


def _weight_decay(run: Mapping) -> str:
    return ("--optimizer adamw (decoupled decay 0.01), or --weight-decay 5e-4 with SGD" if _cli(run) else
            "torch.optim.AdamW(params, lr, weight_decay=0.01), or SGD(..., weight_decay=5e-4)")


def _workers(run: Mapping, n: int) -> str:
    return f"--workers {n}" if _cli(run) else f"DataLoader(..., num_workers={n}, persistent_workers=True)"


def _suggested_lr(run: Mapping) -> float | None:
    """The LR range test's suggested learning rate, if one ran."""
    finder = run.get("lr_finder")
    return _finite(finder.get("suggested_lr")) if isinstance(finder, Mapping) else None


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
    "no_signal": detect_no_signal,
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


def _step_medians(layers: Mapping, key: str) -> list[float]:
    """Per sampled step, the median over the weight layers of ``layers[key]`` (a per-layer ratio); steps without
    a finite value are left out."""
    weight_idx = _weight_layers(layers)
    medians = [_median([_finite(row[i]) for i in weight_idx if i < len(row)]) for row in layers.get(key) or []]
    return [m for m in medians if m is not None]


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

"""The doctor's detectors on synthetic histories: each pathology is found, each healthy curve raises nothing,
and the thresholds sit where findings.py says they do (checked on both sides)."""

import json
import math

import pytest

from cnnperf.doctor import findings as F
from cnnperf.doctor.findings import Finding, diagnose, early_stopping
from cnnperf.doctor.report import jsonable

SCHEMA_KINDS = ["overfitting", "underfitting", "vanishing_gradients", "exploding_gradients", "nonfinite_gradients",
                "dead_relu", "diverging_loss", "softmax_before_cross_entropy", "unnormalized_input", "lr_too_low",
                "slow_data_loading", "no_signal"]

RUN = {"lr": 1e-3, "optimizer": "adam", "weight_decay": 0.0, "augment": False, "dropout": False,
       "normalization": False, "saturating_activations": 0, "parameters": 225_034, "train_size": 1438,
       "num_classes": 10, "num_workers": 0, "cpu_count": 2, "clip": None}


def steps(loss=None, grad_norm=None, data_time=None, step_time=None, epoch_of=None):
    n = len(next(v for v in (loss, grad_norm, data_time, step_time) if v is not None))
    loss = loss if loss is not None else [max(0.05, 2.3 * 0.97 ** i) for i in range(n)]
    grad_norm = grad_norm if grad_norm is not None else [1.0 + 0.1 * math.sin(i) for i in range(n)]
    return {"step": list(range(1, n + 1)), "epoch": [epoch_of(i) if epoch_of else 1 for i in range(n)],
            "loss": loss, "lr": [1e-3] * n, "data_time": data_time or [0.001] * n,
            "step_time": step_time or [0.02] * n, "grad_norm": grad_norm}


def history(**parts):
    h = {"epochs": [], "steps": steps(loss=[2.3 * 0.97 ** i for i in range(100)]),
         "layers": {"names": [], "shapes": [], "steps": [], "grad_norm": [], "grad_to_weight": [],
                    "update_to_weight": []},
         "relu": {"names": [], "steps": [], "dead_fraction": []},
         "inputs": {"steps": [], "mean": [], "std": [], "min": [], "max": []},
         "loss_inputs": {"steps": [], "min": [], "prob_rows": []}}
    h.update(parts)
    return h


def epochs(train_loss, val_loss, train_acc=None, val_acc=None):
    rows = []
    for i, (t, v) in enumerate(zip(train_loss, val_loss)):
        rows.append({"epoch": i + 1, "train_loss": t, "val_loss": v,
                     "train_acc": train_acc[i] if train_acc else 0.99, "val_acc": val_acc[i] if val_acc else 0.98,
                     "lr": 1e-3, "seconds": 1.0})
    return rows


def layers(gtw_rows, names=None, shapes=None, utw_rows=None):
    n = len(gtw_rows[0])
    names = names or [f"l{i}.weight" for i in range(n)]
    shapes = shapes or [[8, 8]] * n
    return {"names": names, "shapes": shapes, "steps": [1 + 10 * i for i in range(len(gtw_rows))],
            "grad_norm": [[None if g is None else g * 10 for g in row] for row in gtw_rows], "grad_to_weight": gtw_rows,
            "update_to_weight": utw_rows or [[1e-3] * n for _ in gtw_rows]}


def kinds(found):
    return [f.kind for f in found]


# ---------------------------------------------------------------------------------------------------------
# the Finding record
# ---------------------------------------------------------------------------------------------------------

def test_kinds_are_the_schema_kinds_and_every_kind_has_a_detector():
    assert list(F.KINDS) == SCHEMA_KINDS
    assert set(F.DETECTORS) == set(SCHEMA_KINDS)


def test_finding_checks_kind_severity_and_title_and_round_trips():
    f = Finding("overfitting", "warning", "t", "e", ["a", "b"], {"x": 1})
    assert f.advice == ("a", "b")
    assert Finding.from_dict(json.loads(json.dumps(f.to_dict()))) == f
    with pytest.raises(ValueError, match="kind"):
        Finding("overfit", "warning", "t", "e")
    with pytest.raises(ValueError, match="severity"):
        Finding("overfitting", "fatal", "t", "e")
    with pytest.raises(ValueError, match="one line"):
        Finding("overfitting", "warning", "two\nlines", "e")


def test_a_healthy_history_gives_no_finding():
    gtw = [[0.05, 0.04, 0.07, 0.6]] * 10
    h = history(epochs=epochs([1.0, 0.3, 0.15, 0.1, 0.07], [0.4, 0.2, 0.12, 0.09, 0.08],
                              [0.7, 0.9, 0.95, 0.97, 0.98], [0.88, 0.94, 0.96, 0.97, 0.975]),
                layers=layers(gtw),
                relu={"names": ["a", "b"], "steps": list(range(10)), "dead_fraction": [[0.1, 0.4]] * 10},
                inputs={"steps": [1], "mean": [0.0], "std": [1.0], "min": [-0.9], "max": [2.1]},
                loss_inputs={"steps": [1], "min": [-9.0], "prob_rows": [0.0]})
    assert diagnose(h, RUN) == []


# ---------------------------------------------------------------------------------------------------------
# overfitting, underfitting, early stopping
# ---------------------------------------------------------------------------------------------------------

def test_early_stopping_counts_patience_epochs_without_a_new_best():
    rows = epochs([1] * 8, [0.9, 0.5, 0.4, 0.45, 0.42, 0.41, 0.43, 0.39])
    loss = dict(monitor="val_loss")
    assert early_stopping(rows, patience=3, **loss) == (8, 6)  # the best of the run; where patience 3 stopped
    assert F.best_before(rows, 6, "val_loss") == 3  # ... keeping epoch 3's weights
    assert early_stopping(rows, patience=5, **loss) == (8, None)
    assert early_stopping(epochs([1, 1], [None, None], [0.5, 0.5], [None, None])) == (None, None)
    assert early_stopping(epochs([1, 1, 1], [0.5, float("nan"), 0.4]), **loss) == (3, None)
    with pytest.raises(ValueError, match="monitor must be one of val_acc, val_loss"):
        early_stopping(rows, monitor="accuracy")


def test_early_stopping_follows_the_validation_accuracy_by_default():
    # the loss is lowest at epoch 2 and rises (overconfidence) while the accuracy improves to epoch 7
    acc = [0.5, 0.7, 0.72, 0.75, 0.74, 0.78, 0.80, 0.79, 0.79, 0.78]
    rows = epochs([1.0 / (i + 1) for i in range(10)], [0.9, 0.6, 0.65, 0.7, 0.8, 0.85, 0.9, 1.0, 1.1, 1.2],
                  [0.9] * 10, acc)
    assert F.monitored(rows) == "val_acc" and F.monitored(rows, "val_loss") == "val_loss"
    assert early_stopping(rows) == (7, 10) and F.best_before(rows, 10) == 7
    assert early_stopping(rows, monitor="val_loss") == (2, 5)
    assert F.monitored(epochs([1, 1], [0.5, 0.4])) == "val_acc"  # (the helper fills in accuracies)
    assert F.monitored([{"epoch": 1, "val_loss": 0.5}]) == "val_loss" and F.monitored([{"epoch": 1}]) is None


def test_early_stopping_never_stops_on_a_chance_level_best():
    # 100 training images, a big model: chance for 4 epochs, then it learns (issue 15: patience on the loss
    # stopped at epoch 4 and kept epoch 1's weights, a 9.7 % model)
    acc = [0.097, 0.10, 0.095, 0.10, 0.11, 0.35, 0.60, 0.72, 0.78, 0.80]
    rows = epochs([2.3] * 10, [2.30, 2.31, 2.32, 2.33, 2.34, 2.0, 1.6, 1.4, 1.5, 1.6], [0.1] * 10, acc)
    run = dict(RUN, val_size=359)
    assert F.chance_level(run) == (0.1, pytest.approx(0.1 + 3 * math.sqrt(0.09 / 359)))
    assert early_stopping(rows, run=run) == (10, None)
    assert early_stopping(rows, monitor="val_loss", run=run) == (8, None)  # patience starts once it learned
    assert early_stopping(rows) == (10, None) and early_stopping(rows, monitor="val_loss")[1] == 4  # no run


def test_overfitting_from_validation_loss_rising_while_training_loss_falls():
    h = history(epochs=epochs([1.0, 0.4, 0.2, 0.1, 0.05, 0.02, 0.01], [0.8, 0.5, 0.45, 0.5, 0.6, 0.7, 0.8],
                              [0.6, 0.85, 0.93, 0.97, 0.99, 1.0, 1.0], [0.7, 0.83, 0.85, 0.85, 0.85, 0.84, 0.84]))
    f = F.detect_overfitting(h, RUN)
    assert f is not None and f.severity == "warning"
    assert f.data["best_epoch"] == 3 and f.data["early_stop_epoch"] == 6 and f.data["val_loss_rising"]
    assert f.data["monitor"] == "val_acc" and f.data["val_loss_best_epoch"] == 3
    assert "epoch 3" in f.evidence and "0.45" in f.evidence and "0.8" in f.evidence
    assert ("The best epoch by validation accuracy is 3 (validation accuracy 85.0%, validation loss 0.45); the "
            "last, 7, has validation accuracy 84.0% (-1.0 points) and validation loss 0.8 (+78 %).") in f.evidence
    # the advice fits the run: stop early first, then what the run lacks, in this order; flags for the command
    cli = F.detect_overfitting(h, dict(RUN, interface="cli"))
    text = " | ".join(cli.advice)
    assert cli.advice[0].startswith("Keep the weights of the best epoch by validation accuracy, 3: train 3 epochs "
                                    "(--epochs 3), or stop early")
    order = [text.index(s) for s in ("--augment", "weight decay", "dropout", "smaller model", "more training data")]
    assert order == sorted(order) and "--optimizer adamw" in text
    # ... and Python for the API
    assert f.advice[0].startswith("Keep the weights of the best epoch by validation accuracy, 3: train 3 epochs, or")
    assert not any("--" in a for a in f.advice) and any("torch.optim.AdamW(" in a for a in f.advice)
    # what the run already has is not advised again
    g = F.detect_overfitting(h, dict(RUN, augment=True, weight_decay=5e-4, dropout=True))
    assert not any("augmentation" in a or "Add dropout" in a for a in g.advice)
    assert any("Raise the weight decay (now 0.0005)" in a for a in g.advice)


def test_overfitting_stop_point_is_the_best_accuracy_when_the_loss_rises_from_overconfidence():
    # VGG-like on 100 images (issue 15): the loss is lowest at epoch 2, the accuracy best at epoch 9
    acc = [0.2, 0.5, 0.6, 0.65, 0.7, 0.75, 0.8, 0.84, 0.886, 0.88]
    h = history(epochs=epochs([2.0 / (i + 1) for i in range(10)],
                              [1.6, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9, 2.0], [1.0] * 10, acc))
    f = F.detect_overfitting(h, RUN)
    assert f.data["val_loss_best_epoch"] == 2 and f.data["best_epoch"] == 9 and f.data["early_stop_epoch"] is None
    assert ("But the validation accuracy kept improving, from 50.0% at epoch 2 to 88.6% at epoch 9: the model "
            "grew overconfident") in f.evidence
    assert f.advice[0].startswith("Keep the weights of the best epoch by validation accuracy, 9")
    by_loss = F.detect_overfitting(h, dict(RUN, monitor="val_loss"))
    assert by_loss.data["best_epoch"] == 2 and by_loss.advice[0].startswith(
        "Keep the weights of the best epoch by validation loss, 2")


def test_overfitting_from_an_accuracy_gap_alone():
    h = history(epochs=epochs([0.5, 0.1], [0.6, 0.55], [0.9, 1.0], [0.8, 1.0 - F.OVERFIT_ACC_GAP - 0.01]))
    f = F.detect_overfitting(h, RUN)
    assert f is not None and not f.data["val_loss_rising"] and f.data["acc_gap"] >= F.OVERFIT_ACC_GAP
    # A gap where either accuracy is within noise of chance is not overfitting: VGG-11-BN after one epoch of 10
    # steps (58.4 %, 10.0 %: its BatchNorm's running statistics 10 updates old), the ConvNet on shuffled labels
    # (13.5 %, 2.5 %). Without a class count there is no chance level to judge by: the gap alone speaks.
    run = dict(RUN, val_size=359)
    assert F.detect_overfitting(history(epochs=epochs([1.557], [2.301], [0.584], [0.100])), run) is None
    # a validation accuracy that collapses to chance after rising is still a gap
    collapse = epochs([0.5, 0.3, 0.1], [0.9, 0.8, 0.85], [0.90, 0.95, 0.99], [0.60, 0.70, 0.09])
    assert F.detect_overfitting(history(epochs=collapse), dict(RUN, val_size=10000)) is not None
    assert F.detect_overfitting(history(epochs=epochs([2.28], [2.37], [0.135], [0.025])), run) is None
    assert F.detect_overfitting(history(epochs=epochs([1.557], [2.301], [0.584], [0.160])), run) is not None
    assert F.detect_overfitting(history(epochs=epochs([1.557], [2.301], [0.584], [0.100])),
                                {k: v for k, v in RUN.items() if k != "num_classes"}) is not None


@pytest.mark.parametrize("val", [
    [0.8, 0.5, 0.40, 0.41, 0.42, 0.43],   # rises, but less than OVERFIT_VAL_RISE
    [0.8, 0.5, 0.40, 0.60, 0.3, 0.29],    # a bump, then a new best
    [0.8, 0.5, 0.40, 0.30, 0.5],          # the rise is one epoch old
])
def test_no_overfitting_for_noise_bumps_and_late_bests(val):
    h = history(epochs=epochs([1.0 / (i + 1) for i in range(len(val))], val))
    assert F.detect_overfitting(h, RUN) is None


def test_no_overfitting_when_the_training_loss_stopped_falling():
    # the healthy VGG-11-BN of bench/doctor_cases.py: a validation-loss spike at the end, the training loss flat
    train, val = [0.930, 0.185, 0.0825, 0.0474, 0.0807], [2.25, 0.122, 0.0836, 0.214, 0.102]
    accs = ([0.724, 0.950, 0.975, 0.986, 0.978], [0.281, 0.975, 0.969, 0.942, 0.975])
    assert F.detect_overfitting(history(epochs=epochs(train, val, *accs)), RUN) is None
    # the same validation curve while the training loss falls by OVERFIT_MIN_TRAIN_DROP (and no more): overfitting
    train[-1] = train[2] * (1 - F.OVERFIT_MIN_TRAIN_DROP)
    f = F.detect_overfitting(history(epochs=epochs(train, val, *accs)), RUN)
    assert f is not None and f.data["val_loss_rising"]


def test_underfitting_when_both_accuracies_stay_low():
    h = history(epochs=epochs([2.2, 2.0, 1.9], [2.2, 2.0, 1.95], [0.2, 0.3, 0.4], [0.2, 0.3, 0.38]))
    f = F.detect_underfitting(h, RUN)
    assert f is not None and f.kind == "underfitting" and "40.0%" in f.evidence
    assert f.advice[0].startswith("Train longer")  # the loss fell 5 %+ in the last epoch
    threshold = 0.1 + F.UNDERFIT_ACC_FRACTION * 0.9
    ok = history(epochs=epochs([2.2, 1.0], [2.2, 1.0], [0.3, threshold + 0.01], [0.3, threshold + 0.01]))
    assert F.detect_underfitting(ok, RUN) is None


def test_underfitting_when_the_training_loss_is_flat_at_chance():
    h = history(epochs=epochs([2.31, 2.30, 2.30], [2.31, 2.30, 2.30], [0.1, 0.11, 0.1], [0.1, 0.1, 0.1]))
    f = F.detect_underfitting(h, RUN)
    assert f is not None and f.advice[0].startswith("Check the data and the loss") and "one small batch" in f.advice[0]
    # a measured lr far off stays first; the data check comes next, before the generic steps
    finder = {"suggested_lr": 0.05, "method": "steepest descent"}
    far = F.detect_underfitting(h, dict(RUN, lr=1e-5, lr_finder=finder))
    assert far.advice[0].startswith("Use the LR range test's suggestion") and far.advice[1].startswith("Check the data")
    # Nothing learned on either split, with no unit dying on the way: underfitting speaks (its advice names the
    # data too), not no_signal.
    assert F.detect_no_signal(h, RUN).data["learned_nothing"] is True
    assert kinds(diagnose(h, RUN)) == ["underfitting"]


def relu_history(dead_first: float, dead_late: float, samples: int = 12) -> dict:
    rows = [[dead_first]] + [[dead_late]] * (samples - 1)
    return {"names": ["features.4"], "steps": list(range(1, 10 * samples, 10)), "dead_fraction": rows}


def test_no_signal_when_nothing_is_learned_while_the_units_die():
    """AlexNet-small on shuffled labels (bench/doctor_cases.py): the loss at ln(10) for 10 epochs, both
    accuracies at chance, its ReLUs dying one after the other. dead_relu alone would blame the step size; the
    no_signal finding beside it names the labels. Units dead from the first step, or a loss that fell, do not."""
    flat = epochs([2.3056, 2.3039, 2.3033, 2.3030, 2.3030], [2.3027] * 5, [0.086, 0.083, 0.091, 0.099, 0.1015],
                  [0.1003, 0.0975, 0.1003, 0.1003, 0.1003])
    run = dict(RUN, val_size=359)
    h = history(epochs=flat, relu=relu_history(0.1, 0.997))
    found = diagnose(h, run)
    assert kinds(found) == ["dead_relu", "no_signal"] and found[1].severity == "warning"
    f = found[1]
    assert f.data["learned_nothing"] is True and f.data["constant_guess_loss"] == pytest.approx(math.log(10))
    assert "the loss of a constant guess (ln 10 = 2.3)" in f.evidence and "learned nothing" in f.evidence
    assert f.advice[0].startswith("Check that every input keeps its label")
    assert kinds(diagnose(history(epochs=flat, relu=relu_history(0.99, 0.997)), run)) == ["dead_relu"]
    # Units dying without a whole layer dead (warning) under moderate steps: a constant output is all the labels
    # leave, and dead_relu's "lower the lr" would be a false lead (the ConvNet on shuffled labels: 83 % of
    # features.4 dead at Adam lr 1e-3); no_signal alone. After steps too large, dead_relu alone.
    some = history(epochs=flat, relu=relu_history(0.1, 0.83), layers=layers([[3e-3] * 3] * 3))
    assert kinds(diagnose(some, run)) == ["no_signal"]
    big = history(epochs=flat, relu=relu_history(0.1, 0.83), layers=layers([[3e-3] * 3] * 3, utw_rows=[[0.3] * 3] * 3))
    assert kinds(diagnose(big, run)) == ["dead_relu"]
    # the step size not measured (no after_step): not known to be moderate, dead_relu stays
    unmeasured = history(epochs=flat, relu=relu_history(0.1, 0.83))
    assert kinds(diagnose(unmeasured, run)) == ["dead_relu", "no_signal"]
    # a model that fitted its training labels (95 %) has no constant output: its dead units are a finding of their own
    fitted = [dict(e, train_acc=0.95, train_loss=0.2) for e in flat]
    assert kinds(diagnose(history(epochs=fitted, relu=relu_history(0.1, 0.83), layers=layers([[3e-3] * 3] * 3)),
                          run)) == ["no_signal", "dead_relu"]  # error first
    fell = [dict(e, train_loss=e["train_loss"] * 0.97) for e in flat]  # 3 % below a constant guess: learning,
    assert "learned_nothing" not in F.detect_no_signal(history(epochs=fell), run).data  # what does not carry over
    both = [dict(e, val_loss=e["val_loss"] * 0.97) for e in fell]  # ... and what does: not at chance, just slow
    assert F.detect_no_signal(history(epochs=both), run) is None
    spike = [dict(e) for e in flat]
    spike[3]["val_acc"] = 0.1616  # one epoch above the ceiling (VGG-11-BN on shuffled labels): still nothing learned
    assert F.detect_no_signal(history(epochs=spike), run).data["learned_nothing"] is True
    spike[4]["val_acc"] = 0.1616  # the last epoch above it too: not at chance
    assert F.detect_no_signal(history(epochs=spike), run) is None
    above = [dict(e) for e in flat]
    above[2]["train_acc"] = 0.2  # above chance on the training images: the other no_signal, not "nothing learned"
    assert "learned_nothing" not in F.detect_no_signal(history(epochs=above), run).data


def test_units_dead_after_steps_too_large_blame_the_step_not_the_labels():
    """AlexNet-small at Adam lr 1e-2 on its real labels (bench/doctor_cases.py): the first sampled step moved the
    median layer by 46 % of its norm, the ReLUs were dead 10 steps later and nothing was learned. The same
    curves as shuffled labels, but the step size is the cause: dead_relu alone, its lower lr first, and no
    no_signal pointing at the labels. At lr 1e-3 (4.6 %, the shuffled-labels run) no_signal stays beside it."""
    flat = epochs([6.043, 2.304, 2.304, 2.303, 2.303, 2.303], [2.303] * 6, [0.092, 0.081, 0.097, 0.099, 0.088, 0.097],
                  [0.1] * 6)
    run = dict(RUN, val_size=359, lr=0.01)

    def h(early_medians):
        utw = [[m / 2, m, 2 * m] for m in early_medians] + [[1e-4, 1e-4, 1e-4]] * 9
        return history(epochs=flat, relu=relu_history(0.1, 1.0),
                       layers=layers([[3e-3] * 3] * len(utw), utw_rows=utw))

    big = diagnose(h([0.46, 0.044, 0.014]), run)
    assert kinds(big) == ["dead_relu"]
    f = big[0]
    assert f.data["big_steps"] is True and f.data["early_update_to_weight"] == pytest.approx(0.46)
    assert "moved the weights by 46.0% of their norm" in f.evidence
    assert f.advice[0] == "Lower the learning rate (now 0.01), e.g. to 0.001."
    # SGD with momentum: the steps grow over the first samples; the largest of the first three counts
    assert F.detect_dead_relu(h([0.01, 0.05, F.DEAD_RELU_BIG_STEP]), run).data["big_steps"] is True
    # ... and only the first three: a late big step is not the early one that killed the units
    late = F.detect_dead_relu(h([0.046, 0.011, 0.0048, 0.5]), run)
    assert late.data["big_steps"] is False and late.data["early_update_to_weight"] == pytest.approx(0.046)
    assert kinds(diagnose(h([0.046, 0.011, 0.0048]), run)) == ["dead_relu", "no_signal"]
    # dead from the first step: the initialisation, whatever the steps
    assert F.detect_dead_relu(history(epochs=flat, relu=relu_history(1.0, 1.0), layers=layers(
        [[3e-3] * 3] * 3, utw_rows=[[0.5] * 3] * 3)), run).data["big_steps"] is False


def test_no_signal_when_the_training_loss_falls_below_a_guess_while_validation_rises_above_it():
    """The ConvNet under SGD on shuffled labels (bench/doctor_cases.py): its training accuracy never left the noise
    of chance (13.8 % at best), but its training loss went below ln(10) while the validation loss rose above it
    and the validation accuracy fell below chance. Not overfitting (a gap of 11 points at 13.5 %), not
    underfitting: no signal."""
    run = dict(RUN, val_size=359)
    train_loss = [2.313, 2.306, 2.302, 2.303, 2.298, 2.289, 2.284, 2.276]
    val_loss = [2.307, 2.306, 2.308, 2.316, 2.324, 2.357, 2.379, 2.369]
    train_acc = [0.095, 0.101, 0.107, 0.116, 0.127, 0.127, 0.138, 0.135]
    val_acc = [0.100, 0.078, 0.111, 0.114, 0.103, 0.047, 0.031, 0.025]
    h = history(epochs=epochs(train_loss, val_loss, train_acc, val_acc))
    found = diagnose(h, run)
    assert kinds(found) == ["no_signal"] and found[0].severity == "error"
    f = found[0]
    assert f.data["losses_apart"] == (2.276, 2.369) and "learned_nothing" not in f.data
    assert "below chance" in f.evidence and "the validation loss ended at 2.37, 2.9% above it" in f.evidence
    # LeNet-5 under SGD on shuffled labels: the validation loss a hair below a guess's, the training loss 0.7 %
    # below it; the last epoch's accuracy above the ceiling is argmax noise at that loss (2.5 % two epochs before)
    lenet = epochs([2.306, 2.304, 2.305, 2.302, 2.301, 2.299, 2.293, 2.286],
                   [2.301, 2.301, 2.300, 2.300, 2.300, 2.301, 2.298, 2.300],
                   [0.097, 0.102, 0.092, 0.106, 0.111, 0.104, 0.116, 0.129],
                   [0.111, 0.100, 0.100, 0.134, 0.184, 0.025, 0.089, 0.167])
    g = F.detect_no_signal(history(epochs=lenet), run)
    assert g.data["losses_apart"] == (2.286, 2.300) and "only 0.1% below it" in g.evidence
    # ... up to twice the noise above chance: 30 % at the end is not noise, whatever the losses say
    rising = [dict(e, val_acc=0.30) if e["epoch"] == 8 else e for e in lenet]
    assert F.detect_no_signal(history(epochs=rising), run) is None
    # a real learner that slow carries its fall over (the ConvNet at SGD lr 0.001, 0.7 % and 0.8 % below a
    # guess's): nothing learned yet, underfitting speaks
    slow = [dict(e, val_loss=2.284) if e["epoch"] == 8 else e for e in lenet]
    assert F.detect_no_signal(history(epochs=slow), run) is None
    near = epochs(train_loss, val_loss[:-1] + [math.log(10) - (math.log(10) - 2.276) * F.NO_SIGNAL_VAL_SHARE],
                  train_acc, val_acc)
    assert kinds(diagnose(history(epochs=near), run)) == ["underfitting"]
    # the training loss less than NO_SIGNAL_TRAIN_FIT below a guess's: noise, not a fit
    flat = epochs(train_loss[:-1] + [math.log(10) * (1 - F.NO_SIGNAL_TRAIN_FIT) + 1e-4], val_loss, train_acc,
                  val_acc)
    assert F.detect_no_signal(history(epochs=flat), run).data["learned_nothing"] is True
    # the training loss not below a guess's (LeNet-5 at SGD lr 0.5, its units dead): nothing learned either
    stuck = epochs([2.372, 2.337, 2.321, 2.322], [2.338, 2.312, 2.316, 2.38], [0.134, 0.092, 0.098, 0.088],
                   [0.097, 0.1, 0.1, 0.1])
    assert F.detect_no_signal(history(epochs=stuck), run).data["learned_nothing"] is True


def test_underfitting_advice_follows_the_lr_range_test_and_the_regularisers_that_are_on():
    h = history(epochs=epochs([2.3, 2.25, 2.24], [2.3, 2.25, 2.24], [0.2, 0.25, 0.26], [0.2, 0.25, 0.26]))
    finder = {"suggested_lr": 0.0546, "method": "steepest descent"}
    run = dict(RUN, lr=0.0005, optimizer="sgd", lr_finder=finder)
    f = F.detect_underfitting(h, run)
    assert f.advice[0] == "Use the LR range test's suggestion: learning rate 0.0546 (now 0.0005)."
    assert "The LR range test suggested 0.0546, 109x above the learning rate used (0.0005)." in f.evidence
    assert not any("Run the LR range test" in a for a in f.advice)  # it ran
    assert not any(a.startswith("Use a bigger model") for a in f.advice)  # the lr far off is the likelier cause
    assert not any("regularisation" in a for a in F.detect_underfitting(h, dict(run, weight_decay=5e-4)).advice)
    cli = F.detect_underfitting(h, dict(run, interface="cli"))
    assert cli.advice[0] == "Use the LR range test's suggestion: --lr 0.0546 (now 0.0005)."
    assert not any("regularisation" in a for a in f.advice)  # none is on
    near = F.detect_underfitting(h, dict(run, lr=0.03, dropout=True, weight_decay=5e-4))
    assert not any(a.startswith("Use the LR range test's suggestion") for a in near.advice)
    assert near.advice[-1] == "Lower the regularisation: weight decay 0.0005, dropout."
    assert any(a.startswith("Use a bigger model") and "near the range test's suggestion" in a for a in near.advice)
    without = F.detect_underfitting(h, RUN)
    assert any(a.startswith("Run the LR range test (cnnperf.doctor.lr_range_test(") for a in without.advice)
    assert any(a.startswith("Run the LR range test (--find-lr)") for a in
               F.detect_underfitting(h, dict(RUN, interface="cli")).advice)


def test_no_signal_when_the_model_fits_its_training_labels_and_validation_stays_at_chance():
    shuffled = epochs([2.3, 2.1, 1.6, 1.0, 0.5], [2.3, 2.35, 2.5, 2.8, 3.2], [0.1, 0.2, 0.45, 0.7, 0.9],
                      [0.1, 0.11, 0.095, 0.12, 0.105])
    run = dict(RUN, val_size=359)
    f = F.detect_no_signal(history(epochs=shuffled), run)
    assert f.severity == "error" and f.data["best_val_acc"] == 0.12 and f.data["train_acc"] == 0.9
    assert f.data["val_acc_late_median"] == 0.105 and f.data["val_acc_last"] == 0.105
    assert "labels that do not match their inputs" in f.evidence and "on 359 validation images" in f.evidence
    found = diagnose(history(epochs=shuffled), run)
    assert kinds(found) == ["no_signal"]  # not overfitting advice for a data problem
    learning = epochs([2.3, 1.5, 1.0], [2.3, 1.6, 1.2], [0.1, 0.5, 0.7], [0.1, 0.16, 0.26])
    assert F.detect_no_signal(history(epochs=learning), run) is None  # 26 % is 16 points above chance
    # LeNet-5 on shuffled labels: one noisy epoch above the ceiling, the later half at chance
    noisy = epochs([2.3] * 12, [2.3] * 12, [0.09, 0.1, 0.1, 0.1, 0.11, 0.12, 0.13, 0.13, 0.15, 0.14, 0.16, 0.18],
                   [0.103, 0.103, 0.159, 0.156, 0.148, 0.134, 0.078, 0.128, 0.139, 0.097, 0.061, 0.092])
    g = F.detect_no_signal(history(epochs=noisy), run)
    assert g is not None and g.data["best_val_acc"] == 0.159 and g.data["val_acc_late_median"] == pytest.approx(0.0945)
    learns_late = [dict(e) for e in noisy]
    learns_late[-1]["val_acc"] = 0.4  # the last epoch is clearly above chance: it is starting to learn
    assert F.detect_no_signal(history(epochs=learns_late), run) is None
    one = epochs([2.3], [2.5], [0.9], [0.1])
    assert F.detect_no_signal(history(epochs=one), run) is None  # one epoch says little
    assert F.detect_no_signal(history(epochs=shuffled), dict(RUN, num_classes=None)) is None


# ---------------------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------------------

def test_vanishing_gradients_in_a_deep_sigmoid_stack():
    rows = [[0.3 * 0.25 ** (9 - i) for i in range(10)] for _ in range(6)]  # 4x less per layer going back
    f = F.detect_vanishing_gradients(history(layers=layers(rows)), dict(RUN, saturating_activations=9))
    assert f is not None and f.severity == "warning"
    assert f.data["median_growth"] == pytest.approx(4.0 ** 8)  # over the 9 hidden layers: the output one is out
    assert f.advice[0].startswith("Replace the sigmoid/tanh activations (9 in the model)")
    assert "9 saturating activations (sigmoid/tanh)" in f.evidence and "no normalisation layer" in f.evidence


def test_vanishing_gradients_are_not_diluted_by_thirds():
    # 12 tanh layers (issue 15): flat over the first two thirds, then a steep rise; thirds differed 46x
    measured = [1.8e-05, 1.1e-04, 1.2e-04, 1.5e-04, 1.8e-04, 2.6e-04, 5.4e-04, 8.5e-04, 1.7e-03, 2.9e-03, 5.7e-03,
                2.0e-02]
    rows = [measured + [0.5]] * 8  # + the output layer
    f = F.detect_vanishing_gradients(history(layers=layers(rows)), dict(RUN, saturating_activations=12))
    assert f is not None and 200 < f.data["median_growth"] < 1000


def test_vanishing_signal_when_the_activations_stop_varying_between_inputs():
    # a 10-layer tanh MLP with default init: the gradient ratios grow only ~6x, the activations' spread between
    # inputs shrinks ~180x (measured)
    rows = [[0.0027, 0.00082, 0.0009, 0.00087, 0.0011, 0.0013, 0.0021, 0.0031, 0.0057, 0.011, 0.05]] * 6
    spread = [[0.30 * 0.56 ** i for i in range(10)]] * 6
    acts = {"names": [f"{2 * i + 2}" for i in range(10)], "steps": [1 + 10 * i for i in range(6)], "spread": spread}
    run = dict(RUN, saturating_activations=10)
    f = F.detect_vanishing_gradients(history(layers=layers(rows), activations=acts), run)
    assert f is not None and f.title.startswith("Vanishing signal: the activations vary 185x less")
    assert f.data["signal_fade"] == pytest.approx(0.56 ** 9) and f.data["median_growth"] < F.VANISHING_GROWTH
    assert "the signal fades before it reaches the output" in f.evidence
    healthy = {**acts, "spread": [[0.28, 0.9, 2.2]] * 6, "names": ["a", "b", "c"]}  # the ConvNet: it grows
    assert F.detect_vanishing_gradients(history(layers=layers(rows), activations=healthy), run) is None
    once = {**acts, "spread": spread[:2] + [[0.3] * 10] * 4}  # faded on the first steps only (AlexNet-small, Adam)
    assert F.detect_vanishing_gradients(history(layers=layers(rows), activations=once), run) is None
    # faded on every step but the first SIGNAL_FADE_START_STEPS: the output collapsing to a constant (VGG-11-BN
    # on shuffled labels), not the depth
    start = F.SIGNAL_FADE_START_STEPS
    later = {**acts, "spread": [[0.3] * 10] * start + spread[start:]}
    assert F.detect_vanishing_gradients(history(layers=layers(rows), activations=later), run) is None
    assert f.data["signal_fade_at_start"] == pytest.approx(0.56 ** 9)


def test_vanishing_gradients_names_an_initialisation_too_small_for_relu():
    rows = [[1e-5 * 2.4 ** i for i in range(10)] + [0.5]] * 6
    shapes = [[16, 16, 3, 3]] * 10 + [[10, 16]]
    lyr = layers(rows, shapes=shapes)
    fan_in = 16 * 9
    lyr["weight_norm"] = [[0.577 / math.sqrt(fan_in) * math.sqrt(16 * fan_in)] * 10 + [1.0]] * 6  # default init
    run = dict(RUN, layer_types={"ReLU": 10, "Conv2d": 10})
    f = F.detect_vanishing_gradients(history(layers=lyr), run)
    assert f.data["init_gain"] == pytest.approx(0.577) and f.data["small_init"]
    assert "median gain of 0.58/sqrt(fan_in)" in f.evidence and "shrinks it about 2.5x" in f.evidence
    assert f.advice[0].startswith("Initialise the weights for the activation: torch.nn.init.kaiming_normal_(w, "
                                  "nonlinearity='relu')")
    lyr["weight_norm"] = [[1.41 * 12] * 10 + [1.0]] * 6  # Kaiming: the init is not the cause
    g = F.detect_vanishing_gradients(history(layers=lyr), run)
    assert not g.data["small_init"] and not g.advice[0].startswith("Initialise")
    lyr["steps"] = [11 + 10 * i for i in range(6)]  # the first sample is not the initialisation: no judgement
    assert F.detect_vanishing_gradients(history(layers=lyr), run).data["init_gain"] is None


def test_no_vanishing_gradients_when_only_the_output_layer_is_large_or_on_few_steps():
    healthy = [[0.012, 0.05, 0.077, 3.3]] * 10  # measured on the ConvNet: output layer ~50x the first
    assert F.detect_vanishing_gradients(history(layers=layers(healthy)), RUN) is None
    g = math.sqrt(F.VANISHING_GROWTH)  # three hidden layers growing g per layer: g^2 from the first to the last
    borderline = [[1.0, g / 1.3, (g / 1.3) ** 2, 1.0]] * 10
    assert F.detect_vanishing_gradients(history(layers=layers(borderline)), RUN) is None
    vanishing = [[1.0, g * 1.3, (g * 1.3) ** 2, 1.0]]
    assert F.detect_vanishing_gradients(history(layers=layers(vanishing * 10)), RUN) is not None
    assert F.detect_vanishing_gradients(history(layers=layers(vanishing * (F.MIN_SAMPLED_STEPS - 1))), RUN) is None
    # on fewer than half the steps: not "most"
    mixed = vanishing * 4 + [[1.0, 1.0, 1.0, 1.0]] * 6
    assert F.detect_vanishing_gradients(history(layers=layers(mixed)), RUN) is None


def test_vanishing_gradients_looks_at_weights_only():
    # biases (1-D) with tiny ratios between healthy weights must not count as "early layers"
    names = ["c1.weight", "c1.bias", "c2.weight", "c2.bias", "c3.weight", "c3.bias", "fc.weight", "fc.bias"]
    shapes = [[8, 1, 3, 3], [8], [8, 8, 3, 3], [8], [8, 8, 3, 3], [8], [10, 8], [10]]
    rows = [[0.1, 1e-9, 0.1, 1e-9, 0.1, 1e-9, 1.0, 1e-9]] * 6
    assert F.detect_vanishing_gradients(history(layers=layers(rows, names, shapes)), RUN) is None


def test_exploding_gradients_from_spikes_above_the_running_median():
    norms = [1.0 + 0.2 * math.sin(i) for i in range(60)]
    norms[40] = 1.0 * F.EXPLODING_SPIKE * 3
    f = F.detect_exploding_gradients(history(steps=steps(grad_norm=norms)), RUN)
    assert f is not None and f.data["spike_count"] == 1 and f.data["spikes"][0]["step"] == 41
    assert f.advice[0].startswith("Clip the gradient norm")
    clipped = F.detect_exploding_gradients(history(steps=steps(grad_norm=norms)), dict(RUN, clip=1.0))
    assert "clipped at 1" in clipped.evidence and not clipped.advice[0].startswith("Clip")


def test_no_exploding_gradients_for_a_norm_that_rises_to_a_new_level_or_noise():
    wake_up = [0.1, 0.15, 0.22, 0.24, 0.17, 0.19, 0.25, 0.33, 0.61, 1.2, 2.46, 6.47, 11.3, 11.35, 6.39]
    wake_up += [3.0 + (i % 5) for i in range(50)]  # measured on AlexNet-small, Adam 1e-3: a healthy run
    assert F.detect_exploding_gradients(history(steps=steps(grad_norm=wake_up)), RUN) is None
    noise = [1.0 + (i * 7919 % 13) / 4 for i in range(100)]  # within 4x
    assert F.detect_exploding_gradients(history(steps=steps(grad_norm=noise)), RUN) is None


def test_nonfinite_gradients_is_an_error_with_the_first_step_and_layers():
    norms = [1.0] * 20 + [float("inf"), None, None]
    lyr = layers([[1.0, 1.0, 1.0]] * 2 + [[None, 2.0, float("nan")]])
    lyr["steps"] = [1, 11, 21]
    f = F.detect_nonfinite_gradients(history(steps=steps(grad_norm=norms), layers=lyr), RUN)
    assert f.severity == "error" and f.data["first_step"] == 21 and f.data["steps_nonfinite"] == 3
    assert f.data["layers"] == ["l0.weight", "l2.weight"]
    assert F.detect_nonfinite_gradients(history(steps=steps(grad_norm=[1.0] * 30)), RUN) is None


def test_nonfinite_gradients_under_a_grad_scaler_only_when_frequent_or_at_the_end():
    calibrating = [None] * 3 + [1.0] * 97  # the scaler halves its scale a few times at the start: normal
    scaled = dict(RUN, grad_scaler=True)
    assert F.detect_nonfinite_gradients(history(steps=steps(grad_norm=calibrating)), scaled) is None
    assert F.detect_nonfinite_gradients(history(steps=steps(grad_norm=calibrating)), RUN) is not None
    frequent = [None if i % 10 == 0 else 1.0 for i in range(100)]
    assert F.detect_nonfinite_gradients(history(steps=steps(grad_norm=frequent)), dict(RUN, grad_scaler=True))
    stuck = [1.0] * 190 + [None] * F.NONFINITE_SCALER_TAIL
    assert F.detect_nonfinite_gradients(history(steps=steps(grad_norm=stuck)), dict(RUN, grad_scaler=True))


def test_dead_relu_warning_error_and_healthy():
    def h(values, first=None):
        rows = [list(values)] * 10
        if first is not None:
            rows[0] = list(first)
        return history(relu={"names": ["features.1", "classifier.1"], "steps": list(range(10)), "dead_fraction": rows})

    assert F.detect_dead_relu(h([0.1, 0.45]), RUN) is None
    warn = F.detect_dead_relu(h([0.1, F.DEAD_RELU_WARNING + 0.05], first=[0.1, 0.1]), RUN)
    assert warn.severity == "warning" and list(warn.data["layers"]) == ["classifier.1"]
    assert warn.advice[0].startswith("Lower the learning rate")  # they died during training
    dead = F.detect_dead_relu(h([0.1, 1.0]), RUN)
    assert dead.severity == "error" and dead.data["from_start"]
    assert dead.advice[0].startswith("Check the initialisation")  # dead from the first step


# ---------------------------------------------------------------------------------------------------------
# the loss
# ---------------------------------------------------------------------------------------------------------

def test_diverging_loss_nan_is_an_error_naming_the_step():
    loss = [2.3, 2.2, 5.0, 40.0, 1e6, float("nan"), float("nan")]
    f = F.detect_diverging_loss(history(steps=steps(loss=loss)), dict(RUN, lr=10.0))
    assert f.severity == "error" and f.data["nonfinite_step"] == 6 and "NaN at step 6" in f.title
    assert "1e+06" in f.evidence and f.advice[0].startswith("Lower the learning rate (now 10): try 1")


def test_diverging_loss_blow_up_with_and_without_recovery():
    up = [2.3] * 5 + [2.3 * F.DIVERGE_BLOWUP * 2] * 20 + [3.0] * 20
    f = F.detect_diverging_loss(history(steps=steps(loss=up)), RUN)
    assert f.severity == "error" and f.data["ratio"] >= F.DIVERGE_BLOWUP
    recovered = [2.3] * 5 + [2.3 * F.DIVERGE_BLOWUP * 2] * 10 + [0.5] * 60
    assert F.detect_diverging_loss(history(steps=steps(loss=recovered)), RUN).severity == "warning"


def test_diverging_loss_rising_back_above_its_start():
    loss = [2.3 - 0.02 * i for i in range(50)] + [1.3 + 0.05 * i for i in range(40)]
    f = F.detect_diverging_loss(history(steps=steps(loss=loss)), RUN)
    assert f is not None and "rose back" in f.title


@pytest.mark.parametrize("loss", [
    [2.3 * 0.97 ** i for i in range(200)],                       # falls
    [2.3 + 0.2 * math.sin(i * 1.3) for i in range(200)],         # flat and noisy
    [6.9, 2.7, 2.1] + [2.0 * 0.98 ** i for i in range(100)],     # a high first step (raw inputs), then falls
])
def test_no_diverging_loss_for_healthy_or_flat_curves(loss):
    assert F.detect_diverging_loss(history(steps=steps(loss=loss)), RUN) is None


def test_lr_too_low_from_a_flat_loss_and_tiny_updates():
    flat = [2.30 + 0.01 * math.sin(i) for i in range(90)]
    lyr = layers([[0.03, 0.07, 0.08, 0.06]] * 9, utw_rows=[[1e-8, 4e-8, 5e-8, 2e-8]] * 9)
    f = F.detect_lr_too_low(history(steps=steps(loss=flat), layers=lyr), dict(RUN, lr=1e-7))
    assert f is not None and f.severity == "warning" and f.data["update_to_weight"] < F.LR_LOW_MAX_UPDATE
    assert any("try 1e-05" in a for a in f.advice) and any("lr_range_test(" in a for a in f.advice)
    cli = F.detect_lr_too_low(history(steps=steps(loss=flat), layers=lyr), dict(RUN, lr=1e-7, interface="cli"))
    assert any("(--find-lr)" in a for a in cli.advice)
    finder = {"suggested_lr": 2e-3, "method": "steepest descent"}
    g = F.detect_lr_too_low(history(steps=steps(loss=flat), layers=lyr), dict(RUN, lr=1e-7, lr_finder=finder))
    assert g.advice[0].startswith("Raise the learning rate to the LR range test's suggestion, 0.002")


def test_lr_too_low_not_for_zero_gradients_healthy_updates_or_a_falling_loss():
    flat = [2.30 + 0.01 * math.sin(i) for i in range(90)]
    zero = layers([[0.0] * 4] * 9, utw_rows=[[0.0] * 4] * 9)  # a dead network: not the lr's fault
    assert F.detect_lr_too_low(history(steps=steps(loss=flat), layers=zero), RUN) is None
    healthy = layers([[0.05] * 4] * 9, utw_rows=[[2e-3] * 4] * 9)
    assert F.detect_lr_too_low(history(steps=steps(loss=flat), layers=healthy), RUN) is None
    tiny = layers([[0.05] * 4] * 9, utw_rows=[[1e-7] * 4] * 9)
    falling = [2.3 * 0.98 ** i for i in range(90)]
    assert F.detect_lr_too_low(history(steps=steps(loss=falling), layers=tiny), RUN) is None


def test_lr_too_low_with_weights_that_never_move_points_at_the_optimizer():
    flat = [2.30] * 90
    lyr = layers([[0.05] * 4] * 9, utw_rows=[[0.0] * 4] * 9)
    f = F.detect_lr_too_low(history(steps=steps(loss=flat), layers=lyr), RUN)
    assert "did not move at all" in f.evidence and f.advice[0].startswith("Check that the optimizer")


# ---------------------------------------------------------------------------------------------------------
# the data flowing through
# ---------------------------------------------------------------------------------------------------------

def test_softmax_before_cross_entropy():
    probs = history(loss_inputs={"steps": [1, 11, 21], "min": [1e-9, 1e-7, 0.0], "prob_rows": [1.0, 1.0, 1.0]})
    f = F.detect_softmax_before_cross_entropy(probs, RUN)
    assert f.severity == "error" and f.data["steps_with_probabilities"] == 3
    # seen on the model's output (no watch_loss_input call): a warning, worded for what was seen
    outputs = history(loss_inputs={"steps": [1, 11, 21], "min": [0.0] * 3, "prob_rows": [1.0] * 3,
                                   "source": ["model_output"] * 3})
    g = F.detect_softmax_before_cross_entropy(outputs, RUN)
    assert g.severity == "warning" and g.data["seen_in"] == "model_output" and "the model's output" in g.evidence
    logits = history(loss_inputs={"steps": [1, 11], "min": [-3.0, -9.0], "prob_rows": [0.0, 0.0]})
    assert F.detect_softmax_before_cross_entropy(logits, RUN) is None
    # non-negative scores whose rows happen not to sum to 1 (e.g. after a ReLU) are not probabilities
    relu_out = history(loss_inputs={"steps": [1, 11], "min": [0.0, 0.0], "prob_rows": [0.02, 0.0]})
    assert F.detect_softmax_before_cross_entropy(relu_out, RUN) is None


@pytest.mark.parametrize("mean,std,lo,hi,expected", [
    (77.4, 82.5, 0.0, 255.0, "raw 0..255 pixels"),
    (4.9, 6.0, 0.0, 16.0, "scale"),               # raw 0..16 digits
    (0.0013, 0.0015, 0.0, 0.0039, "scale"),       # divided by 255 twice
    (0.0, 1.0, -0.9, 2.1, None),                  # normalised
    (0.13, 0.31, 0.0, 1.0, None),                 # [0, 1] pixels: fine
])
def test_unnormalized_input(mean, std, lo, hi, expected):
    h = history(inputs={"steps": [1, 11, 21], "mean": [mean] * 3, "std": [std] * 3, "min": [lo] * 3, "max": [hi] * 3})
    f = F.detect_unnormalized_input(h, RUN)
    if expected is None:
        assert f is None
    else:
        assert f is not None and expected in f.title and f.advice[0].startswith("Scale to [0, 1]")


def test_slow_data_loading_leaves_out_the_first_step_of_each_epoch():
    n = 40
    epoch_of = lambda i: 1 + i // 20  # noqa: E731
    slow = steps(data_time=[0.07] * n, step_time=[0.1] * n, loss=[2.0] * n, epoch_of=epoch_of)
    f = F.detect_slow_data_loading(history(steps=slow), RUN)
    assert f is not None and abs(f.data["data_fraction"] - 0.7) < 1e-9 and f.data["steps"] == n - 2
    assert f.advice[0].startswith("Load in parallel: DataLoader(..., num_workers=1") and f.severity == "warning"
    # a note from 15 %, a warning from 30 %
    for share, severity in ((0.14, None), (0.16, "info"), (0.29, "info"), (0.31, "warning")):
        waits = steps(data_time=[share * 0.1] * n, step_time=[0.1] * n, loss=[2.0] * n, epoch_of=epoch_of)
        found = F.detect_slow_data_loading(history(steps=waits), RUN)
        assert (found and found.severity) == severity, share
    # a tiny model's 1.1 ms step waiting 0.2 ms: the loader's own per-batch cost, not worth a finding
    tiny = steps(data_time=[0.0002] * n, step_time=[0.0011] * n, loss=[2.0] * n, epoch_of=epoch_of)
    assert F.detect_slow_data_loading(history(steps=tiny), RUN) is None
    # fast steps, but the first step of each epoch waits for the workers to start: not slow loading
    data = [2.0 if i % 20 == 0 else 0.001 for i in range(n)]
    total = [2.1 if i % 20 == 0 else 0.02 for i in range(n)]
    fast = steps(data_time=data, step_time=total, loss=[2.0] * n, epoch_of=epoch_of)
    assert F.detect_slow_data_loading(history(steps=fast), RUN) is None
    unknown = steps(data_time=[float("nan")] * n, step_time=[0.1] * n, loss=[2.0] * n)
    assert F.detect_slow_data_loading(history(steps=unknown), RUN) is None


# ---------------------------------------------------------------------------------------------------------
# the whole diagnosis
# ---------------------------------------------------------------------------------------------------------

def test_diagnose_orders_by_severity_and_leaves_out_explained_symptoms():
    loss = [2.3, 2.4, 50.0, float("nan")] + [float("nan")] * 20
    h = history(steps=steps(loss=loss, grad_norm=[1.0, 2.0, 900.0] + [None] * 21),
                epochs=epochs([float("nan")], [float("nan")], [0.1], [0.1]),
                relu={"names": ["r"], "steps": [1, 2, 3], "dead_fraction": [[0.8]] * 3})
    found = diagnose(h, RUN)
    # the cause (the loss diverged) before its symptom (NaN gradients); no underfitting: the NaN loss explains it
    assert kinds(found) == ["diverging_loss", "nonfinite_gradients", "dead_relu"]
    assert [f.severity for f in found] == ["error", "error", "warning"]
    json.dumps(jsonable([f.to_dict() for f in found]), allow_nan=False)


def test_diagnose_drops_underfitting_next_to_lr_too_low():
    flat = [2.30 + 0.01 * math.sin(i) for i in range(90)]
    h = history(steps=steps(loss=flat), layers=layers([[0.05] * 4] * 9, utw_rows=[[1e-8] * 4] * 9),
                epochs=epochs([2.3, 2.3], [2.3, 2.3], [0.1, 0.1], [0.1, 0.1]))
    assert kinds(diagnose(h, RUN)) == ["lr_too_low"]


def test_diagnose_accepts_an_empty_history():
    assert diagnose({}, {}) == []
    assert diagnose(history(steps={}), None) == []

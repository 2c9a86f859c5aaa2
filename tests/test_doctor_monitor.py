"""The Doctor on real (tiny) trainings: each planted pathology gives its finding, a healthy run gives none, the
recorded numbers are exact, the hooks only observe, and the LR range test leaves everything as it found it.

Every training here is a small CNN or MLP on 12x12 digits, a few seconds at most on 2 CPU cores.
"""

import copy
import json
import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from cnnperf.doctor import Doctor, fit, lr_range_test
from cnnperf.doctor.report import jsonable
from cnnperf.doctor.train import classification_metrics, suggest_lr
from cnnperf.nn import FusedConv2dBiasReLU
from cnnperf.zoo.data import load_data
from cnnperf.zoo.optim import make_optimizer

SIDE = 12


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", batch_size=32, image_size=SIDE, seed=0)


def tiny_cnn(classes=10):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(16 * (SIDE // 4) ** 2, 32), nn.ReLU(), nn.Linear(32, classes))


def run(model, optimizer, train_loader, val_loader, epochs, *, sample_every=2, loss_fn=F.cross_entropy,
        limit_batches=None, run_info=None):
    """Train with the CLI's loop; returns (findings, record). The loaders' shuffling restarts from seed 0, so that
    what a test sees does not depend on which tests ran before it in this process."""
    torch.manual_seed(0)
    for loader in (train_loader, val_loader):
        if isinstance(getattr(loader, "generator", None), torch.Generator):
            loader.generator.manual_seed(0)
    with Doctor(model, sample_every=sample_every) as doctor:
        state = fit(model, train_loader, val_loader, optimizer, doctor, epochs=epochs, device="cpu",
                    loss_fn=loss_fn, limit_batches=limit_batches)
        info = {"num_classes": 10, "augment": False, **(run_info or {})}
        metrics = None if state.last_eval is None else classification_metrics(
            state.last_eval.targets, state.last_eval.predictions, list("0123456789"))
        return doctor.report(info, metrics=metrics)


def kinds(found, severities=("warning", "error")):
    return {f.kind: f for f in found if f.severity in severities}


class Mapped:
    """A loader whose images go through ``fn`` (len kept)."""

    def __init__(self, loader, fn):
        self.loader, self.fn = loader, fn

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield self.fn(x), y


# ---------------------------------------------------------------------------------------------------------
# healthy
# ---------------------------------------------------------------------------------------------------------

def test_a_healthy_run_has_no_finding_and_a_complete_record(digits):
    model = tiny_cnn()
    found, record = run(model, torch.optim.Adam(model.parameters(), 3e-3), digits.train_loader, digits.val_loader,
                        3, sample_every=5)
    assert found == [], [f.title for f in found]
    json.dumps(jsonable(record), allow_nan=False)
    assert record["schema"] == "cnnperf.doctor/1" and record["findings"] == []
    h = record["history"]
    n = len(h["steps"]["step"])
    assert n == 3 * len(digits.train_loader) and h["steps"]["step"] == list(range(1, n + 1))
    assert all(len(v) == n for v in h["steps"].values())
    assert [e["epoch"] for e in h["epochs"]] == [1, 2, 3] and h["epochs"][-1]["val_acc"] > 0.8
    sampled = list(range(1, n + 1, 5))
    assert h["layers"]["steps"] == sampled and h["relu"]["steps"] == sampled and h["inputs"]["steps"] == sampled
    assert h["layers"]["names"] == [name for name, _ in model.named_parameters()]
    assert all(len(row) == 8 for row in h["layers"]["update_to_weight"])
    assert h["relu"]["names"] == ["1", "4", "8"]
    assert all(0 <= v <= 1 for row in h["relu"]["dead_fraction"] for v in row)
    assert record["run"]["optimizer"] == "adam" and record["run"]["parameters"] == sum(
        p.numel() for p in model.parameters())
    assert record["best_epoch"] == 3 and record["metrics"]["accuracy"] == h["epochs"][-1]["val_acc"]
    assert all(v > 0 for v in h["steps"]["data_time"]) and all(v > 0 for v in h["steps"]["step_time"][1:])
    acts = h["activations"]
    assert acts["names"] == ["1", "4", "8"] and acts["steps"] == sampled  # every activation module, in order
    assert all(v > 0 for row in acts["spread"] for v in row)
    assert record["run"]["interface"] == "api" and record["run"]["monitor"] == "val_acc"
    assert h["layers"]["weight_norm"][0][0] == pytest.approx(float(h["layers"]["grad_norm"][0][0] /
                                                                   h["layers"]["grad_to_weight"][0][0]), rel=1e-5)


def _train_watched(doctor, model, loader, steps_per_epoch, epochs):
    """A user's loop with the doctor's calls (no watch_loss_input), ``steps_per_epoch`` steps an epoch."""
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(epochs):
        for i, (x, y) in enumerate(doctor.watch_loader(loader)):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            doctor.after_backward(loss)
            opt.step()
            doctor.after_step(opt)
            if i + 1 == steps_per_epoch:
                break
        doctor.end_epoch(val_acc=0.5)


def test_save_writes_the_reports_from_a_users_loop(digits, tmp_path):
    model = tiny_cnn()
    with Doctor(model, sample_every=5) as doctor:
        _train_watched(doctor, model, digits.train_loader, 10, 1)
        paths = doctor.save(tmp_path / "out", run={"data": "digits", "num_classes": 10})
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["doctor.json", "report.html"]
        record = json.loads(paths["json"].read_text())
        assert record["run"]["data"] == "digits" and record["history"]["steps"]["step"] == list(range(1, 11))
        assert "cnnperf doctor" in paths["html"].read_text()
        doctor.end_epoch()  # an empty second epoch: saving again replaces both files
        doctor.save(tmp_path / "out")
        assert len(json.loads(paths["json"].read_text())["history"]["epochs"]) == 2
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["doctor.json", "report.html"]


def test_a_softmax_output_is_caught_without_watch_loss_input(digits):
    model = nn.Sequential(tiny_cnn(), nn.Softmax(dim=1))
    with Doctor(model, sample_every=2) as doctor:
        _train_watched(doctor, model, digits.train_loader, 10, 1)  # no watch_loss_input call
        found, record = doctor.report()
    assert record["history"]["loss_inputs"]["source"] == ["model_output"] * 5
    f = next(f for f in found if f.kind == "softmax_before_cross_entropy")
    assert f.severity == "warning" and f.data["steps_with_probabilities"] == 5


def test_dropout_with_p_0_is_no_dropout():
    assert not Doctor(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0))).model_facts()["dropout"]
    assert Doctor(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2))).model_facts()["dropout"]


def _manual_loop(model, loader, steps, doctor=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(1)
    batches = iter(loader)
    for _ in range(steps):
        x, y = next(batches)
        logits = model(x)
        if doctor is not None:
            doctor.watch_loss_input(logits, y)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        if doctor is not None:
            doctor.after_backward(loss)
        opt.step()
        if doctor is not None:
            doctor.after_step(opt)
        with torch.no_grad():  # a validation pass in eval mode in between: not recorded
            model.eval()
            model(x)
            model.train()
    return model


def test_the_doctor_never_changes_the_training_and_removes_its_hooks(digits):
    data = DataLoader(Subset(digits.train_loader.dataset, range(256)), batch_size=32, shuffle=False)
    alone = _manual_loop(tiny_cnn().train(), data, 8)
    watched_model = tiny_cnn().train()
    with Doctor(watched_model, sample_every=3) as doctor:
        watched = _manual_loop(watched_model, data, 8, doctor)
        assert doctor.relu["steps"] == [] and doctor.history()["relu"]["steps"] == [1, 4, 7]
    for (name, a), b in zip(alone.state_dict().items(), watched.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in watched.modules())


def test_hooks_are_armed_on_sampled_steps_only():
    model = tiny_cnn()
    doctor = Doctor(model, sample_every=4)
    x, y = torch.randn(16, 1, SIDE, SIDE), torch.randint(10, (16,))
    armed = []
    for _ in range(9):
        armed.append(bool(model[1]._forward_hooks) and bool(model._forward_pre_hooks))
        loss = F.cross_entropy(model(x), y)
        model.zero_grad()
        loss.backward()
        doctor.after_backward(loss)
    assert armed == [True, False, False, False, True, False, False, False, True]
    doctor.close()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert doctor.history()["relu"]["steps"] == [1, 5, 9]


def test_copies_of_a_watched_model_carry_no_doctor():
    import io

    model = tiny_cnn()
    doctor = Doctor(model)  # hooks armed for step 1
    copied = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the whole module, hooks included: must pickle
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    for other in (copied, loaded):
        other(torch.randn(16, 1, SIDE, SIDE))  # a training-mode forward of the copy
    assert not doctor._captured and doctor._act_acc == {} and doctor._input_stats is None
    model(torch.randn(16, 1, SIDE, SIDE))
    assert doctor._captured and len(doctor._act_acc) == 3
    doctor.close()


def test_dead_fractions_of_inplace_reused_and_fused_relus_are_exact():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = FusedConv2dBiasReLU(1, 4, 1)  # post-ReLU output
            self.fc = nn.Linear(4 * 2 * 2, 4)
            self.relu = nn.ReLU(inplace=True)  # called twice per forward

        def forward(self, x):
            h = self.relu(self.fc(self.conv(x).flatten(1)))
            return self.relu(h - torch.tensor([1e3, 0.0, 0.0, 0.0]))

    net = Net()
    with torch.no_grad():
        net.conv.weight.zero_()
        net.conv.bias.copy_(torch.tensor([1.0, -1.0, 1.0, -1.0]))  # channels 1 and 3 dead everywhere: 50 %
        net.fc.weight.zero_()
        net.fc.bias.copy_(torch.tensor([1.0, -5.0, -5.0, -5.0]))  # 3 of 4 units dead
    doctor = Doctor(net, sample_every=1)
    loss = net(torch.randn(16, 1, 2, 2)).sum()
    loss.backward()
    doctor.after_backward(loss)
    relu = doctor.history()["relu"]
    assert relu["names"] == ["conv", "relu"]
    # relu: first call 3 of 4 dead, second call 4 of 4 (unit 0 pushed down too): (3 + 4) / 8
    assert relu["dead_fraction"] == [[0.5, 7 / 8]]


def test_activation_spreads_and_input_stats_are_exact():
    """The spread of a unit between inputs, sqrt(mean((a - b)^2) / 2) over SPREAD_PAIRS pairs of images (the
    first against the next), a module called twice pooling both calls; the input's stats over INPUT_STAT_IMAGES
    images. Against float64 sums written out here."""
    from cnnperf.doctor import monitor

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.tanh = nn.Tanh()
            self.relu = nn.ReLU()  # called twice per forward
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(self.relu(self.relu(self.tanh(x)) - 0.25))

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(21, 6)  # an odd batch larger than 2 * SPREAD_PAIRS: only the first 16 images count
    doctor = Doctor(net, sample_every=1)
    loss = net(x).sum()
    loss.backward()
    doctor.after_backward(loss)
    h = doctor.history()
    p = monitor.SPREAD_PAIRS

    def spread(*acts):  # float64: every call's squared differences over the pairs, pooled
        sq = sum(((a[:p].double() - a[p:2 * p].double()) ** 2).sum() for a in acts)
        return math.sqrt(sq / (2 * sum(a[:p].numel() for a in acts)))

    t = torch.tanh(x)
    r1 = torch.relu(t)
    r2 = torch.relu(r1 - 0.25)
    assert h["activations"]["names"] == ["tanh", "relu"]
    assert h["activations"]["spread"][0] == pytest.approx([spread(t), spread(r1, r2)], rel=1e-5)
    dead = [int((r.amax(dim=0) <= 0).sum()) for r in (r1, r2)]
    assert h["relu"]["dead_fraction"] == [[pytest.approx(sum(dead) / 12)]]
    first = x[:monitor.INPUT_STAT_IMAGES].double()
    stats = {k: h["inputs"][k][0] for k in ("mean", "std", "min", "max")}
    assert stats == pytest.approx({"mean": float(first.mean()), "std": float(first.std()),
                                   "min": float(first.min()), "max": float(first.max())}, rel=1e-5)


def test_per_layer_norms_and_ratios_are_exact():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    lr = 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    doctor = Doctor(model, sample_every=2)
    x, y = torch.randn(8, 6), torch.randint(3, (8,))
    for step in range(3):
        weights = [p.detach().clone() for p in model.parameters()]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        doctor.after_backward(loss)
        opt.step()
        doctor.after_step(opt)
        if step == 2:
            expected = (weights, grads)
    h = doctor.history()
    weights, grads = expected
    assert h["layers"]["steps"] == [1, 3]
    g = torch.tensor([t.norm().item() for t in grads])
    w = torch.tensor([t.norm().item() for t in weights])
    torch.testing.assert_close(torch.tensor(h["layers"]["grad_norm"][1]), g)
    torch.testing.assert_close(torch.tensor(h["layers"]["grad_to_weight"][1]), g / w)
    torch.testing.assert_close(torch.tensor(h["layers"]["update_to_weight"][1]), lr * g / w)  # plain SGD: lr * g
    total = torch.sqrt((g ** 2).sum()).item()
    assert math.isclose(h["steps"]["grad_norm"][2], total, rel_tol=1e-5)
    assert h["steps"]["lr"] == [lr] * 3


def test_norms_under_a_grad_scaler_are_unscaled():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    doctor = Doctor(model, sample_every=1)
    x, y = torch.randn(8, 6), torch.randint(3, (8,))
    loss = F.cross_entropy(model(x), y)
    loss.backward(retain_graph=True)
    plain = [p.grad.norm().item() for p in model.parameters()]
    model.zero_grad()
    scaler.scale(loss).backward()  # the gradients carry the scale
    doctor.after_backward(loss, scaler=scaler)
    h = doctor.history()
    torch.testing.assert_close(torch.tensor(h["layers"]["grad_norm"][0]), torch.tensor(plain))
    assert doctor.model_facts()["grad_scaler"] is True


def test_watch_loader_and_data_wait_record_the_waits():
    model = tiny_cnn()
    doctor = Doctor(model)

    class Sleepy:
        def __len__(self):
            return 3

        def __iter__(self):
            for _ in range(3):
                time.sleep(0.03)
                yield torch.randn(8, 1, SIDE, SIDE), torch.randint(10, (8,))

    loader = doctor.watch_loader(Sleepy())
    assert len(loader) == 3
    for x, y in loader:
        time.sleep(0.01)
        doctor.data_wait(0.01)  # a wait the loop measured itself adds to what the wrapper measured
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        doctor.after_backward(loss)
    steps = doctor.history()["steps"]
    assert all(0.04 <= d < 0.5 for d in steps["data_time"])
    assert all(t >= d for t, d in zip(steps["step_time"], steps["data_time"]))


def test_doctor_checks_its_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        Doctor(lambda x: x)
    with pytest.raises(ValueError, match="sample_every"):
        Doctor(tiny_cnn(), sample_every=0)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Doctor(frozen)


# ---------------------------------------------------------------------------------------------------------
# planted pathologies
# ---------------------------------------------------------------------------------------------------------

def test_softmax_before_cross_entropy(digits):
    model = nn.Sequential(tiny_cnn(), nn.Softmax(dim=1))
    found, _ = run(model, torch.optim.Adam(model.parameters(), 3e-3), digits.train_loader, digits.val_loader, 1,
                   limit_batches=10)
    f = kinds(found)["softmax_before_cross_entropy"]
    assert f.severity == "error" and f.data["steps_with_probabilities"] == f.data["steps"] == 5


def test_raw_pixel_inputs(digits):
    mean, std = digits.mean[0], digits.std[0]
    raw = lambda x: ((x * std + mean) * 255).round()  # noqa: E731  back to 0..255 pixels
    model = tiny_cnn()
    found, _ = run(model, torch.optim.Adam(model.parameters(), 3e-3), Mapped(digits.train_loader, raw),
                   Mapped(digits.val_loader, raw), 1, limit_batches=10)
    f = kinds(found)["unnormalized_input"]
    assert "raw 0..255" in f.title and f.data["max"] == 255


def test_lr_10_diverges(digits):
    model = tiny_cnn()
    found, record = run(model, make_optimizer("sgd", model.parameters(), lr=10.0), digits.train_loader,
                        digits.val_loader, 1, limit_batches=20, run_info={"lr": 10.0})
    f = kinds(found)["diverging_loss"]
    assert f.severity == "error" and f.advice[0].startswith("Lower the learning rate (now 10): try 1")
    assert found[0].severity == "error"
    assert "lr_too_low" not in kinds(found) and "underfitting" not in kinds(found)


def test_lr_1e_7_is_too_low(digits):
    model = tiny_cnn()
    found, _ = run(model, make_optimizer("sgd", model.parameters(), lr=1e-7), digits.train_loader,
                   digits.val_loader, 1, limit_batches=30)
    # The loader's share of the step is timed: a loaded machine (the suite on 2 workers) may add that finding.
    assert [k for k in kinds(found) if k != "slow_data_loading"] == ["lr_too_low"]
    assert kinds(found)["lr_too_low"].data["update_to_weight"] < 1e-6


def test_deep_sigmoid_mlp_has_vanishing_gradients(digits):
    torch.manual_seed(0)
    layers = [nn.Flatten(), nn.Linear(SIDE * SIDE, 64), nn.Sigmoid()]
    for _ in range(8):
        layers += [nn.Linear(64, 64), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(64, 10))
    found, _ = run(model, make_optimizer("sgd", model.parameters(), lr=0.05), digits.train_loader,
                   digits.val_loader, 1, limit_batches=12)
    f = kinds(found)["vanishing_gradients"]
    assert f.data["median_growth"] > 1e3 and f.advice[0].startswith("Replace the sigmoid/tanh activations (9 ")


class FakeClock:
    """The Doctor's clock (its module's ``time``), moved only by ``sleep``: timings that no machine load can
    change."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class SlowDataset(Dataset):
    def __init__(self, base, delay, sleep=time.sleep):
        self.base, self.delay, self.sleep = base, delay, sleep

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.sleep(self.delay)
        return self.base[i]


def test_slow_data_loading(digits, monkeypatch):
    # 10 ms per image: 160 ms per batch of 16, against 20 ms of compute per step, on a fake clock (a real one
    # once measured 0.5985 on a loaded machine)
    from cnnperf.doctor import monitor

    clock = FakeClock()
    monkeypatch.setattr(monitor, "time", clock)
    loader = DataLoader(SlowDataset(Subset(digits.train_loader.dataset, range(112)), 0.01, clock.sleep),
                        batch_size=16)
    model = tiny_cnn()
    model.register_forward_pre_hook(lambda module, args: clock.sleep(0.02))
    found, _ = run(model, torch.optim.Adam(model.parameters(), 3e-3), loader, None, 1,
                   run_info={"num_workers": 0})
    f = kinds(found)["slow_data_loading"]
    assert f.data["data_fraction"] == pytest.approx(160 / 180) and f.data["steps"] == 6
    assert "num_workers" in f.advice[0]


def test_dead_relu_from_a_huge_negative_bias(digits):
    model = tiny_cnn()
    with torch.no_grad():
        model[7].bias.fill_(-100.0)  # the hidden linear layer before the last ReLU
    found, _ = run(model, torch.optim.Adam(model.parameters(), 3e-3), digits.train_loader, digits.val_loader, 1,
                   limit_batches=10)
    f = kinds(found)["dead_relu"]
    assert f.severity == "error" and f.data["layers"]["8"]["dead_fraction"] == 1.0 and f.data["from_start"]
    assert "lr_too_low" not in kinds(found)  # zero gradients are not the learning rate's fault


def test_overfitting_on_a_tiny_training_subset(digits):
    train = DataLoader(Subset(digits.train_loader.dataset, range(0, 1400, 20)), batch_size=35, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(Subset(digits.val_loader.dataset, range(180)), batch_size=180)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 10))
    found, record = run(model, torch.optim.Adam(model.parameters(), 3e-3), train, val, 20, sample_every=5,
                        run_info={"dropout": False, "weight_decay": 0.0})
    f = kinds(found)["overfitting"]
    assert f.data["val_loss_rising"] and f.data["best_epoch"] < 10
    assert record["best_epoch"] == f.data["best_epoch"] and record["early_stop_epoch"] == f.data["early_stop_epoch"]
    assert f.advice[0].startswith("Keep the weights of the best epoch by validation accuracy, "
                                  f"{f.data['best_epoch']}: train {f.data['best_epoch']} epochs, or")


# ---------------------------------------------------------------------------------------------------------
# the LR range test
# ---------------------------------------------------------------------------------------------------------

def test_lr_range_test_works_on_copies_and_leaves_the_generators_alone(digits):
    model = tiny_cnn()
    optimizer = make_optimizer("sgd", model.parameters())
    before = copy.deepcopy(model.state_dict())
    opt_before = copy.deepcopy(optimizer.state_dict())
    rng = torch.get_rng_state()
    digits.train_loader.generator.manual_seed(0)  # the same batches whichever tests ran before
    shuffle = digits.train_loader.generator.get_state()
    result = lr_range_test(model, optimizer, digits.train_loader, device="cpu", steps=60)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert optimizer.state_dict() == opt_before
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(digits.train_loader.generator.get_state(), shuffle)
    lrs = result["lrs"]
    assert lrs[0] == pytest.approx(1e-7) and all(b > a for a, b in zip(lrs, lrs[1:]))
    assert len(result["losses"]) == len(lrs) and result["method"] in ("steepest descent", "min loss / 10")
    # SGD's loss explodes well before lr 10: the test stops early
    assert result["stopped_early"] and len(lrs) < 60
    assert 1e-4 < result["suggested_lr"] < 1.0


def test_suggest_lr_steepest_descent_or_min_loss_over_ten():
    lrs = [10 ** (-7 + 8 * i / 49) for i in range(50)]
    losses = [2.3 - 2.0 / (1 + math.exp(-(math.log10(lr) + 3) * 3)) for lr in lrs]  # falls fastest at 1e-3
    losses[-5:] = [losses[-6] * (1.5 + i) for i in range(5)]  # then explodes
    lr, method = suggest_lr(lrs, losses)
    assert method == "steepest descent" and 3e-4 < lr < 3e-3
    lr, method = suggest_lr(lrs[:5], [2.3, 2.2, 2.1, 2.0, 2.5])
    assert method == "min loss / 10" and lr == pytest.approx(lrs[3] / 10)
    assert suggest_lr([], []) == (None, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_synchronisation_on_unsampled_steps():
    model = tiny_cnn().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    doctor = Doctor(model, sample_every=100)
    x, y = torch.randn(32, 1, SIDE, SIDE, device="cuda"), torch.randint(10, (32,), device="cuda")

    def step():
        logits = model(x)
        doctor.watch_loss_input(logits, y)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        doctor.after_backward(loss)
        opt.step()
        doctor.after_step(opt)

    step()  # sampled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(doctor.history()["steps"]["loss"]) == 6


# ---------------------------------------------------------------------------------------------------------
# TensorBoard
# ---------------------------------------------------------------------------------------------------------

class FakeWriter:
    def __init__(self):
        self.scalars, self.texts, self.flushes = [], [], 0

    def add_scalar(self, tag, value, global_step):
        self.scalars.append((tag, value, global_step))

    def add_text(self, tag, text, global_step):
        self.texts.append((tag, text, global_step))

    def flush(self):
        self.flushes += 1


def test_the_writer_gets_each_recorded_value_once(digits):
    model, writer = tiny_cnn(), FakeWriter()
    with Doctor(model, sample_every=4, writer=writer) as doctor:
        _train_watched(doctor, model, digits.train_loader, 8, 2)
        found, record = doctor.report()
    h = record["history"]
    tags = [t for t, _, _ in writer.scalars]
    assert tags.count("doctor/loss") == tags.count("doctor/grad_norm") == 16  # every step, once
    assert [s for t, _, s in writer.scalars if t == "doctor/loss"] == list(range(1, 17))
    loss = dict((s, v) for t, v, s in writer.scalars if t == "doctor/loss")
    assert [loss[s] for s in range(1, 17)] == h["steps"]["loss"]
    name = h["layers"]["names"][0]
    norms = [(s, v) for t, v, s in writer.scalars if t == f"doctor/grad_norm/{name}"]
    assert norms == [(s, row[0]) for s, row in zip(h["layers"]["steps"], h["layers"]["grad_norm"])]
    assert tags.count("doctor/dead_relu/1") == tags.count("doctor/activation_spread/8") == len(h["relu"]["steps"])
    assert [s for t, _, s in writer.scalars if t == "doctor/epoch/val_acc"] == [8, 16] and writer.flushes == 2
    assert writer.texts and writer.texts[-1][0] == "doctor/findings" and writer.texts[-1][2] == 16
    with pytest.raises(TypeError, match="writer must have add_scalar and add_text"):
        Doctor(model, writer=object())


def test_a_real_summary_writer_can_be_read_back(digits, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model = tiny_cnn()
    with SummaryWriter(tmp_path) as writer, Doctor(model, sample_every=4, writer=writer) as doctor:
        _train_watched(doctor, model, digits.train_loader, 8, 1)
        doctor.report()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "doctor/loss" in scalars and "doctor/grad_norm/0.weight" in scalars
    assert [e.step for e in events.Scalars("doctor/loss")] == list(range(1, 9))
    assert "doctor/findings/text_summary" in events.Tags()["tensors"]

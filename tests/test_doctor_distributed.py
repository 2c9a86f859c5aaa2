"""The Doctor under torch.distributed: 2 CPU processes on gloo, each watching its DistributedDataParallel copy of
one tiny CNN (and, separately, an FSDP2-sharded one) on its own shard of the data. No rank may hang, every rank
must get the same record (losses averaged over the ranks, waits the slowest rank's, gradient norms the global
ones), and only rank 0 writes the report."""

import importlib.util
import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from gloo import WORLD, free_port, join, torchrun_cnnperf
from torch import nn

STEPS, EPOCHS = 6, 2

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")


def _tiny_cnn():
    torch.manual_seed(0)  # the same weights on both ranks
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10))


def _batches(rank):
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own shard, as under a DistributedSampler
    return [(torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen))
            for _ in range(STEPS)]


def _train(model, doctor, rank):
    """The user's loop; each rank's local losses and waits, to check the combined record against."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    local_losses, local_waits = [], []
    for _ in range(EPOCHS):
        for x, y in _batches(rank):
            wait = 0.002 * (rank + 1)  # rank 1 waits longer for its data: the record keeps the slowest
            time.sleep(wait)
            doctor.data_wait(wait)
            local_waits.append(wait)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            doctor.after_backward(loss)
            opt.step()
            doctor.after_step(opt)
            local_losses.append(float(loss.detach()))
        doctor.end_epoch(train_acc=0.1 * (rank + 1), val_acc=0.2 * (rank + 1))  # the mean is kept
    return local_losses, local_waits


def _worker(rank, port, out_dir, results):
    os.environ.setdefault("CNNPERF_BACKEND", "reference")
    join(rank, port)
    try:
        from torch.distributed.fsdp import fully_shard
        from torch.nn.parallel import DistributedDataParallel

        from cnnperf.doctor import Doctor

        model = DistributedDataParallel(_tiny_cnn())
        with Doctor(model, sample_every=3) as doctor:
            losses, waits = _train(model, doctor, rank)
            _, record = doctor.report({"num_classes": 10})
            paths = doctor.save(out_dir, {"num_classes": 10})
        sharded = _tiny_cnn()
        for layer in sharded:
            if any(True for _ in layer.parameters(recurse=False)):
                fully_shard(layer)
        fully_shard(sharded)
        with Doctor(sharded, sample_every=3) as fsdp_doctor:
            _train(sharded, fsdp_doctor, rank)
            _, fsdp_record = fsdp_doctor.report({"num_classes": 10})
        results[rank] = {"record": json.loads(json.dumps(record, default=str)), "losses": losses, "waits": waits,
                         "paths": {k: str(v) for k, v in paths.items()}, "world": doctor.world_size,
                         "fsdp": json.loads(json.dumps(fsdp_record, default=str))}
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("doctor") / "out"
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), str(out), results), nprocs=WORLD, join=True)
    return [results[rank] for rank in range(WORLD)], out


def test_every_rank_gets_the_same_combined_record(per_rank):
    (first, second), _ = per_rank
    assert first["world"] == second["world"] == WORLD and first["record"]["run"]["world_size"] == WORLD
    for key in ("history", "findings", "best_epoch", "early_stop_epoch"):  # (as text: NaN == NaN there)
        assert json.dumps(first["record"][key], sort_keys=True) == json.dumps(second["record"][key],
                                                                              sort_keys=True), key
    steps = first["record"]["history"]["steps"]
    assert steps["loss"] == pytest.approx([(a + b) / 2 for a, b in zip(first["losses"], second["losses"])],
                                          rel=1e-5)
    assert steps["data_time"] == pytest.approx([max(a, b) for a, b in zip(first["waits"], second["waits"])])
    epochs = first["record"]["history"]["epochs"]
    assert [e["train_acc"] for e in epochs] == pytest.approx([0.15] * EPOCHS)
    assert [e["val_acc"] for e in epochs] == pytest.approx([0.3] * EPOCHS)
    assert first["record"]["history"]["layers"]["steps"] == [1, 4, 7, 10]


def test_only_rank_0_writes_the_report(per_rank):
    (first, second), out = per_rank
    assert first["paths"] == second["paths"]
    assert sorted(p.name for p in out.iterdir()) == ["doctor.json", "report.html"]
    assert json.loads((out / "doctor.json").read_text())["run"]["world_size"] == WORLD


def test_fsdp2_gradient_norms_are_the_global_ones(per_rank):
    (first, second), _ = per_rank
    a, b = first["fsdp"]["history"], second["fsdp"]["history"]
    assert a["steps"]["grad_norm"] == pytest.approx(b["steps"]["grad_norm"])
    flat = lambda rows: [v for row in rows for v in row]  # noqa: E731
    assert flat(a["layers"]["grad_norm"]) == pytest.approx(flat(b["layers"]["grad_norm"]))
    assert flat(a["layers"]["weight_norm"]) == pytest.approx(flat(b["layers"]["weight_norm"]))
    # the whole weights' norms, not one shard's: the same as the DDP run's at its first sample (same weights)
    ddp_layers = first["record"]["history"]["layers"]
    assert a["layers"]["weight_norm"][0] == pytest.approx(ddp_layers["weight_norm"][0], rel=1e-5)
    assert flat(a["layers"]["grad_norm"]) == pytest.approx(flat(ddp_layers["grad_norm"]), rel=1e-3)
    # the same training as DDP's: the gradients are the mean over the shards either way
    ddp = first["record"]["history"]
    assert a["steps"]["grad_norm"] == pytest.approx(ddp["steps"]["grad_norm"], rel=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torch.distributed.run") is None, reason="torchrun is not available")
def test_cnnperf_doctor_under_torchrun(tmp_path):
    out = tmp_path / "out"
    proc = torchrun_cnnperf("doctor", "--data", "fake", "--epochs", "2", "--batch-size", "16", "--limit-batches",
                            "4", "--sample-every", "2", "--find-lr", "--out", str(out))
    assert sorted(p.name for p in out.iterdir()) == ["doctor.json", "report.html"]
    assert proc.stdout.count("doctor.json") == 1 and "x 2 processes" in proc.stdout  # rank 0 alone speaks
    record = json.loads((out / "doctor.json").read_text())
    assert record["run"]["world_size"] == WORLD and record["run"]["epochs_done"] == 2
    assert record["history"]["steps"]["step"] == list(range(1, 9)) and record["lr_finder"]["suggested_lr"]

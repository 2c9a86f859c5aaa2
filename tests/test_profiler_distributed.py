"""``cnnperf.profile`` under torch.distributed: 2 CPU processes on gloo, each profiling its own
DistributedDataParallel copy of one tiny CNN. Every rank must take the same path (same variants, same
recommendation, the slowest rank's times), the record must carry the per-rank medians, and the user's DDP model
must come out untouched. Then ``cnnperf profile`` under torchrun: all ranks measure, rank 0 writes one report."""

import importlib.util
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gloo import WORLD, free_port, join, torchrun_cnnperf
from torch import nn

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")


def _tiny_cnn():
    torch.manual_seed(0)  # the same weights on both ranks (DDP would broadcast rank 0's anyway)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10))


def _batch(rank):
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own shard, as under a DistributedSampler
    return torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.01)


def _worker(rank, port, results):
    os.environ.setdefault("CNNPERF_BACKEND", "reference")
    join(rank, port)
    try:
        from torch.nn.parallel import DistributedDataParallel

        import cnnperf
        from cnnperf.profiler import core

        # Every kept variant goes to the confirmation, for a few short rounds: its rounds are timed on each rank,
        # and the record must still be the same on both (it holds the slowest rank's times).
        core._Profiler._contenders = lambda self: [name for name in self.kept if name != core.BASELINE]
        core.CONFIRM_MIN_S, core.CONFIRM_ROUNDS = 0, 3
        model = DistributedDataParallel(_tiny_cnn())
        before = {k: v.clone() for k, v in model.state_dict().items()}
        rng_before = torch.get_rng_state()
        result = cnnperf.profile(model, nn.functional.cross_entropy, _batch(rank), _sgd,
                                 variants=["channels_last", "fuse"], steps=4, warmup=1, top_ops=False,
                                 batch_sizes=None)
        after = model.state_dict()
        untouched = (before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
                     and all(p.grad is None for p in model.parameters())
                     and torch.equal(rng_before, torch.get_rng_state()))
        # "auto" (the default) must not sweep under DDP: an OOM on one rank would stall the others.
        auto = cnnperf.profile(model, nn.functional.cross_entropy, _batch(rank), _sgd, variants=["channels_last"],
                               steps=2, warmup=0, check_steps=1, top_ops=False, batch_sizes="auto")
        results[rank] = {"record": json.loads(json.dumps(result.record)), "recommended": result.recommended,
                         "untouched": untouched, "auto_sweep": auto.record.get("batch_sweep"),
                         "auto_world": auto.record["run"]["world_size"],
                         "auto_names": [r["name"] for r in auto.variants]}
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def per_rank():
    """Each rank's results, from one pair of processes for the whole module (starting them is the slow part)."""
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), results), nprocs=WORLD, join=True)
    return [results[rank] for rank in range(WORLD)]


def test_rows_carry_every_rank_and_the_run_its_world_size(per_rank):
    record = per_rank[0]["record"]
    assert record["run"]["world_size"] == WORLD
    names = [r["name"] for r in record["variants"]]
    assert names[:3] == ["eager", "channels_last", "fuse"], names
    assert set(names) <= {"eager", "channels_last", "fuse", "channels_last+fuse"}, names
    ok = [r for r in record["variants"] if r["status"] == "ok"]
    assert [r["name"] for r in ok][:1] == ["eager"], record["variants"]
    for row in ok:
        ranks = row["ranks"]
        assert ranks is not None and len(ranks["median_ms"]) == WORLD, row
        assert all(m > 0 for m in ranks["median_ms"])
        assert ranks["spread"] >= 0
        assert ranks["spread"] == pytest.approx(max(ranks["median_ms"]) / min(ranks["median_ms"]) - 1)
        assert row["median_ms"] == max(ranks["median_ms"])  # a data-parallel step waits for the slowest rank
        # images/s counts the images of all ranks
        assert row["images_per_s"] == pytest.approx(8 * WORLD / (row["median_ms"] / 1e3))
    for row in record["variants"][1:]:
        if row["status"] == "ok":
            assert row["check"] is not None and row["check"]["passed"], row
    rec = record["recommendation"]
    assert rec is not None and rec["variant"] in names and rec["summary"]
    assert record["batch_sweep"] is None
    assert record["run"]["interrupted"] is False


def test_all_ranks_take_the_same_path(per_rank):
    first, second = per_rank
    assert first["recommended"] == second["recommended"] == first["record"]["recommendation"]["variant"]
    assert [r["name"] for r in first["record"]["variants"]] == [r["name"] for r in second["record"]["variants"]]
    # every number a choice is made from is the gathered one, so both ranks hold the same rows
    keys = ("name", "status", "median_ms", "speedup", "ranks", "check")
    assert ([{k: r[k] for k in keys} for r in first["record"]["variants"]]
            == [{k: r[k] for k in keys} for r in second["record"]["variants"]])
    assert first["record"]["recommendation"]["confirmation"]["rounds"] >= 3
    assert first["record"]["recommendation"] == second["record"]["recommendation"]
    assert first["record"]["run"]["load_average"] == second["record"]["run"]["load_average"]


def test_the_users_ddp_model_is_untouched_on_every_rank(per_rank):
    assert [r["untouched"] for r in per_rank] == [True] * WORLD


def test_auto_batch_sizes_is_no_sweep_under_ddp(per_rank):
    for r in per_rank:
        assert r["auto_sweep"] is None and r["auto_world"] == WORLD
        assert r["auto_names"] == ["eager", "channels_last"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("torch.distributed.run") is None, reason="torchrun is not available")
def test_cnnperf_profile_under_torchrun(tmp_path):
    out = tmp_path / "out"
    proc = torchrun_cnnperf("profile", "--model", "convnet", "--data", "fake", "--batch-size", "16", "--steps",
                            "3", "--warmup", "1", "--variants", "channels_last", "--batch-sizes", "none",
                            "--budget", "60", "--out", str(out))
    assert sorted(p.name for p in out.iterdir()) == ["profile.json", "report.html"]  # no stray temporary files
    assert proc.stdout.count("profile.json") == 1, proc.stdout  # rank 0 alone writes (and says so)

    def reject(constant):
        raise AssertionError(f"profile.json holds {constant}, which is not JSON")

    record = json.loads((out / "profile.json").read_text(), parse_constant=reject)
    assert record["schema"] == "cnnperf.profile/1"
    assert record["run"]["world_size"] == WORLD and record["run"]["model"] == "convnet"
    assert record["run"]["interrupted"] is False
    names = [r["name"] for r in record["variants"]]
    assert names[:2] == ["eager", "channels_last"], names
    for row in record["variants"]:
        if row["status"] == "ok":
            assert len(row["ranks"]["median_ms"]) == WORLD and row["ranks"]["spread"] >= 0
    assert record["recommendation"]["variant"] in names
    assert record["batch_sweep"] is None

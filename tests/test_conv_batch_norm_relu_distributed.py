"""FusedConv2dBatchNormReLU under DistributedDataParallel on 2 CPU processes (gloo): like nn.BatchNorm2d, each
rank normalises with its own batch's statistics and keeps its own running statistics, while DDP averages the
gradients; a fused model (cnnperf.fuse) trains exactly as the unfused one on every rank."""

import copy

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from gloo import WORLD, free_port, join
from torch import nn

STEPS = 3


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8, momentum=None),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).double()


def _worker(rank, port, results):
    join(rank, port)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        import cnnperf

        plain = _model().train()
        fused = cnnperf.fuse(copy.deepcopy(plain))
        assert getattr(fused, cnnperf.fusion.REPORT_ATTRIBUTE).batch_norm == ["1", "4"]
        models = {"plain": DDP(plain), "fused": DDP(fused)}
        opts = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in models.items()}
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data: its own statistics
        for _ in range(STEPS):
            x = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64) + rank
            y = torch.randint(0, 4, (4,), generator=gen)
            for k, m in models.items():
                opts[k].zero_grad()
                F.cross_entropy(m(x), y).backward()
                opts[k].step()
        results[rank] = {k: {n: t.detach().clone() for n, t in m.module.state_dict().items()}
                         for k, m in models.items()}
    finally:
        dist.destroy_process_group()


def test_ddp_per_rank_statistics_like_batchnorm2d():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(free_port(), results), nprocs=WORLD, join=True)
    results = dict(results)
    for rank in range(WORLD):
        plain, fused = results[rank]["plain"], results[rank]["fused"]
        assert list(plain) == list(fused)
        for name in plain:
            torch.testing.assert_close(fused[name], plain[name], rtol=1e-9, atol=1e-9, msg=f"rank {rank}: {name}")
    # Weights are the same on both ranks (DDP), running statistics are each rank's own (its data differ).
    torch.testing.assert_close(results[0]["fused"]["0.weight"], results[1]["fused"]["0.weight"])
    assert not torch.allclose(results[0]["fused"]["1.running_mean"], results[1]["fused"]["1.running_mean"])
    assert results[0]["fused"]["4.num_batches_tracked"].item() == STEPS

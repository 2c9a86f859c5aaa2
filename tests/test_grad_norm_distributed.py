"""clip_grad_norm_ across 2 CPU processes on gloo: sharded gradients give the norm and the clipped gradients of
the unsharded ones, with FSDP2-style DTensor shards and with plain shards plus ``process_group=``, for every kind
of order (p > 0, 0, negative, +-inf); with DTensor shards the total is a DTensor, as torch's clip returns."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from gloo import WORLD, free_port, join

# First dims not all divisible by 2: uneven shards; (1, 3) leaves rank 1 an empty shard, whose partial must be
# the reduce's identity (an error there would leave rank 0 waiting in the all-reduce).
SIZES = [(6, 5), (7,), (3, 3, 2), (10, 4), (1, 3)]


def _full_grads(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen) * 3 for s in SIZES]


MODES = ("dtensor", "process_group", "replicated")
NORM_TYPES = {"triton": (2.0, math.inf),  # the kernels' orders; the others take the reference ops
              "reference": (2.0, math.inf, 1.0, 0.0, -1.0, -math.inf)}


def _worker(rank, port, backend_name, results):
    join(rank, port, CNNPERF_BACKEND=backend_name)
    try:
        for mode in MODES:
            for norm_type in NORM_TYPES[backend_name]:
                results[(rank, mode, norm_type)] = _case(rank, mode, norm_type)
    finally:
        dist.destroy_process_group()


def _kind(total):
    """What a total norm is: a plain tensor, or a DTensor with its placements."""
    if type(total).__name__ == "DTensor":
        return ("DTensor", tuple(str(p) for p in total.placements))
    return (type(total).__name__, ())


def _case(rank, mode, norm_type):
    """(clip's total, grad_norms' total, per-parameter norms, this rank's clipped gradients, what clip returned,
    what torch's clip returns on the same gradients) for one case."""
    import cnnperf

    full = _full_grads()
    if mode == "dtensor":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor
        mesh = init_device_mesh("cpu", (WORLD,))
        params = []
        for g in full:
            p = torch.nn.Parameter(distribute_tensor(torch.zeros_like(g), mesh, [Shard(0)]))
            p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            params.append(p)
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for twin, p in zip(twins, params):
            twin.grad = p.grad.detach().clone()
        # What torch's own clip returns, on the gradients but the last: on rank 1's empty shard of (1, 3) its
        # inf/-inf/negative orders raise on that rank alone (cnnperf's partial there is the reduce's identity).
        torch_kind = _kind(torch.nn.utils.clip_grad_norm_(twins[:-1], 1.0, norm_type))
        norms = cnnperf.grad_norms(params, norm_type)
        total = cnnperf.clip_grad_norm_(params, 1.0, norm_type)
        kind = _kind(total)
        total = total.full_tensor()
        shards = [p.grad.to_local() for p in params]
    elif mode == "process_group":
        params = []
        for g in full:
            shard = torch.tensor_split(g.clone(), WORLD)[rank].contiguous()
            p = torch.nn.Parameter(torch.zeros_like(shard))
            p.grad = shard
            params.append(p)
        norms = cnnperf.grad_norms(params, norm_type, process_group=dist.group.WORLD)
        total = cnnperf.clip_grad_norm_(params, 1.0, norm_type, process_group=dist.group.WORLD)
        kind = torch_kind = _kind(total)
        shards = [p.grad for p in params]
    else:  # replicated gradients (DDP): no communication, each rank clips its full copy
        params = []
        for g in full:
            p = torch.nn.Parameter(torch.zeros_like(g))
            p.grad = g.clone()
            params.append(p)
        norms = cnnperf.grad_norms(params, norm_type)
        total = cnnperf.clip_grad_norm_(params, 1.0, norm_type)
        kind = torch_kind = _kind(total)
        shards = [p.grad for p in params]
    return (total.item(), norms.total.item(), norms.per_param.tolist(), [s.clone() for s in shards], kind,
            torch_kind)


_RESULTS = {}


def _run(backend_name):
    """Every case's results per rank, from one pair of processes per backend (starting them is the slow part)."""
    if backend_name not in _RESULTS:
        manager = mp.Manager()
        results = manager.dict()
        mp.spawn(_worker, args=(free_port(), backend_name, results), nprocs=WORLD, join=True)
        _RESULTS[backend_name] = dict(results)
    return _RESULTS[backend_name]


# "triton" runs the kernels through the interpreter when the test process has TRITON_INTERPRET=1.
BACKENDS = ["reference"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


@pytest.mark.parametrize("backend_name, mode, norm_type", [
    (name, mode, norm_type) for name in BACKENDS for mode in MODES for norm_type in NORM_TYPES[name]])
def test_sharded_matches_unsharded(mode, norm_type, backend_name):
    results = _run(backend_name)
    full = [g.double() for g in _full_grads()]
    norms = torch.stack([torch.linalg.vector_norm(g, norm_type) for g in full])
    expected = torch.linalg.vector_norm(norms, norm_type).item()
    coef = min(1.0, 1.0 / (expected + 1e-6))
    for rank in range(WORLD):
        total, grad_norms_total, per_param, shards, kind, torch_kind = results[(rank, mode, norm_type)]
        # FSDP2: a DTensor as torch's clip returns (torch's placement is Replicate for p=2, Partial(max) for
        # inf, ...; cnnperf's is Replicate: the local value is already the global norm, full_tensor() needs no
        # collective)
        assert kind[0] == torch_kind[0] == ("DTensor" if mode == "dtensor" else "Tensor"), (kind, torch_kind)
        assert kind[1] == (("R",) if mode == "dtensor" else ())
        assert total == pytest.approx(expected, rel=1e-5)  # every rank has the global norm
        assert grad_norms_total == pytest.approx(expected, rel=1e-5)
        assert per_param == pytest.approx(norms.tolist(), rel=1e-5)
        for g, shard in zip(full, shards):
            want = g if mode == "replicated" else torch.tensor_split(g, WORLD)[rank]
            torch.testing.assert_close(shard.double(), want * coef, rtol=1e-5, atol=1e-6)

"""clip_grad_norm_(..., optimizer=opt): the clip applied by a fused optimizer's step (its grad_scale) instead of
scaling the gradients in place, against clip-then-step with torch's own clip, over several steps.

On the CPU (torch's fused SGD/Adam/AdamW have CPU kernels), with and without a GradScaler, including a step whose
gradients hold an inf (both skip it and back the scale off)."""

import math

import pytest
import torch

import cnnperf

OPTIMIZERS = {
    "sgd_nesterov_wd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2,
                                                  fused=True),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, fused=True),
    "adam_wd": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2, fused=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 6 * 6, 5))


def _train(optimizer: str, fold: bool, scaler: bool, steps: int = 4, max_norm: float = 0.3, inf_step=None):
    """Parameters after ``steps`` steps, the totals, the scales, (fold) whether each step's .grad stayed
    unclipped until the step, and the gradients after each step. ``inf_step``: that step's first gradient gets
    an inf."""
    model = _model()
    params = list(model.parameters())
    opt = OPTIMIZERS[optimizer](params)
    sc = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if scaler else None
    gen = torch.Generator().manual_seed(1)
    totals, scales, unclipped, after = [], [], [], []
    for step in range(steps):
        x = torch.randn(4, 3, 6, 6, generator=gen)
        loss = model(x).square().mean() * 10  # gradients well over max_norm: every step clips
        (sc.scale(loss) if sc else loss).backward()
        if step == inf_step:
            params[0].grad.view(-1)[0] = math.inf
        if fold:
            raw = [p.grad.clone() for p in params]
            totals.append(cnnperf.clip_grad_norm_(params, max_norm, optimizer=opt, scaler=sc))
            unclipped.append(all(torch.equal(p.grad, r) for p, r in zip(params, raw)))
        else:
            if sc:
                sc.unscale_(opt)
            totals.append(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if sc:
            scales.append(sc.get_scale())
            sc.step(opt)
            sc.update()
        else:
            opt.step()
        assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")  # nothing left for a later step
        after.append([p.grad.clone() for p in params])
        opt.zero_grad()
    return [p.detach() for p in params], totals, scales, unclipped, after


@pytest.mark.parametrize("scaler", [False, True], ids=["no_scaler", "grad_scaler"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_clip_in_the_step_equals_clip_then_step(optimizer, scaler):
    inf_step = 2 if scaler else None
    folded, totals, scales, unclipped, after = _train(optimizer, True, scaler, inf_step=inf_step)
    expected, expected_totals, expected_scales, _, expected_after = _train(optimizer, False, scaler,
                                                                          inf_step=inf_step)
    assert all(unclipped)  # until the step, .grad keeps its unclipped values
    for i, (grads, expected_grads) in enumerate(zip(after, expected_after)):
        if i != inf_step:  # after it, the clipped (and unscaled) ones, as after clipping in place
            for g, e in zip(grads, expected_grads):
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
    for i, (t, e) in enumerate(zip(totals, expected_totals)):
        if i == inf_step:
            assert not torch.isfinite(t) and not torch.isfinite(e)
        else:
            torch.testing.assert_close(t, e, rtol=1e-5, atol=0)
    assert scales == expected_scales  # the inf step was skipped by both and backed the scale off alike
    if scaler:
        assert scales[inf_step + 1] < scales[inf_step]
    for p, e in zip(folded, expected):
        # grad / (1 / coef) in the fused step against grad * coef then the step: a few fp32 ulps apart
        torch.testing.assert_close(p, e, rtol=1e-5, atol=1e-6)
    moved = _train(optimizer, True, scaler, steps=1)[0]
    assert any(not torch.equal(a, b) for a, b in zip(moved, _model().parameters()))  # a step did happen


def test_a_second_clip_before_the_step_replaces_the_first():
    model = _model()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1, fused=True)
    for p in params:
        p.grad = torch.ones_like(p)
    cnnperf.clip_grad_norm_(params, 100.0, optimizer=opt)
    cnnperf.clip_grad_norm_(params, 1.0, optimizer=opt)
    before = [p.detach().clone() for p in params]
    opt.step()
    total = math.sqrt(sum(p.numel() for p in params))
    for p, b in zip(params, before):
        torch.testing.assert_close(p.detach(), b - 0.1 / (total + 1e-6), rtol=1e-5, atol=1e-7)
    # the next step without a clip is a plain one
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    opt.step()
    for p, b in zip(params, before):
        torch.testing.assert_close(p.detach(), b - 0.1)


@pytest.mark.parametrize("make", [lambda ps: torch.optim.Adam(ps), lambda ps: torch.optim.SGD(ps, lr=0.1)])
def test_a_non_fused_optimizer_is_refused_before_anything_changes(make):
    params = list(_model().parameters())
    for p in params:
        p.grad = torch.ones_like(p)
    opt = make(params)
    with pytest.raises(ValueError, match="fused=True"):
        cnnperf.clip_grad_norm_(params, 1.0, optimizer=opt)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in params) and not hasattr(opt, "grad_scale")


def _dist_worker(rank, port, wrap, results):
    import datetime
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120))
    try:
        finals = []
        for fold in (True, False):
            if wrap == "ddp":
                from torch.nn.parallel import DistributedDataParallel

                model = DistributedDataParallel(_model())
            else:  # FSDP2: DTensor parameters and gradients, sharded over the 2 ranks
                from torch.distributed.device_mesh import init_device_mesh
                from torch.distributed.fsdp import fully_shard

                model = fully_shard(_model(), mesh=init_device_mesh("cpu", (2,)))
            params = list(model.parameters())
            opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
            gen = torch.Generator().manual_seed(10 + rank)  # each rank its own batch
            for _ in range(3):
                model(torch.randn(4, 3, 6, 6, generator=gen)).square().mean().mul(10).backward()
                if fold:
                    cnnperf.clip_grad_norm_(params, 0.3, optimizer=opt)
                else:
                    torch.nn.utils.clip_grad_norm_(params, 0.3)
                opt.step()
                opt.zero_grad()
            finals.append([(p.full_tensor() if wrap == "fsdp2" else p).detach().clone() for p in params])
        results[rank] = finals
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_two_ranks_clip_in_the_step(wrap):
    """DDP (all-reduced gradients) and FSDP2 (sharded DTensor gradients, the norm all-reduced) on 2 CPU processes
    (gloo): every rank takes the same global norm, and the folded clip keeps the ranks' parameters identical and
    equal to clip-then-step with torch's clip."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_dist_worker, args=(port, wrap, results), nprocs=2, join=True)
    (fold0, ref0), (fold1, _) = results[0], results[1]
    for a, b, r in zip(fold0, fold1, ref0):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)

"""What the Doctor costs: training-step time with and without it, on the default ConvNet, LeNet-BN and ResNet-18.

    python bench/bench_doctor.py                       # the three models on the CPU
    python bench/bench_doctor.py --models resnet18 --blocks 6 --device cuda

Cases: the doctor's default ConvNet (1x28x28 digits-sized images, batch 64, Adam), LeNet-5 with BatchNorm (the
same input) and ResNet-18 (CIFAR stem, 3x32x32, batch 32, Adam), each trained on one fixed random batch (no
data loading: only the monitoring is
measured). Two copies of the model with the same weights train side by side: one plain, one with a
:class:`~cnnperf.doctor.Doctor` (``sample_every=10``: watch_loss_input, after_backward, after_step in every
step). They run in alternating blocks of ``sample_every`` steps, so each "doctor" block holds exactly one
sampled step and a drift in the machine's speed (other processes, clock) hits both alike; the order within a
pair alternates too. The overhead is the median of the pairs' ratios (watched / plain block), minus 1, with
their p20-p80. The per-epoch cost of
``end_epoch`` (moving the recorded tensors to the host) is timed on its own, once per block.

On the CPU, glibc malloc's mmap and trim thresholds are fixed first (``cnnperf._malloc``; ``--adaptive-malloc``
keeps glibc's default, whose threshold follows the process's allocation history and makes step times drift;
the record's ``malloc`` says which). Every step is synchronised on CUDA before its clock is read. The record
(device, versions, shapes, per-block times, medians, quantiles, the overhead) is printed as a table and written
as JSON with ``--json PATH``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from cnnperf import _env, _io, _malloc, _timing
from cnnperf.doctor import Doctor
from cnnperf.zoo.models import build_model

CASES = {  # name -> (model, in_channels, image_size, batch)
    "convnet": ("convnet", 1, 28, 64),
    "lenet_bn": ("lenet_bn", 1, 28, 64),
    "resnet18": ("resnet18", 3, 32, 32),
}


def lenet_bn() -> torch.nn.Module:
    """LeNet-5 with BatchNorm after each convolution (issue 15's LeNet-BN): conv 5x5 6 (padding 2), BN, ReLU,
    max-pool, conv 5x5 16, BN, ReLU, max-pool, 120-84-10."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 16, 5), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
TARGET_OVERHEAD = 0.05  # the target: at most 5 % slower steps


def _step(model, optimizer, x, y, doctor, device) -> tuple[float, float, float]:
    """One training step: (whole step, time inside the doctor's calls, forward pass), in seconds."""
    _timing.synchronize(device)
    start = time.perf_counter()
    logits = model(x)  # the doctor's hooks, on sampled steps, run in here
    _timing.synchronize(device)
    forward = time.perf_counter() - start
    calls = 0.0
    if doctor is not None:
        t = time.perf_counter()
        doctor.watch_loss_input(logits, y)
        calls += time.perf_counter() - t
    loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if doctor is not None:
        t = time.perf_counter()
        doctor.after_backward(loss)
        calls += time.perf_counter() - t
    optimizer.step()
    if doctor is not None:
        t = time.perf_counter()
        doctor.after_step(optimizer)
        calls += time.perf_counter() - t
    _timing.synchronize(device)
    return time.perf_counter() - start, calls, forward


def measure(case: str, blocks: int, sample_every: int, device: torch.device) -> dict:
    """Alternating blocks of ``sample_every`` steps, plain and watched; see the module docstring."""
    name, channels, size, batch = CASES[case]
    torch.manual_seed(0)
    plain = (lenet_bn() if name == "lenet_bn" else
             build_model(name, in_channels=channels, num_classes=10, image_size=size)).to(device)
    watched = copy.deepcopy(plain)
    opt_plain = torch.optim.Adam(plain.parameters(), lr=1e-3)
    opt_watched = torch.optim.Adam(watched.parameters(), lr=1e-3)
    x = torch.randn(batch, channels, size, size, device=device)
    y = torch.randint(10, (batch,), device=device)
    doctor = Doctor(watched, sample_every=sample_every)
    runs = {"plain": (plain, opt_plain, None), "doctor": (watched, opt_watched, doctor)}
    for model, opt, doc in runs.values():  # warm-up: allocator, kernels, the first sampled step
        for _ in range(2):
            _step(model, opt, x, y, doc, device)
    while doctor.step % sample_every != 0:  # each block starts on a sampled step
        _step(watched, opt_watched, x, y, doctor, device)
    blocks_s = {"plain": [], "doctor": []}
    plain_forward, calls, forward = [], {True: [], False: []}, {True: [], False: []}
    flush = []
    for b in range(blocks):
        for key in (("plain", "doctor") if b % 2 == 0 else ("doctor", "plain")):
            model, opt, doc = runs[key]
            steps = [_step(model, opt, x, y, doc, device) for _ in range(sample_every)]
            blocks_s[key].append(sum(s[0] for s in steps) / sample_every)
            if key == "plain":
                plain_forward += [s[2] for s in steps]
                continue
            for i, (_, c, f) in enumerate(steps):
                calls[i == 0].append(c)
                forward[i == 0].append(f)
            start = time.perf_counter()
            doctor.end_epoch(train_loss=0.0)
            flush.append(time.perf_counter() - start)
    doctor.close()
    med = statistics.median
    plain_s, doctor_s = med(blocks_s["plain"]), med(blocks_s["doctor"])
    # direct estimate: the time inside the doctor's calls, plus the hooks (the sampled forward's extra time)
    hooks = max(0.0, med(forward[True]) - med(forward[False]))
    per_step = ((sample_every - 1) * med(calls[False]) + med(calls[True]) + hooks) / sample_every
    return {
        "case": case, "model": name, "input": [batch, channels, size, size], "optimizer": "adam",
        "sample_every": sample_every, "blocks": blocks, "parameters": sum(p.numel() for p in plain.parameters()),
        "step_ms_plain": plain_s * 1e3, "step_ms_doctor": doctor_s * 1e3,
        "step_ms_plain_q20_q80": _timing.p20_p80(blocks_s["plain"], scale=1e3),
        "step_ms_doctor_q20_q80": _timing.p20_p80(blocks_s["doctor"], scale=1e3),
        "overhead_ab": statistics.median(d / p for d, p in zip(blocks_s["doctor"], blocks_s["plain"])) - 1,
        "overhead_ab_p20_p80": [r - 1 for r in _timing.p20_p80([d / p for d, p in zip(blocks_s["doctor"],
                                                                                     blocks_s["plain"])])],
        "calls_ms_unsampled": med(calls[False]) * 1e3, "calls_ms_sampled": med(calls[True]) * 1e3,
        "hooks_ms_sampled": hooks * 1e3, "end_epoch_ms": med(flush) * 1e3,
        "doctor_ms_per_step": per_step * 1e3, "overhead_direct": per_step / plain_s,
        "block_ms_plain": [t * 1e3 for t in blocks_s["plain"]],
        "block_ms_doctor": [t * 1e3 for t in blocks_s["doctor"]],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="convnet,lenet_bn,resnet18", help="comma-separated: " + ", ".join(CASES))
    p.add_argument("--blocks", type=int, default=None,
                   help="alternating blocks per model (default: 60 for convnet, 8 for resnet18 on the CPU)")
    p.add_argument("--sample-every", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--adaptive-malloc", action="store_true",
                   help="CPU: keep glibc's adaptive mmap threshold (default: fixed, for steady step times)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the record here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    malloc = _malloc.fix_mmap_threshold() if device.type == "cpu" and not args.adaptive_malloc else None
    cases = [c.strip() for c in args.models.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    rows = []
    for case in cases:
        blocks = args.blocks or (60 if case != "resnet18" or device.type == "cuda" else 8)
        row = measure(case, blocks, args.sample_every, device)
        rows.append(row)
        print(f"{case:9s} {row['input']}: plain {row['step_ms_plain']:.2f} ms/step, with the doctor "
              f"{row['step_ms_doctor']:.2f} ms/step: A/B overhead {100 * row['overhead_ab']:+.1f}% (pairs p20-p80 "
              f"{100 * row['overhead_ab_p20_p80'][0]:+.1f}..{100 * row['overhead_ab_p20_p80'][1]:+.1f}%); time in the "
              f"doctor {row['doctor_ms_per_step']:.3f} ms/step = {100 * row['overhead_direct']:.1f}% "
              f"(calls {row['calls_ms_unsampled']:.3f} ms unsampled, {row['calls_ms_sampled']:.3f} ms sampled; "
              f"hooks {row['hooks_ms_sampled']:.3f} ms per sampled step; end_epoch {row['end_epoch_ms']:.2f} ms); "
              f"target <= {100 * TARGET_OVERHEAD:.0f}%", flush=True)
    record = {**_env.record_header("bench_doctor", device), "malloc": malloc, "rows": rows}
    if args.json:
        _io.write_json_atomic(args.json, record)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
